"""Multitask soft prompts: a prompt bank, MPT, and SPoT-style transfer between tasks.

One frozen backbone serves many tasks at once: every example's `task_ids[b]` (its task's index,
see ptuning/data/task_ids.py) selects its own prompt by a gather, so one batch may mix tasks in
training and in inference, and an example's logits do not depend on the other examples.

* `PromptBank(num_tasks K, length P, shared_length Ps, combine)`, tree `prompt/tasks [K, P, E]`
  plus, unless `combine='per_task'`, `prompt/shared [Ps, E]`. Task k's prompt is
  'per_task': `tasks[k]`; 'concat': `[shared; tasks[k]]` (`Ps + P` rows); 'add':
  `shared + tasks[k]` (Ps = P; the task rows start at zero, so every task starts from the
  shared prompt). Parameters: K*P*E (+ Ps*E).
* `MPT` (Multitask Prompt Tuning, Wang et al., ICLR 2023): task k's prompt is the Hadamard
  product `shared ∘ (u_k @ v_k)` of a shared prompt `prompt/shared [P, E]` and a rank-r matrix
  from `prompt/mpt_u [K, P, r]`, `prompt/mpt_v [K, r, E]` (the paper: r = 1). Parameters:
  P*E + K*r*(P + E). `task_init='ones'` starts `u_k @ v_k` near 1 (each task starts from the
  shared prompt, as MPT's target adaptation does); 'normal' draws u, v from N(0, std) (HF PEFT's
  MultitaskPromptTuning). The paper obtains the shared prompt by distilling per-task teacher
  prompts; here it is trained jointly (or loaded: `initializer=initialize_from_bank(...)`).
* SPoT (Vu et al., ACL 2022): `initialize_from_bank(source, task_index)` is an initialiser whose
  prompt `[P, E]` comes from a source prompt: an array, a `.npy` file (`[P, E]`, or a bank
  `[K, P, E]` and a row), or a previous run's checkpoint directory (vanilla `prompt/prompt`, a
  bank's row, or an MPT task's effective prompt). `PromptBank(task_initializers={k: init})`
  sets task k's prompt from it (for 'add', the row becomes `source - shared`, so task k's
  prompt equals the source); any method's `initializer=` accepts it too.

Without `task_ids` (a single-task stream) a one-task method uses task 0 for every example; a
method with more tasks raises. An id outside `[0, K)` gathers NaN rows (a NaN loss, never a
silently wrong prompt).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from ptuning.prompts import initializers
from ptuning.prompts.method import Params, broadcast_rows
from ptuning.prompts.vanilla import _PLACEMENTS

Array = jax.Array
COMBINES = ("per_task", "concat", "add")


def resolve_task_ids(task_ids: Array | None, num_tasks: int, batch: int, name: str) -> Array:
  """`task_ids [B]` as int32; None -> zeros when there is one task, else ValueError."""
  if task_ids is None:
    if num_tasks != 1:
      raise ValueError(f"{name} has {num_tasks} task prompts but the batch has no 'task_ids'; "
                       "train and evaluate on a SeqIO mixture (its batches carry task ids)")
    return jnp.zeros((batch,), jnp.int32)
  if task_ids.shape != (batch,):
    raise ValueError(f"task_ids must be [B]={batch}, got shape {task_ids.shape}")
  return task_ids.astype(jnp.int32)


def gather_rows(table: Array, task_ids: Array) -> Array:
  """`table [K, ...]`, `task_ids [B]` -> `[B, ...]` float32 (NaN rows for ids outside [0, K))."""
  return jnp.take(table.astype(jnp.float32), task_ids, axis=0, mode="fill", fill_value=jnp.nan)


def _check_placement(placement: str) -> None:
  if placement not in _PLACEMENTS:
    raise ValueError(f"unknown prompt placement {placement!r}; choose from {sorted(_PLACEMENTS)}")


def _checked(init: initializers.Initializer, rng: Array, embedding: Array,
             shape: tuple[int, int], what: str) -> Array:
  rows = init(rng, embedding, shape)
  if tuple(rows.shape) != tuple(shape):
    raise ValueError(f"{what}: the initialiser gave shape {tuple(rows.shape)}, expected {shape}")
  return rows.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class PromptBank:
  """One prompt per task, optionally with a shared prompt (see the module doc)."""

  num_tasks: int = 2
  length: int = 100
  shared_length: int = 0  # 'concat': > 0; 'add': 0 or `length`; 'per_task': 0
  combine: str = "per_task"
  initializer: initializers.Initializer = dataclasses.field(
      default_factory=lambda: initializers.random_uniform(0.5))
  # target task index -> initialiser of its prompt `[P, E]` (SPoT); a dict is accepted.
  task_initializers: Any = ()
  placement: str = "prefix"
  name: str = "prompt_bank"
  trainable_pattern: str = r"^prompt/"

  def __post_init__(self):
    if self.combine not in COMBINES:
      raise ValueError(f"unknown combine {self.combine!r}; choose from {COMBINES}")
    _check_placement(self.placement)
    if self.num_tasks <= 0 or self.length <= 0:
      raise ValueError(f"num_tasks and length must be positive, got {self.num_tasks}, "
                       f"{self.length}")
    if self.combine == "add" and self.shared_length not in (0, self.length):
      raise ValueError(f"combine='add' needs shared_length == length ({self.length}) or 0, got "
                       f"{self.shared_length}")
    if self.combine == "concat" and self.shared_length <= 0:
      raise ValueError("combine='concat' needs shared_length > 0")
    if self.combine == "per_task" and self.shared_length:
      raise ValueError("combine='per_task' has no shared prompt; set shared_length=0")
    pairs = dict(self.task_initializers).items()
    if any(not 0 <= int(k) < self.num_tasks for k, _ in pairs):
      raise ValueError(f"task_initializers keys {sorted(int(k) for k, _ in pairs)} must lie in "
                       f"[0, {self.num_tasks})")
    object.__setattr__(self, "task_initializers", tuple(sorted((int(k), v) for k, v in pairs)))

  @property
  def shared_rows(self) -> int:
    """Rows of `prompt/shared` (0: no shared prompt)."""
    return {"per_task": 0, "concat": self.shared_length, "add": self.length}[self.combine]

  def init(self, rng: jax.Array, backbone_params: Params) -> Params:
    embedding = backbone_params["token_embedder"]["embedding"]
    embed = embedding.shape[1]
    shared_rng, task_rng = jax.random.split(rng)
    tree, shared = {}, None
    if self.shared_rows:
      shared = _checked(self.initializer, shared_rng, embedding, (self.shared_rows, embed),
                        f"{self.name} shared prompt")
      tree["shared"] = shared
    transfers = dict(self.task_initializers)
    rows = []
    for k in range(self.num_tasks):
      krng, shape = jax.random.fold_in(task_rng, k), (self.length, embed)
      if k in transfers:
        row = _checked(transfers[k], krng, embedding, shape, f"{self.name} task {k} transfer")
        rows.append(row - shared if self.combine == "add" else row)
      elif self.combine == "add":
        rows.append(jnp.zeros(shape, jnp.float32))
      else:
        rows.append(_checked(self.initializer, krng, embedding, shape, f"{self.name} task {k}"))
    tree["tasks"] = jnp.stack(rows)
    return {"prompt": tree}

  def logical_axes(self) -> Params:
    axes = {"tasks": PartitionSpec(None, "prompt_length", "prompt_embed")}
    if self.shared_rows:
      axes["shared"] = PartitionSpec("prompt_length", "prompt_embed")
    return {"prompt": axes}

  def task_prompts(self, params: Params, task_ids: Array) -> Array:
    """Each example's prompt: `task_ids [B]` -> `[B, P']` float32 (P' = Ps + P for 'concat')."""
    prompt = params["prompt"]
    rows = gather_rows(prompt["tasks"], task_ids)
    if self.combine == "per_task":
      return rows
    shared = broadcast_rows(prompt["shared"], rows.shape[0], jnp.float32)
    return rows + shared if self.combine == "add" else jnp.concatenate([shared, rows], axis=1)

  def apply(self, params: Params, embeds: Array, mask: Array,
            task_ids: Array | None = None) -> tuple[Array, Array]:
    """`embeds [B, L, E]`, `mask [B, L]`, `task_ids [B]` -> (`[B, P' + L, E]`, `[B, P' + L]`)."""
    task_ids = resolve_task_ids(task_ids, self.num_tasks, embeds.shape[0], self.name)
    prompt = self.task_prompts(params, task_ids).astype(embeds.dtype)
    return _PLACEMENTS[self.placement](prompt, embeds, mask)


@dataclasses.dataclass(frozen=True)
class MPT:
  """Multitask Prompt Tuning: task k's prompt = `shared ∘ (u_k @ v_k)` (see the module doc)."""

  num_tasks: int = 2
  length: int = 100
  rank: int = 1
  initializer: initializers.Initializer = dataclasses.field(
      default_factory=lambda: initializers.random_uniform(0.5))
  task_init: str = "ones"  # 'ones': u_k @ v_k ~ 1 (+ noise); 'normal': u, v ~ N(0, std)
  task_init_std: float = 0.02
  placement: str = "prefix"
  name: str = "mpt"
  trainable_pattern: str = r"^prompt/"

  def __post_init__(self):
    if min(self.num_tasks, self.length, self.rank) <= 0:
      raise ValueError(f"num_tasks, length and rank must be positive, got {self.num_tasks}, "
                       f"{self.length}, {self.rank}")
    if self.task_init not in ("ones", "normal"):
      raise ValueError(f"unknown task_init {self.task_init!r}; choose 'ones' or 'normal'")
    _check_placement(self.placement)

  def init(self, rng: jax.Array, backbone_params: Params) -> Params:
    embedding = backbone_params["token_embedder"]["embedding"]
    embed = embedding.shape[1]
    shared_rng, u_rng, v_rng = jax.random.split(rng, 3)
    shared = _checked(self.initializer, shared_rng, embedding, (self.length, embed),
                      f"{self.name} shared prompt")
    k, p, r = self.num_tasks, self.length, self.rank
    u = self.task_init_std * jax.random.normal(u_rng, (k, p, r), jnp.float32)
    v = self.task_init_std * jax.random.normal(v_rng, (k, r, embed), jnp.float32)
    if self.task_init == "ones":  # (1/sqrt(r) + eps) summed over r ranks: u_k @ v_k ~ 1
      u, v = u + 1 / math.sqrt(r), v + 1 / math.sqrt(r)
    return {"prompt": {"shared": shared, "mpt_u": u, "mpt_v": v}}

  def logical_axes(self) -> Params:
    return {"prompt": {"shared": PartitionSpec("prompt_length", "prompt_embed"),
                       "mpt_u": PartitionSpec(None, "prompt_length", "rank"),
                       "mpt_v": PartitionSpec(None, "rank", "prompt_embed")}}

  def task_prompts(self, params: Params, task_ids: Array) -> Array:
    """`task_ids [B]` -> `[B, P, E]` float32: `shared ∘ (u[t] @ v[t])` per example."""
    prompt = params["prompt"]
    w = jnp.einsum("bpr,bre->bpe", gather_rows(prompt["mpt_u"], task_ids),
                   gather_rows(prompt["mpt_v"], task_ids))
    return broadcast_rows(prompt["shared"], w.shape[0], jnp.float32) * w

  def apply(self, params: Params, embeds: Array, mask: Array,
            task_ids: Array | None = None) -> tuple[Array, Array]:
    """`embeds [B, L, E]`, `mask [B, L]`, `task_ids [B]` -> (`[B, P + L, E]`, `[B, P + L]`)."""
    task_ids = resolve_task_ids(task_ids, self.num_tasks, embeds.shape[0], self.name)
    prompt = self.task_prompts(params, task_ids).astype(embeds.dtype)
    return _PLACEMENTS[self.placement](prompt, embeds, mask)


def source_prompt(flat: Mapping[str, np.ndarray], task_index: int | None = None,
                  combine: str | None = None) -> np.ndarray:
  """A task's prompt `[P, E]` from a trainable tree `{'/'-joined path: array}`.

  Vanilla `prompt/prompt`; MPT: `shared ∘ (u[i] @ v[i])`; a bank: row `tasks[i]`, with
  `combine='add'` `shared + tasks[i]` and with 'concat' `[shared; tasks[i]]` (Ps + P rows).
  """
  if "prompt/prompt" in flat:
    return np.asarray(flat["prompt/prompt"])
  def row(key: str) -> np.ndarray:
    table = np.asarray(flat[key])
    if task_index is None or not -table.shape[0] <= task_index < table.shape[0]:
      raise ValueError(f"the source holds {table.shape[0]} task prompts ({key}); pass "
                       f"task_index in [0, {table.shape[0]}), got {task_index}")
    return table[task_index]
  if "prompt/mpt_u" in flat:
    return np.asarray(flat["prompt/shared"]) * (row("prompt/mpt_u") @ row("prompt/mpt_v"))
  if "prompt/tasks" in flat:
    if combine in (None, "per_task"):
      return row("prompt/tasks")
    shared = np.asarray(flat["prompt/shared"])
    if combine == "add":
      return shared + row("prompt/tasks")
    return np.concatenate([shared, row("prompt/tasks")], axis=0)
  raise KeyError(f"no prompt in the source; it holds {sorted(flat)}")


def load_source_prompt(path_or_array: Any, task_index: int | None = None,
                       combine: str | None = None) -> np.ndarray:
  """`[P, E]` from an array or `.npy` (`[P, E]`, or `[K, P, E]` and a row) or a checkpoint dir."""
  is_path = isinstance(path_or_array, (str, os.PathLike))
  if is_path and not os.fspath(path_or_array).endswith(".npy"):
    from ptuning.checkpoints.train_state import read_trainable_params
    path = os.fspath(path_or_array)
    if not os.path.exists(path):
      raise FileNotFoundError(f"source prompt {path!r} does not exist")
    return source_prompt(read_trainable_params(path), task_index, combine)
  array = (initializers.load_prompt_array(path_or_array) if is_path
           else np.asarray(path_or_array))
  if array.ndim == 3:
    return source_prompt({"prompt/tasks": array}, task_index)
  return array


def initialize_from_bank(path_or_array: Any, task_index: int | None = None,
                         combine: str | None = None) -> initializers.Initializer:
  """SPoT initialiser: the source prompt `[P, E]` (see `load_source_prompt`), shape-checked.

  `task_index` picks the source task of a bank / MPT source; `combine` says how a bank source
  joined its shared prompt ('add' | 'concat'; default: its task row alone).
  """
  array = load_source_prompt(path_or_array, task_index, combine)
  where = path_or_array if isinstance(path_or_array, (str, os.PathLike)) else "array"

  def init(rng, embedding, shape):
    del rng, embedding
    if tuple(array.shape) != tuple(shape):
      raise ValueError(f"source prompt {os.fspath(where)!r} (task {task_index}) has shape "
                       f"{tuple(array.shape)}, but the configured prompt is {tuple(shape)}")
    return jnp.asarray(array, jnp.float32)
  return init
