"""Reads T5X checkpoints into flat `{'encoder/layers_0/mlp/wo/kernel': np.ndarray}` dicts.

Nothing is unpickled and neither t5x nor flaxformer is needed. Three layouts are understood:

* msgpack + zarr ("format version 3", `checkpoint_N/`): a msgpack file `checkpoint` holding
  `{'version': 3, 'optimizer': {'target': params, 'state': optimizer_state}}`. Small arrays are
  inlined as flax msgpack ndarray extensions; large ones are replaced by a TensorStore spec
  `{'driver': 'zarr', 'kvstore': {'driver': 'gfile'|'file'|'gcs', 'path': 'target.a.b'},
  'metadata': {'shape': [...], 'dtype': '<f4', ...}}` whose path is relative to the checkpoint
  directory (older specs keep `path` at the top level; some writers store the spec as JSON text).
* single-file msgpack: the same tree (with or without the `optimizer` wrapper), all inline.
* Orbax (newer t5x): a directory with `_METADATA` (directly or in one item subdirectory such as
  `state/`), OCDBT data in `manifest.ocdbt` / `d/`, the tree holding `target` and `state`.

Returned keys are `/`-joined paths inside the chosen subtree; values keep their stored dtype
(float32, or bfloat16 from `ml_dtypes`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts
from flax import serialization

from ptuning.checkpoints.lazy_arrays import TensorStoreArray

_MSGPACK_FILE = "checkpoint"
_ORBAX_MARKERS = ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt")
_ORBAX_ITEM_DIRS = ("state", "default", "params", "items")  # preferred item subdirectories
_STEP_DIR = re.compile(r"(?:checkpoint_)?(\d+)")  # t5x `checkpoint_N`; Orbax managers: `N`
_ROOT_KEYS = (b"version", b"optimizer", b"target", b"state")  # first key of a t5x msgpack map

PathLike = str | os.PathLike


def read_t5x_checkpoint(path: PathLike) -> dict[str, np.ndarray]:
  """Returns the model parameters (the `target` subtree), e.g. `token_embedder/embedding`
  [vocab, embed], `encoder/layers_0/attention/query/kernel` [embed, heads * d_kv].

  `path` may be a `checkpoint_N` directory, its `checkpoint` msgpack file, a single msgpack file,
  an Orbax checkpoint directory, or a directory of `checkpoint_N` or Orbax `N` step directories
  (the largest N that holds a checkpoint is read).
  """
  return {key: np.asarray(leaf) for key, leaf in open_t5x_checkpoint(path).items()}


def open_t5x_checkpoint(path: PathLike) -> dict[str, np.ndarray | TensorStoreArray]:
  """`read_t5x_checkpoint` with the zarr arrays of the msgpack + zarr layout left on disk, as
  `TensorStoreArray`s opened (metadata and shapes checked) but not read: they read only the
  slices asked for; likewise the arrays of an Orbax checkpoint (zarr in its OCDBT database).
  Inline msgpack arrays, and Orbax layouts TensorStore cannot open directly, come back as numpy
  arrays."""
  return _read_subtree(path, "target", lazy=True)


def read_t5x_optimizer_state(path: PathLike) -> dict[str, np.ndarray]:
  """Returns the optimizer state (the `state` subtree), e.g. `step` [] and
  `param_states/encoder/layers_0/mlp/wo/kernel/v` (Adafactor slots), flattened like the params."""
  return _read_subtree(path, "state")


def is_t5x_checkpoint(path: PathLike) -> bool:
  """Cheap format sniffing: True iff `path` resolves to a t5x msgpack or Orbax checkpoint.

  Reads at most a few bytes of the msgpack file (its first map key must be one of `version`,
  `optimizer`, `target`, `state`) or checks that the Orbax metadata mentions `target`.
  """
  try:
    kind, location = _locate(Path(path))
  except (FileNotFoundError, ValueError):
    return False
  if kind == "msgpack":
    with open(location, "rb") as f:
      return _looks_like_t5x_msgpack(f.read(64))
  metadata = location / "_METADATA"
  return metadata.is_file() and "target" in metadata.read_text(errors="replace")


def _read_subtree(path: PathLike, subtree: str, lazy: bool = False) -> dict[str, Any]:
  kind, location = _locate(Path(path))
  if kind == "orbax":
    opened = _open_orbax_arrays(location, subtree) if lazy else None
    return opened if opened is not None else _read_orbax(location, subtree)
  return _read_msgpack(location, subtree, lazy)


def _locate(path: Path) -> tuple[str, Path]:
  """Returns ('msgpack', file) or ('orbax', directory holding `_METADATA`) for `path`."""
  if not path.exists():
    raise FileNotFoundError(f"T5X checkpoint path {str(path)!r} does not exist")
  if path.is_file():
    return "msgpack", path
  if (path / _MSGPACK_FILE).is_file():
    return "msgpack", path / _MSGPACK_FILE
  if (path / "_METADATA").is_file():
    return "orbax", path
  if any((path / marker).exists() for marker in _ORBAX_MARKERS):
    items = [d for d in sorted(path.iterdir()) if (d / "_METADATA").is_file()]
    items.sort(key=lambda d: d.name not in _ORBAX_ITEM_DIRS)
    if items:
      return "orbax", items[0]
  steps = [(int(m.group(1)), d) for d in path.iterdir()
           if d.is_dir() and (m := _STEP_DIR.fullmatch(d.name))]
  for _, step_dir in sorted(steps, reverse=True):
    try:
      return _locate(step_dir)
    except ValueError:
      continue  # e.g. a checkpoint_N still being written; fall back to the previous step
  raise ValueError(
      f"{str(path)!r} is not a T5X checkpoint: expected a msgpack file named {_MSGPACK_FILE!r} "
      f"(t5x format), an Orbax checkpoint directory ({'/'.join(_ORBAX_MARKERS)}) or a parent "
      f"directory of checkpoint_N step directories")


def _looks_like_t5x_msgpack(head: bytes) -> bool:
  """True iff `head` starts a msgpack map whose first key is a t5x root key."""
  if not head:
    return False
  offset = {0xDE: 3, 0xDF: 5}.get(head[0], 1 if 0x80 <= head[0] <= 0x8F else 0)
  if not offset or len(head) <= offset or not 0xA0 <= head[offset] <= 0xBF:
    return False
  length = head[offset] - 0xA0
  return head[offset + 1:offset + 1 + length] in _ROOT_KEYS


def _read_msgpack(file: Path, subtree: str, lazy: bool) -> dict[str, Any]:
  """Reads `subtree` of a t5x msgpack file; TensorStore specs resolve against its directory
  (left on disk as `TensorStoreArray`s when `lazy`)."""
  data = file.read_bytes()
  if not _looks_like_t5x_msgpack(data[:64]):
    raise ValueError(f"{str(file)!r} is not a T5X msgpack checkpoint: expected a msgpack map "
                     f"with keys among {[k.decode() for k in _ROOT_KEYS]}")
  try:
    root = serialization.msgpack_restore(data)
  except Exception as e:  # msgpack raises several unrelated types for truncated/corrupt data
    raise ValueError(f"{str(file)!r}: corrupt T5X msgpack checkpoint ({e})") from e
  version = root.get("version", 3)
  tree = root.get("optimizer", root)
  if not isinstance(tree, dict) or subtree not in tree:
    raise ValueError(f"{str(file)!r}: no {subtree!r} subtree in the checkpoint "
                     f"(found keys {sorted(tree) if isinstance(tree, dict) else type(tree)})")
  arrays: dict[str, np.ndarray] = {}
  specs: dict[str, dict[str, Any]] = {}
  for key, leaf in _flatten(tree[subtree]):
    spec = _as_tensorstore_spec(leaf)
    if spec is not None:
      specs[key] = spec
    elif isinstance(leaf, (np.ndarray, np.generic, int, float, bool)):
      arrays[key] = np.array(leaf)  # a copy: inline arrays are read-only views of `data`
    elif leaf is not None:
      raise ValueError(f"{str(file)!r}: unexpected leaf {key!r} of type {type(leaf).__name__}")
  stored = _open_zarr_arrays(specs, file.parent, version)
  arrays.update(stored if lazy else {key: np.asarray(leaf) for key, leaf in stored.items()})
  return dict(sorted(arrays.items()))


def _flatten(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
  """`[(a/b/c, leaf)]` for a nested dict; TensorStore spec dicts count as leaves."""
  if not isinstance(tree, dict) or _as_tensorstore_spec(tree) is not None:
    return [(prefix, tree)]
  items = []
  for name, child in tree.items():
    items.extend(_flatten(child, f"{prefix}/{name}" if prefix else str(name)))
  return items


def _as_tensorstore_spec(leaf: Any) -> dict[str, Any] | None:
  """The spec dict if `leaf` refers to a TensorStore array, else None: a spec dict, its JSON
  text, or (any other string) a kvstore path/URL such as 'target.a.b' or 'gs://b/c/target.a.b'."""
  if isinstance(leaf, str):
    try:
      leaf = json.loads(leaf) if leaf.lstrip().startswith("{") else {"driver": "zarr",
                                                                       "kvstore": leaf}
    except json.JSONDecodeError as e:
      raise ValueError(f"unparseable TensorStore spec {leaf[:200]!r} ({e})") from e
  if isinstance(leaf, dict) and isinstance(leaf.get("driver"), str) and (
      "kvstore" in leaf or "path" in leaf):
    return leaf
  return None


def _zarr_dir(spec: dict[str, Any], ckpt_dir: Path, key: str) -> Path:
  """The local zarr directory a spec refers to: its path relative to `ckpt_dir`, or, for paths
  of the writer's filesystem (absolute, gs://...), the last path component inside `ckpt_dir`."""
  kvstore = spec.get("kvstore")
  if isinstance(kvstore, dict) and "path" in kvstore:
    stored = str(kvstore["path"])
  elif isinstance(kvstore, str):  # URL form, e.g. 'file:///ckpt/target.x/' or 'gs://b/target.x'
    stored = re.sub(r"^[a-z0-9+]+://", "/", kvstore)
  else:
    stored = str(spec.get("path", ""))
  stored = stored.split("|")[0].rstrip("/")
  candidates = [ckpt_dir / Path(stored).name]
  if stored and not os.path.isabs(stored):
    candidates.insert(0, ckpt_dir / stored)
  for candidate in candidates:
    if candidate.is_dir():
      return candidate
  raise FileNotFoundError(f"parameter {key!r}: zarr array {stored!r} not found; looked for "
                          f"{[str(c) for c in candidates]}")


