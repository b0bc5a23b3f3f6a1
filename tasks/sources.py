"""A SeqIO data source over records produced by Python readers (TSV/jsonl files, lists).

Readers run lazily inside `tf.data.Dataset.from_generator`, so a reader's
`ValueError("path:lineno: ...")` surfaces when the example is read (the input pipeline in
`ptuning.data.batches` re-raises it as a ValueError).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

RecordReader = Callable[[], Iterable[Mapping[str, Any]]]


class RecordsDataSource(seqio.DataSource):
  """Examples of each split produced by Python readers, read in order (SeqIO shuffles later).

  `split_readers`: split -> readers, chained in order (e.g. one per file). Each record must
  hold every key of `output_signature` (other keys are dropped). A multi-host shard takes
  every `num_shards`-th example (`ds.shard`), like `ptuning.data.JsonlDataSource`.
  `shard_names`: split -> names listed by `list_shards` (default: `split/i`).
  """

  def __init__(self, split_readers: Mapping[str, Sequence[RecordReader]],
               output_signature: Mapping[str, tf.TensorSpec],
               shard_names: Mapping[str, Sequence[str]] | None = None,
               num_input_examples: Mapping[str, int] | None = None):
    if not split_readers:
      raise ValueError("a RecordsDataSource needs at least one split")
    self._readers = {split: tuple(readers) for split, readers in split_readers.items()}
    self._signature = dict(output_signature)
    self._shard_names = {split: list(names) for split, names in (shard_names or {}).items()}
    super().__init__(splits=tuple(self._readers), num_input_examples=num_input_examples,
                     caching_permitted=True)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  @property
  def output_signature(self) -> dict[str, tf.TensorSpec]:
    return dict(self._signature)

  def list_shards(self, split: str) -> list[str]:
    default = [f"{split}/{i}" for i in range(len(self._readers[split]))]
    return self._shard_names.get(split) or default

  def _records(self, split: str) -> Iterable[dict[str, Any]]:
    keys = tuple(self._signature)
    for record in itertools.chain.from_iterable(reader() for reader in self._readers[split]):
      yield {key: record[key] for key in keys}

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    del shuffle, seed, sequence_length, use_cached, num_epochs  # SeqIO shuffles and repeats.
    if split not in self._readers:
      raise ValueError(f"split {split!r} not in this source; splits: {sorted(self._readers)}")
    ds = tf.data.Dataset.from_generator(lambda: self._records(split),
                                        output_signature=self._signature)
    if shard_info and shard_info.num_shards > 1:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    return ds
