"""Backbone parameters: abstract shapes, shardings, sharded creation and sharded restore.

Nothing here materialises the whole tree on one host: `init_params` runs the initialiser
under `jax.jit` with the rules table's `out_shardings`, and `place_params` builds each leaf with
`jax.make_array_from_callback`, so each device receives only its shard of one leaf at a time.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ptuning import param_tree, sharding
from ptuning.model.config import T5Config
from ptuning.model.t5 import EncoderDecoder

_LAYER = re.compile(r"^(encoder|decoder)/layers_(\d+)/(.*)$")
_SCANNED = re.compile(r"^(encoder|decoder)/layers/(.*)$")


def _init_fn(cfg: T5Config) -> Callable[[jax.Array], Any]:
  def init(rng):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return EncoderDecoder(cfg).init(rng, tokens, tokens)["params"]
  return init


@functools.lru_cache(maxsize=32)
def abstract_params(cfg: T5Config) -> Any:
  """Boxed (logically partitioned) ShapeDtypeStruct tree, from `jax.eval_shape`: no FLOPs, no memory."""
  return jax.eval_shape(_init_fn(cfg), jax.random.key(0))


def param_shapes(cfg: T5Config) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of the (unboxed) parameter tree."""
  return param_tree.flatten(nn.meta.unbox(abstract_params(cfg)))


def logical_specs(cfg: T5Config) -> Any:
  """Tree of logical PartitionSpecs, e.g. P('embed', 'joined_kv') for attention kernels."""
  return nn.get_partition_spec(abstract_params(cfg))