def _open_zarr_arrays(specs: dict[str, dict[str, Any]], ckpt_dir: Path,
                      version: int) -> dict[str, TensorStoreArray]:
  """Opens every spec's zarr array (all concurrently), checking shapes against the spec; reads
  nothing but metadata. Format version 2 wrote bfloat16 as uint16 bit patterns."""
  opened, locations = {}, {}
  for key, spec in specs.items():
    locations[key] = os.path.abspath(_zarr_dir(spec, ckpt_dir, key))
    opened[key] = ts.open({"driver": spec.get("driver", "zarr"),
                           "kvstore": {"driver": "file", "path": locations[key]}},
                          open=True, read=True)
  arrays = {}
  for key, future in opened.items():
    try:
      store = future.result()
    except ValueError as e:  # TensorStore reports missing/invalid metadata as ValueError
      raise ValueError(f"parameter {key!r}: cannot open its TensorStore array ({e})") from e
    expected = specs[key].get("metadata", {}).get("shape")
    if expected is not None and tuple(expected) != tuple(store.shape):
      raise ValueError(f"parameter {key!r}: zarr array shape {tuple(store.shape)} differs from "
                       f"the shape {tuple(expected)} recorded in the checkpoint's msgpack spec")
    arrays[key] = TensorStoreArray(store, f"parameter {key!r} ({locations[key]})",
                                   bits_as_bfloat16=version < 3)
  return arrays


