"""Device mesh, the one logical-axis rules table, and shardings for any tree.

Model code names only logical axes ('batch', 'embed', 'heads', ...). This module is the single
place that maps them to mesh axes ('data', 'model'). The default table follows T5X:
batch -> data; vocab / mlp / heads / joined_kv -> model; everything else replicated.
`PARAMETER_SHARDED_RULES` additionally shards 'embed' over 'data' (T5X's 2-D parameter
sharding), which cuts per-device parameter and optimizer memory for full fine-tuning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, Any], ...]

MESH_AXES = ("data", "model")

# The one rules table. Keys are logical axis names used in ptuning/model and ptuning/prompts.
DEFAULT_RULES: LogicalRules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("kv", None),
    ("embed", None),
    ("length", None),
    ("layers", None),
    ("relpos_buckets", None),
    ("prompt_length", None),
    ("prompt_embed", None),
    ("rank", None),
)

PARAMETER_SHARDED_RULES: LogicalRules = tuple(
    (name, "data") if name == "embed" else (name, axis) for name, axis in DEFAULT_RULES)

RULE_SETS = {"default": DEFAULT_RULES, "2d": PARAMETER_SHARDED_RULES}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape: `data * model` must equal the device count; -1 means 'the rest'."""

  data: int = -1
  model: int = 1
  rules: str = "default"  # a key of RULE_SETS

  def resolved_shape(self, num_devices: int) -> tuple[int, int]:
    data, model = self.data, self.model
    if data == -1 and model == -1:
      raise ValueError("at most one mesh axis may be -1")
    if data == -1:
      data = num_devices // model
    if model == -1:
      model = num_devices // data
    if data * model != num_devices:
      raise ValueError(f"mesh data={data} x model={model} does not match {num_devices} devices")
    return data, model


def parse_mesh_spec(spec: str | None) -> MeshConfig:
  """Parses 'data=2,model=4' (the CLI form) into a MeshConfig."""
  if not spec:
    return MeshConfig()
  sizes = {}
  for part in spec.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in MESH_AXES or not value:
      raise ValueError(f"bad mesh spec {spec!r}: expected e.g. 'data=2,model=4'")
    sizes[name.strip()] = int(value)
  return MeshConfig(**sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ('data', 'model') mesh over `devices` (default: all devices)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = config.resolved_shape(len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_for(config: MeshConfig) -> LogicalRules:
  try:
    return RULE_SETS[config.rules]
  except KeyError:
    raise KeyError(f"unknown partitioning rules {config.rules!r}; known: {sorted(RULE_SETS)}")


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[None]:
  """Makes `mesh` and `rules` current so that activation constraints in model code apply."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
  """Maps a tree of logical PartitionSpecs (e.g. `nn.get_partition_spec(boxed)`) to NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def logical_spec_to_mesh_spec(logical: Sequence[str | None], rules: LogicalRules = DEFAULT_RULES
                              ) -> PartitionSpec:
  """('batch', 'length') -> PartitionSpec('data', None) under `rules`."""
  return nn.logical_to_mesh_axes(tuple(logical), rules)


def batch_sharding(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES, ndim: int = 2) -> NamedSharding:
  """Sharding of a `[batch, ...]` input array: batch over the data axis, the rest replicated."""
  return NamedSharding(mesh, logical_spec_to_mesh_spec(("batch",) + (None,) * (ndim - 1), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def shard_shape(shape: Sequence[int], spec: PartitionSpec, mesh_shape: dict[str, int]) -> tuple:
  """Per-device block of an array of `shape` laid out by mesh-axis `spec` (no devices needed)."""
  block = []
  for i, size in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    block.append(-(-size // math.prod(mesh_shape[a] for a in axes)))
  return tuple(block)


def bytes_per_device(abstract_tree: Any, logical_specs: Any, mesh_shape: dict[str, int],
                     rules: LogicalRules = DEFAULT_RULES) -> int:
  """Bytes one device holds for `abstract_tree` (ShapeDtypeStructs) with logical `specs`."""
  is_spec = lambda x: isinstance(x, PartitionSpec)
  total = 0
  for leaf, logical in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(logical_specs, is_leaf=is_spec)):
    spec = logical_spec_to_mesh_spec(tuple(logical), rules)
    total += math.prod(shard_shape(leaf.shape, spec, mesh_shape)) * np.dtype(leaf.dtype).itemsize
  return total
