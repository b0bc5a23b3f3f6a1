"""Per-host batches of a SeqIO task/mixture and their checkpointable position.

Every host builds the same tf.data pipeline over its own shard of the examples
(`seqio.ShardInfo(jax.process_index(), jax.process_count())` by default) and yields
`global_batch_size // num_shards` examples per step; `ptuning.sharding.to_global_batch` joins
the hosts' batches into `jax.Array`s sharded along the batch dimension over the mesh's data axis.

With `global_batches=True` every host instead builds the same unsharded stream and yields the
whole global batch; `to_global_batch` then hands each device its own rows. Batches (and so
losses and iterator states) are then the same for any number of processes, so a run and its
checkpoints move freely between process counts; the price is that every host reads and
tokenises every example (cheap for prompt-tuning datasets, not for pretraining mixtures).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NoReturn

import jax
import numpy as np
import seqio
import tensorflow as tf

from ptuning.data.jsonl import resolve_task
from ptuning.data.task_ids import (TASK_ID_FEATURE, TASK_IDS, TaskIdMixture, task_id_converter,
                                   task_id_index, with_task_id)

# Keys of `BatchIterator.state()` that must match for `restore` to be meaningful.
_STREAM_KEYS = ("mixture_or_task_name", "split", "global_batch_size", "num_shards",
                "task_feature_lengths", "shuffle", "seed", "repeat", "pack", "drop_remainder",
                "task_names")


def check_packing_compatible(pack: bool, uses_prompt: bool) -> None:
  """Raises ValueError when packing is asked for together with a soft prompt."""
  if pack and uses_prompt:
    raise ValueError(
        "packing is not supported with soft prompts: the prompt is prepended to each example's "
        "encoder input, and a packed row holds several examples; set pack=False")


def _tf_data_options() -> tf.data.Options:
  """Deterministic order; a bounded thread pool so the input pipeline leaves cores to JAX."""
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = max(2, min(16, (os.cpu_count() or 2) // 2))
  options.threading.max_intra_op_parallelism = 1
  return options


def _reraise_input_error(error: tf.errors.OpError) -> NoReturn:
  """Re-raises a ValueError raised inside a tf.data generator (e.g. `file:line: ...`) as such."""
  match = re.search(r"ValueError: ([^\n]+)", error.message)
  if match:
    raise ValueError(match.group(1)) from error
  raise error


class BatchIterator(Iterator[dict[str, np.ndarray]]):
  """Iterator over per-host batches: dicts of int32 numpy arrays.

  Keys (`B` = per-host batch, `L_in`/`L_tgt` = `task_feature_lengths['inputs'/'targets']`):
  `encoder_input_tokens [B, L_in]`, `decoder_input_tokens [B, L_tgt]`,
  `decoder_target_tokens [B, L_tgt]`, `decoder_loss_weights [B, L_tgt]`, and with `pack`
  also `encoder_segment_ids`, `encoder_positions [B, L_in]`, `decoder_segment_ids`,
  `decoder_positions [B, L_tgt]`; for a mixture (or with `task_names`) also `task_ids [B]`, each
  example's index in `task_names` (see the module doc and `task_id_index`).

  The stream is a function of (task, split, lengths, batch size, shards, shuffle, seed,
  repeat, pack, task_names), so its position is one number: `state()` records how many
  batches were consumed and `restore(state)` rebuilds the pipeline skipping that many batches.
  The state is the same on every host (it does not name the shard index), so one host may save
  it.
  """

  def __init__(self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
               global_batch_size: int, *, split: str = "train", shuffle: bool = True,
               seed: int = 0, repeat: bool = True, shard_info: seqio.ShardInfo | None = None,
               pack: bool = False, drop_remainder: bool = True, global_batches: bool = False,
               task_names: Sequence[str] | None = None):
    if global_batches:  # every process reads everything and yields the whole global batch
      if shard_info is not None and shard_info.num_shards != 1:
        raise ValueError("global_batches=True reads every example on every process; "
                         f"it cannot be combined with shard_info={shard_info}")
      shard_info = seqio.ShardInfo(0, 1)
    shard_info = shard_info or seqio.ShardInfo(jax.process_index(), jax.process_count())
    if global_batch_size <= 0 or global_batch_size % shard_info.num_shards:
      raise ValueError(f"global_batch_size={global_batch_size} is not a positive multiple of "
                       f"the number of input shards ({shard_info.num_shards})")
    self.mixture_or_task_name = mixture_or_task_name
    self.task_feature_lengths = dict(task_feature_lengths)
    self.global_batch_size = global_batch_size
    self.per_host_batch_size = global_batch_size // shard_info.num_shards
    self.split, self.shuffle, self.seed, self.repeat = split, shuffle, seed, repeat
    self.shard_info, self.pack, self.drop_remainder = shard_info, pack, drop_remainder
    self._task_id_index = task_id_index(mixture_or_task_name, task_names, pack)
    # The ids' meaning (recorded in `state()`): name of task id i, or None without task ids.
    self.task_names = (sorted(self._task_id_index, key=self._task_id_index.get)
                       if self._task_id_index is not None else None)
    self._batches_consumed = 0
    self._iterator: Iterator[dict[str, np.ndarray]] | None = None
    self._checked_nonempty = False

  def _get_dataset(self, num_epochs: int | None, shuffle: bool) -> tf.data.Dataset:
    if self._task_id_index is None:
      ds = seqio.get_dataset(
          self.mixture_or_task_name, self.task_feature_lengths,
          feature_converter=seqio.EncDecFeatureConverter(pack=self.pack),
          dataset_split=self.split, shuffle=shuffle, num_epochs=num_epochs,
          shard_info=self.shard_info, seed=self.seed, verbose=False)
      return ds.with_options(_tf_data_options())
    # What seqio.get_dataset does, with the task id attached before mixing and passed through.
    provider = seqio.get_mixture_or_task(self.mixture_or_task_name)
    if isinstance(provider, seqio.Mixture):
      provider = TaskIdMixture(provider, self._task_id_index)
    ds = provider.get_dataset(self.task_feature_lengths, split=self.split, shuffle=shuffle,
                              seed=self.seed, shard_info=self.shard_info, num_epochs=num_epochs)
    if not isinstance(provider, seqio.Mixture):
      ds = with_task_id(ds, self._task_id_index[provider.name])
    ds = task_id_converter()(ds, {**self.task_feature_lengths, TASK_ID_FEATURE: 1})
    return ds.with_options(_tf_data_options())

  def _check_nonempty(self) -> None:
    """Looks for one example (no shuffle, no repeat) so that an empty repeated stream raises."""
    probe = seqio.get_mixture_or_task(self.mixture_or_task_name).get_dataset(
        self.task_feature_lengths, split=self.split, shuffle=False, num_epochs=1,
        shard_info=self.shard_info).take(1)  # task features: the converter drops no example
    try:
      empty = not list(probe.as_numpy_iterator())
    except tf.errors.OpError as e:
      _reraise_input_error(e)
    if empty:
      raise ValueError(f"task {self.mixture_or_task_name!r} split {self.split!r} has no examples "
                       f"(input shard {self.shard_info.index} of {self.shard_info.num_shards})")
    self._checked_nonempty = True

  def _build(self) -> Iterator[dict[str, np.ndarray]]:
    if not self._checked_nonempty:
      self._check_nonempty()
    ds = self._get_dataset(num_epochs=None if self.repeat else 1, shuffle=self.shuffle)
    ds = ds.batch(self.per_host_batch_size, drop_remainder=self.drop_remainder)
    ds = ds.skip(self._batches_consumed).prefetch(tf.data.AUTOTUNE)
    return ds.as_numpy_iterator()

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._build()
    try:
      batch = next(self._iterator)
    except StopIteration:
      if self._batches_consumed == 0:
        raise ValueError(
            f"task {self.mixture_or_task_name!r} split {self.split!r} gave no batch of "
            f"{self.per_host_batch_size} examples (fewer examples in input shard "
            f"{self.shard_info.index} of {self.shard_info.num_shards} with "
            f"drop_remainder=True?)") from None
      raise
    except tf.errors.OpError as e:
      _reraise_input_error(e)
    self._batches_consumed += 1
    batch = {key: np.asarray(value, dtype=np.int32) for key, value in batch.items()}
    if TASK_ID_FEATURE in batch:
      batch[TASK_IDS] = batch.pop(TASK_ID_FEATURE)[:, 0]
    return batch

  def state(self) -> dict[str, Any]:
    """JSON-serialisable position: `batches_consumed` plus what defines the stream."""
    return {"batches_consumed": self._batches_consumed, "seed": self.seed,
            "mixture_or_task_name": self.mixture_or_task_name, "split": self.split,
            "global_batch_size": self.global_batch_size,
            "num_shards": self.shard_info.num_shards,
            "task_feature_lengths": dict(self.task_feature_lengths), "shuffle": self.shuffle,
            "repeat": self.repeat, "pack": self.pack, "drop_remainder": self.drop_remainder,
            "task_names": self.task_names}

  def restore(self, state: Mapping[str, Any]) -> None:
    """Positions the iterator so the next batch is batch `state['batches_consumed']`.

    Raises ValueError if `state` describes a different stream (other seed, task, ...).
    """
    mine = self.state()
    differ = {k: (state[k], mine[k]) for k in _STREAM_KEYS if k in state and state[k] != mine[k]}
    if differ:
      raise ValueError(f"iterator state is for another stream; (saved, current): {differ}")
    consumed = int(state["batches_consumed"])
    if consumed < 0:
      raise ValueError(f"batches_consumed={consumed} < 0")
    self._batches_consumed = consumed
    self._iterator = None


def make_batch_iterator(mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                        global_batch_size: int, split: str = "train", shuffle: bool = True,
                        seed: int = 0, repeat: bool = True,
                        shard_info: seqio.ShardInfo | None = None, pack: bool = False,
                        drop_remainder: bool = True,
                        vocabulary: seqio.Vocabulary | None = None,
                        global_batches: bool = False,
                        task_names: Sequence[str] | None = None) -> BatchIterator:
  """A `BatchIterator` over a task/mixture name or a `.jsonl` path (needs `vocabulary`)."""
  name = resolve_task(mixture_or_task_name, vocabulary)
  return BatchIterator(name, task_feature_lengths, global_batch_size, split=split,
                       shuffle=shuffle, seed=seed, repeat=repeat, shard_info=shard_info,
                       pack=pack, drop_remainder=drop_remainder, global_batches=global_batches,
                       task_names=task_names)


def _eval_dataset(name: str, split: str, task_feature_lengths: Mapping[str, int],
                  task_names: Sequence[str] | None) -> tf.data.Dataset:
  """A task's split in order; a mixture's tasks one after another (each whole, each tagged)."""
  provider = seqio.get_mixture_or_task(name)
  index = task_id_index(name, task_names)
  lengths = dict(task_feature_lengths)
  if not isinstance(provider, seqio.Mixture):
    ds = provider.get_dataset(lengths, split=split, shuffle=False, num_epochs=1)
    return ds if index is None else with_task_id(ds, index[provider.name])
  parts = [with_task_id(task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1),
                         index[task.name]) for task in provider.tasks if split in task.splits]
  if not parts:
    raise ValueError(f"no task of mixture {name!r} has a {split!r} split")
  ds = parts[0]
  for part in parts[1:]:
    ds = ds.concatenate(part)
  return ds


def make_eval_examples(mixture_or_task_name: str, split: str,
                       task_feature_lengths: Mapping[str, int],
                       vocabulary: seqio.Vocabulary | None = None,
                       task_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """All examples of a split in order (no shuffle, no repeat, nothing dropped).

  Each example holds the task features `inputs [L <= L_in]` and `targets [L <= L_tgt]` as int32
  arrays (trimmed, EOS-terminated) and, where the task keeps them, `inputs_pretokenized` /
  `targets_pretokenized` as str. A mixture gives every example of each of its tasks, task after
  task in `mixture.tasks` order (no sampling), and each example an int `task_id` (its task's
  index in `task_names`, default the mixture's task list); a single task has a `task_id` only
  when `task_names` is given.
  """
  name = resolve_task(mixture_or_task_name, vocabulary)
  ds = _eval_dataset(name, split, task_feature_lengths, task_names)
  examples = []
  try:
    for example in ds.with_options(_tf_data_options()).as_numpy_iterator():
      examples.append({key: value.decode("utf-8") if isinstance(value, bytes) else
                       np.asarray(value, np.int32) if np.issubdtype(value.dtype, np.integer)
                       else value for key, value in example.items()})
      if TASK_ID_FEATURE in examples[-1]:
        examples[-1][TASK_ID_FEATURE] = int(examples[-1][TASK_ID_FEATURE][0])
  except tf.errors.OpError as e:
    _reraise_input_error(e)
  return examples
