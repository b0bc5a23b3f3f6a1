"""SeqIO tasks over jsonl files of `{"inputs": str, "targets": str}` lines, and task lookup.

Lines are read lazily by a Python generator and every one is validated as it is read: bad
JSON, a missing `inputs`/`targets` key or a non-string value raises
`ValueError("{path}:{lineno}: ...")`. Blank lines are skipped; fields other than `inputs` and
`targets` (xP3's `language`, `template`, ...) are ignored.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import seqio
import tensorflow as tf

JSONL_FIELDS = ("inputs", "targets")
# The split names a single jsonl path serves (pass a mapping to give splits their own files).
DEFAULT_SPLITS = ("train", "validation", "test")

# name -> (sorted (split, absolute path) pairs, vocabulary) of the tasks registered here.
_REGISTERED: dict[str, tuple[tuple[tuple[str, str], ...], seqio.Vocabulary]] = {}

PathOrSplits = str | os.PathLike | Mapping[str, str | os.PathLike]


def parse_jsonl_line(line: bytes | str, path: str, lineno: int, allow_token_ids: bool = False,
                     keep_other_fields: bool = False) -> dict[str, Any] | None:
  """The `inputs`/`targets` of one jsonl line (None for a blank line); ValueError names `path:lineno`.

  `allow_token_ids` also accepts lists of ints as field values (`ptuning score`);
  `keep_other_fields` returns the whole record.
  """
  where = f"{path}:{lineno}"
  if isinstance(line, bytes):
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ValueError(f"{where}: not valid UTF-8: {e}") from None
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
  if not isinstance(record, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
  example = dict(record) if keep_other_fields else {}
  for key in JSONL_FIELDS:
    if key not in record:
      raise ValueError(f"{where}: missing required field {key!r} (fields: {sorted(record)})")
    value = record[key]
    is_ids = (allow_token_ids and isinstance(value, list)
              and all(isinstance(t, int) and not isinstance(t, bool) for t in value))
    if not (isinstance(value, str) or is_ids):
      kind = "a string or a list of token ids" if allow_token_ids else "a string"
      raise ValueError(f"{where}: field {key!r} must be {kind}, got {type(value).__name__}")
    example[key] = value
  return example


def read_jsonl(path: str) -> Iterator[dict[str, str]]:
  """Yields `{"inputs": str, "targets": str}` for every non-blank line of `path`, in order."""
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, start=1):
      example = parse_jsonl_line(line, path, lineno)
      if example is not None:
        yield example


class JsonlDataSource(seqio.DataSource):
  """Examples of one jsonl file per split, read in file order (SeqIO shuffles downstream).

  One file is one shard, so SeqIO shards a multi-host run by example (`ds.shard`).
  """

  def __init__(self, split_to_path: Mapping[str, str]):
    self._paths = dict(split_to_path)
    super().__init__(splits=tuple(self._paths), caching_permitted=True)

  @property
  def supports_arbitrary_sharding(self) -> bool:
    return False

  def list_shards(self, split: str) -> list[str]:
    return [self._paths[split]]

  def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                  shard_info: seqio.ShardInfo | None = None, *, sequence_length=None,
                  use_cached: bool = False, num_epochs: int | None = 1) -> tf.data.Dataset:
    del shuffle, seed, sequence_length, use_cached, num_epochs  # SeqIO shuffles and repeats.
    if split not in self._paths:
      raise ValueError(f"split {split!r} not in this jsonl task; splits: {sorted(self._paths)}")
    ds = tf.data.Dataset.from_generator(
        functools.partial(read_jsonl, self._paths[split]),
        output_signature={key: tf.TensorSpec((), tf.string) for key in JSONL_FIELDS})
    if shard_info and shard_info.num_shards > 1:
      ds = ds.shard(shard_info.num_shards, shard_info.index)
    return ds


def _split_paths(path_or_splits: PathOrSplits) -> dict[str, str]:
  if isinstance(path_or_splits, Mapping):
    if not path_or_splits:
      raise ValueError("empty split -> path mapping")
    paths = {str(split): os.path.abspath(os.fspath(p)) for split, p in path_or_splits.items()}
  else:
    path = os.path.abspath(os.fspath(path_or_splits))
    paths = {split: path for split in DEFAULT_SPLITS}
  for path in paths.values():
    if not os.path.isfile(path):
      raise FileNotFoundError(f"jsonl file not found: {path!r}")
  return paths


def jsonl_task_name(path_or_splits: PathOrSplits) -> str:
  """`jsonl_{file stem}_{8 hex digits of the absolute paths}`, a valid SeqIO task name."""
  paths = _split_paths(path_or_splits)
  first = paths.get("train", next(iter(paths.values())))
  stem = re.sub(r"[^\w.]", "_", os.path.basename(first).removesuffix(".jsonl"))
  digest = hashlib.sha1(repr(sorted(paths.items())).encode()).hexdigest()[:8]
  return f"jsonl_{stem}_{digest}"


def register_jsonl_task(path: PathOrSplits, vocabulary: seqio.Vocabulary,
                        name: str | None = None) -> str:
  """Registers (once) a SeqIO task over jsonl file(s) and returns its name.

  `path`: one file, which then serves every split in `DEFAULT_SPLITS`, or a mapping
  split -> file (e.g. `{"train": a, "validation": b}`). The task tokenises `inputs` and
  `targets` with `vocabulary` and appends EOS after trimming (`add_eos=True`), like T5's
  GLUE tasks. Registering the same files and vocabulary again returns the same name; a
  different registration under a taken name raises ValueError.
  """
  paths = _split_paths(path)
  name = name or jsonl_task_name(paths)
  spec = (tuple(sorted(paths.items())), vocabulary)
  if name in seqio.TaskRegistry.names() and _REGISTERED.get(name) == spec:
    return name
  if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
    raise ValueError(f"a different task or mixture is already registered as {name!r}; "
                     "pass another name= to register_jsonl_task")
  features = {key: seqio.Feature(vocabulary=vocabulary, add_eos=True) for key in JSONL_FIELDS}
  seqio.TaskRegistry.add(
      name,
      source=JsonlDataSource(paths),
      preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      output_features=features,
      metric_fns=[])
  _REGISTERED[name] = spec
  return name


def resolve_task(name_or_path: str | os.PathLike, vocabulary: seqio.Vocabulary | None = None
                 ) -> str:
  """A registered SeqIO task/mixture name as is; a `.jsonl` path registered as a task.

  This lets a gin binding such as `MIXTURE_OR_TASK_NAME = '/data/train.jsonl'` work.
  Raises KeyError for a name that is neither, listing some registered names.
  """
  name = os.fspath(name_or_path)
  if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
    return name
  if name.endswith(".jsonl"):
    if vocabulary is None:
      raise ValueError(f"a vocabulary is needed to register the jsonl file {name!r} as a task")
    return register_jsonl_task(name, vocabulary)
  known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
  listed = ", ".join(known[:10]) + (f", ... ({len(known)} in all)" if len(known) > 10 else "")
  raise KeyError(f"{name!r} is not a registered SeqIO task or mixture, nor a .jsonl path; "
                 f"registered: {listed or 'none'}")
