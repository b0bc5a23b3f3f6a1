"""Training checkpoints: the trainable tree, its optimizer state and the data position (Orbax).

A prompt-tuning run saves only what it trains. `TrainState.params` is the trainable tree
(e.g. `{'prompt': {'prompt': [100, 768]}}`); the frozen backbone is never written, the caller
records its path (and model config, method, ...) in the JSON `meta` instead. One step of a
[100, 768] float32 prompt with Adafactor state is ~0.6 MB, ~1.2 MB with the .npy copies.

Layout of `directory` (one Orbax `CheckpointManager` with three items per step):

  {step}/state/    TrainState (Orbax StandardSave: OCDBT/TensorStore, sharding-aware)
  {step}/data/     JSON: data iterator position
  {step}/meta/     JSON: backbone path, model config, method, `run_signature`, trainable shapes
  prompts/step_{step}/{path with '/' -> '.'}.npy   host copies of the trainable leaves
  prompts/latest/...                                copy of the newest step's .npy files

Safety: Orbax writes each step into `*.orbax-checkpoint-tmp-*` and renames it when complete,
so a crash mid-save leaves only a tmp directory that `latest_step`/`restore` ignore. `save`
refuses (ValueError, before writing anything) when the directory already holds checkpoints
whose `meta['run_signature']` differs from the caller's, so another run's checkpoints are never
deleted by `max_to_keep` or mixed with this run's.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

STATE, DATA, META = "state", "data", "meta"
PROMPTS_DIR = "prompts"
LATEST = "latest"
# Trainable trees below this size are exported to .npy in full; above it only 'prompt*' leaves.
NPY_EXPORT_ALL_BELOW_BYTES = 64 * 2**20


@flax.struct.dataclass
class TrainState:
  """What a training step updates; a pytree (fields are children).

  step: int32 scalar, the number of updates applied.
  params: ONLY the trainable tree, e.g. {'prompt': {'prompt': [prompt_length, d_model]}}.
  opt_state: the optax state for `params`.
  """

  step: jax.Array
  params: dict
  opt_state: Any

  @classmethod
  def create(cls, params: dict, tx: optax.GradientTransformation) -> "TrainState":
    """step = 0 and `tx.init(params)`."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flat_with_paths(tree: Any) -> dict[str, Any]:
  """Leaves of any pytree keyed by '/'-joined paths: dict keys, dataclass / namedtuple field
  names and sequence indices all become path parts, so a TrainState and the dict-and-list tree
  Orbax stores for it give the same paths (e.g. 'opt_state/0/mu/prompt/prompt')."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _json_normalise(value: Any) -> Any:
  """How `value` reads back from JSON (tuples -> lists, ...); raises if not serialisable."""
  return json.loads(json.dumps(value))


def _to_host(x: Any) -> np.ndarray:
  """Full value of a (possibly multi-host) array on this host. Collective for arrays that are
  not fully addressable, so every process must call it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _npy_safe(arr: np.ndarray) -> np.ndarray:
  """.npy cannot describe ml_dtypes (bfloat16 saves as raw void); those go out as float32,
  which holds them exactly."""
  if arr.dtype.kind == "V" or arr.dtype.isbuiltin == 2:
    return arr.astype(np.float32)
  return arr


def _handler_registry(state_handler: ocp.handlers.CheckpointHandler | None = None
                      ) -> ocp.handlers.CheckpointHandlerRegistry:
  """Handlers of the three items; `state_handler` defaults to StandardCheckpointHandler."""
  return ocp.handlers.create_default_handler_registry(
      **{STATE: state_handler or ocp.handlers.StandardCheckpointHandler(),
         DATA: ocp.handlers.JsonCheckpointHandler(),
         META: ocp.handlers.JsonCheckpointHandler()})