def param_shardings(cfg: T5Config, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> Any:
  """Tree of NamedShardings implied by the rules table."""
  return sharding.logical_to_sharding(logical_specs(cfg), mesh, rules)


def abstract_sharded_params(cfg: T5Config, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> Any:
  """Unboxed ShapeDtypeStruct tree, each leaf carrying its NamedSharding (no memory, no FLOPs)."""
  return jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                      nn.meta.unbox(abstract_params(cfg)), param_shardings(cfg, mesh, rules))


def init_params(cfg: T5Config, rng: jax.Array, mesh: Mesh, rules=sharding.DEFAULT_RULES) -> Any:
  """Random parameters created directly in their shardings (used for tests, bench and pretraining).

  The layers are always initialised as one `nn.scan`: XLA compiles one layer's initialiser, run
  in a loop (T5 1.1 XL on XLA's CPU compiler: 1.4 s to compile and 1.7 GiB of temporaries,
  against 37 s and 19.8 GiB for one initialiser per layer; on an H100 the XL bench's build took
  55 s instead of 212). An unrolled `cfg` then
  gets its `layers_{i}` leaves by slicing each stacked leaf on the devices, one leaf at a time,
  so scanned and unrolled configs start from the same numbers.
  """
  scanned = cfg.replace(scan_layers=True, remat_policy="none")
  # Hashable: the jitted initialiser is kept per (config, mesh, rules).
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
  with sharding.activate(mesh, rules):
    stacked = _initializer(scanned, mesh, rules)(rng)
  if cfg.scan_layers:
    return stacked
  shardings = param_tree.flatten(param_shardings(cfg, mesh, rules))
  flat, out = param_tree.flatten(stacked), {}
  del stacked
  for path in list(flat):
    value, match = flat.pop(path), _SCANNED.match(path)
    if match is None:
      out[path] = value
      continue
    names = _layer_paths(match, value.shape[0])
    out.update(zip(names, _layer_slicer(tuple(shardings[n] for n in names))(value)))
    del value  # the stacked leaf is freed before the next one is sliced
  return param_tree.unflatten(out)


@functools.lru_cache(maxsize=16)
def _initializer(scanned: T5Config, mesh: Mesh, rules: tuple) -> Callable[[jax.Array], Any]:
  """Jitted `rng -> stacked parameters` in their shardings, one per (config, mesh, rules): a
  process that builds the same model again (train then eval, the tests) traces and compiles
  the initialiser once."""
  return jax.jit(lambda r: nn.meta.unbox(_init_fn(scanned)(r)),
                 out_shardings=param_shardings(scanned, mesh, rules))


def _layer_paths(scanned: re.Match, layers: int) -> tuple[str, ...]:
  """`encoder/layers/X` (a `_SCANNED` match) -> `encoder/layers_0/X`, ... `layers_{n-1}/X`."""
  stack, rest = scanned.groups()
  return tuple(f"{stack}/layers_{i}/{rest}" for i in range(layers))


@functools.lru_cache(maxsize=64)
def _layer_slicer(out_shardings: tuple) -> Callable[[jax.Array], tuple]:
  """Jitted `[layers, ...] -> layers x [...]`, each slice in its own sharding."""
  return jax.jit(lambda stacked: tuple(stacked[i] for i in range(stacked.shape[0])),
                 out_shardings=out_shardings)


def stack_layers(flat: Mapping[str, Any], cfg: T5Config) -> dict[str, Any]:
  """Unscanned `encoder/layers_{i}/X` leaves -> scanned `encoder/layers/X` `[layers, ...]`."""
  out, groups = {}, {}
  for path, value in flat.items():
    match = _LAYER.match(path)
    if match:
      stack, index, rest = match.groups()
      groups.setdefault(f"{stack}/layers/{rest}", {})[int(index)] = value
    else:
      out[path] = value
  for path, by_index in groups.items():
    out[path] = _LazyStack([by_index[i] for i in sorted(by_index)])
  return out


def unstack_layers(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Scanned `encoder/layers/X [layers, ...]` -> `encoder/layers_{i}/X`."""
  out = {}
  for path, value in flat.items():
    match = _SCANNED.match(path)
    if not match:
      out[path] = value
      continue
    value = np.asarray(value)
    out.update(zip(_layer_paths(match, value.shape[0]), value))
  return out


class _LazyStack:
  """A `[layers, ...]` array assembled on demand from per-layer arrays (sliceable, like numpy)."""

  def __init__(self, parts):
    self.parts = parts
    self.shape = (len(parts),) + tuple(np.shape(parts[0]))
    self.dtype = np.asarray(parts[0]).dtype if not hasattr(parts[0], "dtype") else parts[0].dtype

  def __getitem__(self, index):
    index = index if isinstance(index, tuple) else (index,)
    layer_index, rest = (index[0], index[1:]) if index else (slice(None), ())
    layers = range(len(self.parts))[layer_index]
    return np.stack([np.asarray(self.parts[i][rest]) for i in layers])

  def __array__(self, dtype=None, copy=None):
    array = self[:]
    return array.astype(dtype) if dtype is not None else array


def place_params(flat: Mapping[str, Any], cfg: T5Config, mesh: Mesh,
                 rules=sharding.DEFAULT_RULES) -> Any:
  """Host arrays (numpy-like, sliceable) in the unscanned canonical layout -> sharded jax tree.

  Checks every shape against `cfg` first (naming the parameter and both shapes), stacks layers
  when `cfg.scan_layers`, casts to `cfg.param_dtype`, and transfers each device only its shard.
  Sources are read one shard at a time (`source[index]`, a tuple of slices), each distinct shard
  once: with `lazy_arrays` sources only the leaf being placed is ever in host memory.
  """
  from ptuning.checkpoints.validate import check_params_match_config
  unscanned_cfg = cfg.replace(scan_layers=False, remat_policy="none")
  expected = {p: tuple(s.shape) for p, s in param_shapes(unscanned_cfg).items()}
  check_params_match_config(flat, expected)
  if cfg.scan_layers:
    flat = stack_layers(flat, cfg)
  shardings = param_tree.flatten(param_shardings(cfg, mesh, rules))
  dtype = np.dtype(cfg.param_dtype)

  def make(path):
    source, shards = flat[path], {}

    def shard(index):  # devices holding the same shard (replicas) share one read
      key = tuple((s.start, s.stop, s.step) for s in index)
      if key not in shards:
        shards[key] = np.asarray(source[index]).astype(dtype)
      return shards[key]
    return jax.make_array_from_callback(tuple(source.shape), shardings[path], shard)
  return param_tree.unflatten({path: make(path) for path in shardings})


def host_params(params: Any) -> dict[str, np.ndarray]:
  """Sharded jax tree -> flat unscanned numpy dict (for export)."""
  return unstack_layers({p: np.asarray(jax.device_get(v)) for p, v in param_tree.flatten(params).items()})
