"""Per-host batches of a SeqIO task/mixture, their checkpointable position, and global arrays.

Every host builds the same tf.data pipeline over its own shard of the examples
(`seqio.ShardInfo(jax.process_index(), jax.process_count())` by default) and yields
`global_batch_size // num_shards` examples per step; `to_global_batch` joins the hosts'
batches into `jax.Array`s sharded along the batch dimension over the mesh's data axis.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import jax
import numpy as np
import seqio
import tensorflow as tf
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ptuning.data.jsonl import resolve_task

# Keys of `BatchIterator.state()` that must match for `restore` to be meaningful.
_STREAM_KEYS = ("mixture_or_task_name", "split", "global_batch_size", "num_shards",
                "task_feature_lengths", "shuffle", "seed", "repeat", "pack", "drop_remainder")


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
  `decoder_positions [B, L_tgt]`.

  The stream is a function of (task, split, lengths, batch size, shards, shuffle, seed,
  repeat, pack), so its position is one number: `state()` records how many batches were
  consumed and `restore(state)` rebuilds the pipeline skipping that many batches. The state is
  the same on every host (it does not name the shard index), so one host may save it.
  """

  def __init__(self, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
               global_batch_size: int, *, split: str = "train", shuffle: bool = True,
               seed: int = 0, repeat: bool = True, shard_info: seqio.ShardInfo | None = None,
               pack: bool = False, drop_remainder: bool = True):
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
    self._batches_consumed = 0
    self._iterator: Iterator[dict[str, np.ndarray]] | None = None
    self._checked_nonempty = False

  def _get_dataset(self, num_epochs: int | None, shuffle: bool) -> tf.data.Dataset:
    ds = seqio.get_dataset(
        self.mixture_or_task_name, self.task_feature_lengths,
        feature_converter=seqio.EncDecFeatureConverter(pack=self.pack),
        dataset_split=self.split, shuffle=shuffle, num_epochs=num_epochs,
        shard_info=self.shard_info, seed=self.seed, verbose=False)
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
    return {key: np.asarray(value, dtype=np.int32) for key, value in batch.items()}

  def state(self) -> dict[str, Any]:
    """JSON-serialisable position: `batches_consumed` plus what defines the stream."""
    return {"batches_consumed": self._batches_consumed, "seed": self.seed,
            "mixture_or_task_name": self.mixture_or_task_name, "split": self.split,
            "global_batch_size": self.global_batch_size,
            "num_shards": self.shard_info.num_shards,
            "task_feature_lengths": dict(self.task_feature_lengths), "shuffle": self.shuffle,
            "repeat": self.repeat, "pack": self.pack, "drop_remainder": self.drop_remainder}

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
                        vocabulary: seqio.Vocabulary | None = None) -> BatchIterator:
  """A `BatchIterator` over a task/mixture name or a `.jsonl` path (needs `vocabulary`)."""
  name = resolve_task(mixture_or_task_name, vocabulary)
  return BatchIterator(name, task_feature_lengths, global_batch_size, split=split,
                       shuffle=shuffle, seed=seed, repeat=repeat, shard_info=shard_info,
                       pack=pack, drop_remainder=drop_remainder)


def make_eval_examples(mixture_or_task_name: str, split: str,
                       task_feature_lengths: Mapping[str, int],
                       vocabulary: seqio.Vocabulary | None = None) -> list[dict[str, Any]]:
  """All examples of a split in order (no shuffle, no repeat, nothing dropped).

  Each example holds the task features `inputs [L <= L_in]` and `targets [L <= L_tgt]` as int32
  arrays (trimmed, EOS-terminated) and, where the task keeps them, `inputs_pretokenized` /
  `targets_pretokenized` as str.
  """
  name = resolve_task(mixture_or_task_name, vocabulary)
  ds = seqio.get_mixture_or_task(name).get_dataset(
      dict(task_feature_lengths), split=split, shuffle=False, num_epochs=1)
  examples = []
  try:
    for example in ds.with_options(_tf_data_options()).as_numpy_iterator():
      examples.append({key: value.decode("utf-8") if isinstance(value, bytes) else
                       np.asarray(value, np.int32) if np.issubdtype(value.dtype, np.integer)
                       else value for key, value in example.items()})
  except tf.errors.OpError as e:
    _reraise_input_error(e)
  return examples


def to_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                    batch_axis: str | tuple[str, ...] = "data") -> dict[str, jax.Array]:
  """Global `jax.Array`s `[global_batch, ...]` from this host's rows `[per_host_batch, ...]`.

  Dimension 0 is sharded over the mesh axis (or axes) `batch_axis` and replicated over the
  others; hosts' local batches are concatenated in process order.
  """
  sharding = NamedSharding(mesh, PartitionSpec(batch_axis))
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for key, value in local_batch.items()}