class TrainCheckpointer:
  """Saves / restores `TrainState` + data position + meta under `directory` (see module doc).

  max_to_keep: newest steps kept (Orbax `LatestN`); None keeps all.
  save_interval_steps: `save` skips other steps unless `force` (Orbax always saves the first).
  async_save: Orbax writes in the background; `save` returns once arrays are on the host.
  Collective: construct and call `save` / `restore` on every process of a multi-host job.
  Local file systems only (the .npy export uses os.replace).
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3,
               save_interval_steps: int = 1, async_save: bool = False):
    self.directory = Path(directory).absolute()
    self.async_save = async_save
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        # `max_to_keep` is deprecated in CheckpointManagerOptions; LatestN is its replacement.
        preservation_policy=(ocp.checkpoint_managers.LatestN(n=max_to_keep)
                             if max_to_keep else None),
        create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=_handler_registry())
    self._signature_checked: tuple[bool, Any] = (False, None)
    # (step, {path: host array}) saved by Orbax whose .npy export waits for the save to commit.
    self._pending_npy: list[tuple[int, dict[str, np.ndarray]]] = []

  # ---------------------------------------------------------------- steps

  def latest_step(self) -> int | None:
    """Newest committed step (tmp dirs of interrupted saves are ignored), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  # ---------------------------------------------------------------- save

  def _check_run_signature(self, meta: Mapping[str, Any]) -> None:
    """Raises if the directory holds checkpoints of a run with another `run_signature`."""
    signature = _json_normalise(meta.get("run_signature"))
    checked, known = self._signature_checked
    if checked:
      existing = known
    else:
      latest = self.latest_step()
      if latest is None:
        self._signature_checked = (True, signature)
        return
      existing = self._read_json(latest, META).get("run_signature")
    if existing != signature:
      raise ValueError(
          f"checkpoint directory {self.directory} already holds checkpoints (steps "
          f"{self.all_steps()}) of a different run: their run_signature is {existing!r}, this "
          f"run's is {signature!r}. Nothing was written; choose another checkpoint directory "
          f"(or delete the old one yourself if it is no longer needed).")
    self._signature_checked = (True, existing)

  def save(self, step: int, state: TrainState, data_state: Mapping[str, Any] | None = None,
           meta: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves `state`, `data_state` (JSON) and `meta` (JSON) as `step`; True if it saved.

    Skips (returns False) steps that `save_interval_steps` rules out unless `force`. `meta`
    gains 'trainable_shapes' ({path: [shape..., dtype]}). After the save has committed,
    process 0 writes the trainable leaves as .npy under prompts/step_{step}/ and prompts/latest/
    (immediately when `async_save=False`; otherwise at the next save, `wait_until_finished`
    or `close`).
    """
    meta = dict(meta or {})
    data_state = dict(data_state or {})
    self._check_run_signature(meta)
    meta.setdefault("trainable_shapes", {
        path: [*map(int, leaf.shape), str(leaf.dtype)]
        for path, leaf in flat_with_paths(state.params).items()})
    _json_normalise(meta), _json_normalise(data_state)  # fail before Orbax starts writing
    self._flush_npy()
    saved = self._manager.save(
        int(step),
        args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                   DATA: ocp.args.JsonSave(data_state),
                                   META: ocp.args.JsonSave(meta)}),
        force=force)
    if not saved:
      return False
    self._pending_npy.append((int(step), self._export_leaves(state.params)))
    if not self.async_save:
      self._flush_npy()
    return True

  @staticmethod
  def _export_leaves(params: Any) -> dict[str, np.ndarray]:
    """Host copies of the leaves to export: all if the tree is small, else paths 'prompt*'."""
    flat = flat_with_paths(params)
    total = sum(np.dtype(leaf.dtype).itemsize * int(np.prod(leaf.shape)) for leaf in flat.values())
    if total >= NPY_EXPORT_ALL_BELOW_BYTES:
      flat = {path: leaf for path, leaf in flat.items() if path.startswith("prompt")}
    return {path: _to_host(leaf) for path, leaf in flat.items()}

  def _flush_npy(self) -> None:
    """Waits for pending saves to commit, then writes their .npy exports (process 0)."""
    if not self._pending_npy:
      return
    self._manager.wait_until_finished()  # raises if an async save failed
    committed = set(self._manager.all_steps())
    pending, self._pending_npy = self._pending_npy, []
    if jax.process_index() != 0:
      return
    prompts = self.directory / PROMPTS_DIR
    for step, arrays in pending:
      if step not in committed:  # already removed by the preservation policy
        continue
      _write_npy_dir(prompts / f"step_{step}", arrays)
      if step == max(committed):
        _write_npy_dir(prompts / LATEST, arrays)
    # Follow Orbax's preservation policy so that prompts/ does not outgrow the checkpoints.
    for child in prompts.glob("step_*"):
      suffix = child.name[len("step_"):]
      if suffix.isdigit() and int(suffix) not in committed:
        shutil.rmtree(child, ignore_errors=True)

  def wait_until_finished(self) -> None:
    """Blocks until pending (async) saves have committed and their .npy files are written."""
    self._flush_npy()
    self._manager.wait_until_finished()

  # ---------------------------------------------------------------- restore

  def _read_json(self, step: int, item: str) -> dict:
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    return restored[item] or {}

  def _resolve_step(self, step: int | None) -> int:
    self._flush_npy()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no committed checkpoint in {self.directory}")
    elif step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"steps: {self.all_steps()}")
    return int(step)

  def stored_shapes(self, step: int | None = None) -> dict[str, tuple[int, ...]]:
    """{'/'-joined path: shape} of the TrainState stored at `step` (default latest)."""
    step = self._resolve_step(step)
    tree = self._manager.item_metadata(step)[STATE]
    tree = getattr(tree, "tree", tree)
    return {path: tuple(leaf.shape) for path, leaf in flat_with_paths(tree).items()}

  def restore(self, abstract_state: TrainState, shardings: Any = None, step: int | None = None
              ) -> tuple[TrainState, dict, dict]:
    """Restores `step` (default latest) as (state, data_state, meta).

    abstract_state: a TrainState of arrays or ShapeDtypeStructs giving structure, shapes and
      dtypes (e.g. `jax.eval_shape(lambda: TrainState.create(params, tx))`).
    shardings: a TrainState-shaped tree of `jax.sharding.Sharding`, or one Sharding for every
      leaf, or None to use each abstract leaf's own `.sharding`.
    Raises ValueError naming the path and both shapes when the stored tree differs from
    `abstract_state` (e.g. another prompt length, another optimizer); never reshapes.
    """
    step = self._resolve_step(step)
    if shardings is None:
      shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
    elif isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _: shardings, abstract_state)
    target = jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_state, shardings)
    self._check_matches(step, target)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target),
                                         DATA: ocp.args.JsonRestore(),
                                         META: ocp.args.JsonRestore()}))
    return restored[STATE], restored[DATA] or {}, restored[META] or {}

  def _check_matches(self, step: int, target: Any) -> None:
    stored = self.stored_shapes(step)
    wanted = {path: tuple(leaf.shape) for path, leaf in flat_with_paths(target).items()}
    where = f"checkpoint {self.directory / str(step)}"
    only_stored = sorted(set(stored) - set(wanted))
    only_wanted = sorted(set(wanted) - set(stored))
    if only_stored or only_wanted:
      raise ValueError(
          f"{where} has a different tree than the requested state: paths only in the "
          f"checkpoint: {only_stored[:8]} (shapes {[stored[p] for p in only_stored[:8]]}); "
          f"paths only in the requested state: {only_wanted[:8]} "
          f"(shapes {[wanted[p] for p in only_wanted[:8]]}). Was it written with another "
          f"optimizer or trainable set?")
    mismatched = [p for p in sorted(wanted) if wanted[p] != stored[p]]
    if mismatched:
      details = "; ".join(f"'{p}': stored shape {stored[p]} vs requested shape {wanted[p]}"
                          for p in mismatched[:8])
      raise ValueError(f"{where} does not match the requested state: {details}. Restore with "
                       f"the shapes it was trained with (e.g. the same prompt length).")

  # ---------------------------------------------------------------- lifecycle

  def close(self) -> None:
    """Finishes pending saves and .npy exports and releases Orbax's resources."""
    try:
      self._flush_npy()
    finally:
      self._manager.close()

  def __enter__(self) -> "TrainCheckpointer":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  @staticmethod
  def read_trainable_params(checkpoint_dir_or_step_dir: str | os.PathLike,
                            step: int | None = None) -> dict[str, np.ndarray]:
    """See the module-level `read_trainable_params`."""
    return read_trainable_params(checkpoint_dir_or_step_dir, step)


def _write_npy_dir(target: Path, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes `{path with '/' -> '.'}.npy` files into a temp dir, then renames it to `target`
  (replacing an older `target`), so readers never see a half-written directory."""
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir()
  for path, arr in arrays.items():
    np.save(tmp / f"{path.replace('/', '.')}.npy", _npy_safe(arr))
  old = None
  if target.exists():
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
  os.replace(tmp, target)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def read_trainable_params(checkpoint_dir_or_step_dir: str | os.PathLike, step: int | None = None
                          ) -> dict[str, np.ndarray]:
  """The trainable tree of a training checkpoint as host numpy, keyed by '/'-joined paths.

  Accepts a checkpoint directory (uses the newest committed step, or `step`) or one step's
  directory ('.../300'). Reads only `params` (not the optimizer state) and needs no mesh. For
  SPoT-style transfer: initialise a prompt from a previous run's checkpoint. Tmp directories
  of interrupted saves are not committed steps and are never read.
  """
  path = Path(checkpoint_dir_or_step_dir).absolute()
  root = path
  if path.name.isdigit() and (path / STATE).is_dir():
    root = path.parent
    if step is not None and step != int(path.name):
      raise ValueError(f"step={step} contradicts the step directory {path}")
    step = int(path.name)
  if not root.is_dir():
    raise FileNotFoundError(f"{root} is not a directory")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  # The 'state' item is read with the PyTree handler, whose restore can be partial.
  registry = _handler_registry(ocp.handlers.PyTreeCheckpointHandler())
  with ocp.CheckpointManager(root, options=options, handler_registry=registry) as manager:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"{root} holds no committed training checkpoint")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"no checkpoint for step {step} in {root}; steps: {steps}")
    tree = manager.item_metadata(step)[STATE]
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping) or "params" not in tree:
      raise ValueError(f"{root / str(step)} holds no TrainState with a 'params' subtree")
    params_meta = tree["params"]
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item={"params": params_meta},
        restore_args={"params": jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), params_meta)},
        partial_restore=True)}))[STATE]
  return {path: np.asarray(leaf) for path, leaf in flat_with_paths(restored["params"]).items()}