def _open_orbax_arrays(directory: Path, subtree: str) -> dict[str, TensorStoreArray] | None:
  """`subtree`'s arrays of an Orbax checkpoint opened in place with TensorStore (zarr inside the
  OCDBT database, or one zarr directory per array in the older layout), reading nothing; None
  when the layout is not one of these (the caller then restores through Orbax)."""
  try:
    metadata = json.loads((directory / "_METADATA").read_text())
    tree = metadata["tree_metadata"]
  except (OSError, ValueError, KeyError, TypeError):
    return None
  names = {}
  for entry in tree.values():
    keys = [str(k.get("key")) for k in entry.get("key_metadata", [])]
    if keys and keys[0] == "optimizer":
      keys = keys[1:]
    if not keys or keys[0] != subtree:
      continue
    if entry.get("value_metadata", {}).get("value_type") not in ("jax.Array", "np.ndarray"):
      return None
    names["/".join(keys[1:])] = ".".join(str(k.get("key")) for k in entry["key_metadata"])
  if not names:
    return None
  driver = "zarr3" if metadata.get("use_zarr3") else "zarr"
  root = directory.resolve()

  def kvstores(name: str) -> list[dict[str, str]]:  # where array `name` may live, in order
    per_array = {"driver": "file", "path": str(root / name)}
    if not metadata.get("use_ocdbt", True):
      return [per_array]
    return [{"driver": "ocdbt", "base": root.as_uri() + "/", "path": name}, per_array]

  arrays = {}
  for key, name in sorted(names.items()):
    for kvstore in kvstores(name):
      try:
        store = ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True).result()
      except ValueError:  # not found in this layout: try the next one
        continue
      arrays[key] = TensorStoreArray(store, f"parameter {key!r} ({name} in {directory})")
      break
    else:
      return None
  return arrays


