"""Task ids of multitask streams: which task of a SeqIO mixture each example comes from.

Batches of a mixture carry `task_ids [B] int32`: each example's index in a list of task names,
by default the mixture's own task list (`Mixture.tasks`: its leaf tasks sorted by name). The id
is attached to every task's examples before SeqIO mixes them (`TaskIdMixture`), so SeqIO's
rates, sampling and order are unchanged, and reaches the batch as `EncDecFeatureConverter`'s
pass-through feature `task_id [1]` (`task_id_converter`); `BatchIterator` renames it `task_ids`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

TASK_ID_FEATURE = "task_id"  # task feature `[1]` int32 (a pass-through feature of the converter)
TASK_IDS = "task_ids"        # batch key `[B]` int32


def task_names_of(mixture_or_task_name: str) -> list[str]:
  """The default task list of a registered name: a mixture's leaf tasks in SeqIO's order
  (`Mixture.tasks`, sorted by name; nested mixtures flattened), or `[name]` for a task."""
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  if isinstance(provider, seqio.Mixture):
    return [task.name for task in provider.tasks]
  return [provider.name]


def task_id_index(mixture_or_task_name: str, task_names: Sequence[str] | None = None,
                  pack: bool = False) -> dict[str, int] | None:
  """task name -> task id for the examples of a registered name, or None (no task ids).

  None for a packed stream, and for a single task without `task_names`. Otherwise the ids are
  positions in `task_names` (default `task_names_of(name)`); ValueError if one of the name's
  tasks is not listed, or if `task_names` is given together with `pack`.
  """
  provider = seqio.get_mixture_or_task(mixture_or_task_name)
  is_mixture = isinstance(provider, seqio.Mixture)
  if pack:
    if task_names is not None:
      raise ValueError("task ids are not supported with packing (a packed row mixes examples)")
    return None
  if task_names is None and not is_mixture:
    return None
  names = list(task_names) if task_names is not None else task_names_of(mixture_or_task_name)
  if len(set(names)) != len(names):
    raise ValueError(f"task_names has duplicates: {names}")
  index = {name: i for i, name in enumerate(names)}
  missing = [name for name in task_names_of(mixture_or_task_name) if name not in index]
  if missing:
    raise ValueError(f"tasks {missing} of {mixture_or_task_name!r} are not in task_names {names}")
  return index


def with_task_id(ds: tf.data.Dataset, task_id: int) -> tf.data.Dataset:
  """Adds the task feature `task_id [1] int32` to every example."""
  return ds.map(lambda ex: {**ex, TASK_ID_FEATURE: tf.constant([task_id], tf.int32)},
                num_parallel_calls=tf.data.AUTOTUNE)


class TaskIdMixture(seqio.Mixture):
  """A view of a plain `seqio.Mixture` (same tasks, rates and sampling) whose examples carry
  `task_id`: it is attached to each task's dataset before SeqIO mixes them."""

  def __init__(self, mixture: seqio.Mixture, index: Mapping[str, int]):  # a copy, no super()
    self.__dict__.update(vars(mixture))
    self._task_id_index = dict(index)

  def get_task_dataset(self, task, *args, **kwargs) -> tf.data.Dataset:
    ds = super().get_task_dataset(task, *args, **kwargs)
    return with_task_id(ds, self._task_id_index[task.name])


def task_id_converter() -> seqio.EncDecFeatureConverter:
  """EncDecFeatureConverter (no packing) that passes `task_id [1]` through to the batch."""
  spec = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
  return seqio.EncDecFeatureConverter(pack=False, passthrough_features={TASK_ID_FEATURE: spec})
