"""Device mesh, the one logical-axis rules table, and shardings for any tree.

Model code names only logical axes ('batch', 'embed', 'heads', ...). This module is the single
place that maps them to mesh axes ('data', 'model', and 'replica' when there is one). The default
table follows T5X: batch -> data; vocab / mlp / heads / joined_kv -> model; everything else
replicated. `PARAMETER_SHARDED_RULES` ('2d') additionally shards 'embed' over 'data' (T5X's 2-D
parameter sharding), which cuts per-device parameter and optimizer memory for full fine-tuning.

Multi-slice / multi-node: `MeshConfig.replica > 1` adds an outer 'replica' axis, laid over the
slow network (DCN between TPU slices, or between GPU nodes) by a hybrid mesh, with 'data' and
'model' inside a slice / node (ICI, NVLink). The batch is split over ('replica', 'data'). The
'fsdp' rules shard 'embed' over ('replica', 'data') too: parameters and optimizer state are
split over every data-parallel device (ZeRO-3 style); '2d' keeps them inside a slice. With
replica == 1 the mesh is exactly the 2-axis ('data', 'model') mesh.

`to_global_batch` turns each host's numpy rows into global `jax.Array`s split over the batch
axis. It is pure JAX/numpy and lives here rather than in `ptuning.data` (the TensorFlow input
pipeline), so code that only needs it (bench) never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = tuple[tuple[str, Any], ...]

MESH_AXES = ("data", "model")
REPLICA_AXIS = "replica"  # outermost axis, present only when MeshConfig.replica > 1

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

FSDP_RULES: LogicalRules = PARAMETER_SHARDED_RULES  # + 'embed' over 'replica' (rules_for)

RULE_SETS = {"default": DEFAULT_RULES, "2d": PARAMETER_SHARDED_RULES, "fsdp": FSDP_RULES}
# Logical axes that a rule set splits over ('replica', 'data') instead of 'data' on a mesh with
# a replica axis.
_OVER_REPLICA = {"default": ("batch",), "2d": ("batch",), "fsdp": ("batch", "embed")}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape: `replica * data * model` must equal the device count; -1 (data or model)
  means 'the rest'. `replica` (default 1: no replica axis) is the number of slices / nodes."""

  data: int = -1
  model: int = 1
  rules: str = "default"  # a key of RULE_SETS
  replica: int = 1

  def resolved_shape(self, num_devices: int) -> tuple[int, int]:
    """(data, model) sizes; with a replica axis, per replica (see `axis_sizes`)."""
    data, model = self.data, self.model
    if self.replica < 1 or num_devices % self.replica:
      raise ValueError(f"mesh replica={self.replica} does not divide {num_devices} devices")
    num_devices //= self.replica
    if data == -1 and model == -1:
      raise ValueError("at most one mesh axis may be -1")
    if data == -1:
      data = num_devices // model
    if model == -1:
      model = num_devices // data
    if data * model != num_devices:
      raise ValueError(f"mesh data={data} x model={model} does not match {num_devices} devices"
                       + (f" per replica ({self.replica} replicas)" if self.replica > 1 else ""))
    return data, model

  def axis_sizes(self, num_devices: int) -> dict[str, int]:
    """{'replica': R (only if R > 1), 'data': D, 'model': M}, outermost axis first."""
    data, model = self.resolved_shape(num_devices)
    return {**({REPLICA_AXIS: self.replica} if self.replica > 1 else {}),
            "data": data, "model": model}


def parse_mesh_spec(spec: str | None) -> MeshConfig:
  """Parses 'data=2,model=4' or 'replica=2,data=2,model=4' (the CLI form) into a MeshConfig."""
  if not spec:
    return MeshConfig()
  sizes = {}
  for part in spec.split(","):
    name, _, value = part.partition("=")
    if name.strip() not in MESH_AXES + (REPLICA_AXIS,) or not value:
      raise ValueError(f"bad mesh spec {spec!r}: expected e.g. 'data=2,model=4'")
    sizes[name.strip()] = int(value)
  return MeshConfig(**sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ('data', 'model') mesh, or ('replica', 'data', 'model') when `config.replica > 1`,
  over `devices` (default: all devices)."""
  devices = list(devices if devices is not None else jax.devices())
  if config.replica > 1:
    return _replica_mesh(config, devices)
  shape = config.resolved_shape(len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _granules(devices: Sequence[jax.Device]) -> tuple[list[list[jax.Device]], bool]:
  """(devices grouped by TPU slice when they span several slices, else by process (a GPU
  node, a host), whether the groups are processes)."""
  slices = {getattr(d, "slice_index", 0) for d in devices}
  by_process = len(slices) <= 1
  key = (lambda d: d.process_index) if by_process else (lambda d: d.slice_index)
  groups: dict = {}
  for device in devices:
    groups.setdefault(key(device), []).append(device)
  return [groups[k] for k in sorted(groups)], by_process


def _replica_mesh(config: MeshConfig, devices: list[jax.Device]) -> Mesh:
  """Hybrid ICI x DCN mesh when the devices form exactly `replica` slices / processes (one
  replica per granule: its 'data' x 'model' block stays on the fast interconnect); otherwise
  (one host, fake devices, plans) the same axes over a plain reshape."""
  sizes = config.axis_sizes(len(devices))
  shape, axes = tuple(sizes.values()), tuple(sizes)
  granules, by_process = _granules(devices)
  if len(granules) == config.replica and len({len(g) for g in granules}) == 1:
    from jax.experimental import mesh_utils
    array = mesh_utils.create_hybrid_device_mesh(
        (1,) + shape[1:], (config.replica, 1, 1), devices, process_is_granule=by_process)
  else:
    array = np.asarray(devices).reshape(shape)
  return Mesh(array, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def rules_for(config: MeshConfig) -> LogicalRules:
  """The rules table of `config.rules`; on a replica mesh, 'batch' (and for 'fsdp' 'embed')
  split over ('replica', 'data')."""
  try:
    rules = RULE_SETS[config.rules]
  except KeyError:
    raise KeyError(f"unknown partitioning rules {config.rules!r}; known: {sorted(RULE_SETS)}")
  if config.replica <= 1:
    return rules
  over = _OVER_REPLICA.get(config.rules, ("batch",))
  return tuple((name, (REPLICA_AXIS, "data") if name in over and axis == "data" else axis)
               for name, axis in rules)


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


def default_batch_axis(mesh: Mesh) -> str | tuple[str, ...]:
  """('replica', 'data') on a mesh with a replica axis (`MeshConfig.replica > 1`), else 'data'."""
  return (REPLICA_AXIS, "data") if REPLICA_AXIS in mesh.axis_names else "data"


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                    batch_axis: str | tuple[str, ...] | None = None,
                    global_batch_size: int | None = None) -> dict[str, jax.Array]:
  """Global `jax.Array`s `[global_batch, ...]` from this host's rows `[per_host_batch, ...]`.

  Dimension 0 is sharded over the mesh axis (or axes) `batch_axis` (default:
  `default_batch_axis(mesh)`) and replicated over the others; hosts' local batches are
  concatenated in process order. If the rows number `global_batch_size`, they are the whole
  global batch, identical on every process (`global_batches=True` in `ptuning.data.batches`),
  and each device takes its own rows of it.
  """
  sharding = NamedSharding(mesh, PartitionSpec(batch_axis or default_batch_axis(mesh)))
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    is_global = global_batch_size is not None and value.shape[0] == global_batch_size
    out[key] = jax.make_array_from_process_local_data(
        sharding, value, value.shape if is_global else None)
  return out


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