def _read_orbax(directory: Path, subtree: str) -> dict[str, np.ndarray]:
  """Restores `subtree` (and nothing else) of an Orbax PyTree checkpoint as numpy arrays."""
  import jax
  import orbax.checkpoint as ocp

  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = checkpointer.metadata(directory).item_metadata.tree
  except Exception as e:  # orbax raises assorted errors for unreadable metadata
    raise ValueError(f"{str(directory)!r}: unreadable Orbax checkpoint metadata ({e})") from e
  prefix: tuple[str, ...] = ()
  if isinstance(metadata, dict) and subtree not in metadata and "optimizer" in metadata:
    prefix, metadata = ("optimizer",), metadata["optimizer"]
  if not isinstance(metadata, dict) or subtree not in metadata:
    raise ValueError(f"{str(directory)!r}: no {subtree!r} subtree in the Orbax checkpoint "
                     f"(found keys {sorted(metadata) if isinstance(metadata, dict) else None})")
  wanted: Any = {subtree: metadata[subtree]}
  for name in reversed(prefix):
    wanted = {name: wanted}
  restore_args = jax.tree.map(
      lambda m: ocp.RestoreArgs(restore_type=np.ndarray) if hasattr(m, "shape") else
      ocp.RestoreArgs(), wanted)
  item = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype) if hasattr(m, "shape") else m, wanted)
  restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True))
  for name in prefix:
    restored = restored[name]
  return {key: np.asarray(leaf) for key, leaf in sorted(_flatten(restored[subtree]))
          if leaf is not None}
