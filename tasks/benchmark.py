"""GLUE/SuperGLUE-style classification benchmarks as SeqIO tasks in T5's text-to-text format.

A `BenchmarkTask` says how T5 formats one task (`t5_glue_format`: `"{benchmark} {key1}:
{value1} {key2}: {value2}"` -> label name, "<unk>" when unlabelled) and where its data is:
a prepared TFDS dataset, or the original files read by the task's `read_file`. Both give the
same raw features: text fields (str), `label` (int64 class id, -1 if none; float32 for
STS-B) and `idx` (int32).

Where data is read from (`register_benchmark_tasks`):
1. `data_dir` passed explicitly: the original files under `{data_dir}/{folder}/`;
2. otherwise TFDS, when `{tfds_data_dir}/{tfds_name}/{version}/dataset_info.json` exists
   (never downloads);
3. otherwise the original files under `$PTUNING_GLUE_DIR` / `$PTUNING_SUPERGLUE_DIR`.
A task whose data is found nowhere is not registered.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import seqio
import tensorflow as tf

from tasks import metrics, rank
from tasks.sources import RecordsDataSource

# (path) -> raw records {text features..., "label", "idx"}.
FileReader = Callable[[str], Iterator[dict[str, Any]]]

# name -> what it was registered from (to make re-registration idempotent).
_REGISTERED: dict[str, tuple[Any, ...]] = {}


@dataclasses.dataclass(frozen=True)
class BenchmarkTask:
  """One benchmark task: its T5 text format, metrics and where its data lives.

  `feature_names`: the text fields in T5's order (T5 sorts them unless it names an order);
  `label_names`: class names by id, `()` for STS-B's float score; `folder`/`split_files`:
  the original files, `{data_dir}/{folder}/{split_files[split]}`; `read_file(path)` yields
  the raw records of one file.
  """

  name: str
  tfds_name: str
  benchmark_name: str
  feature_names: tuple[str, ...]
  label_names: tuple[str, ...]
  folder: str
  split_files: Mapping[str, str]
  read_file: FileReader
  metric_fns: tuple[Callable[..., dict[str, float]], ...]

  @property
  def is_classification(self) -> bool:
    return bool(self.label_names)

  def output_signature(self) -> dict[str, tf.TensorSpec]:
    signature = {key: tf.TensorSpec((), tf.string) for key in self.feature_names}
    signature["label"] = tf.TensorSpec((), tf.int64 if self.is_classification else tf.float32)
    signature["idx"] = tf.TensorSpec((), tf.int32)
    return signature


def label_id(value: Any, label_names: Sequence[str], where: str) -> int:
  """A raw label (class name, int, bool or numeric string; None/missing = -1) as a class id."""
  if value is None or value == "":
    return -1
  if isinstance(value, bool):
    value = int(value)
  if isinstance(value, str) and value in label_names:
    return label_names.index(value)
  try:
    label = int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{where}: label {value!r} is none of {list(label_names)}") from None
  if not -1 <= label < len(label_names):
    raise ValueError(f"{where}: label {label} outside [0, {len(label_names)})")
  return label


@seqio.map_over_dataset
def t5_glue_format(x: Mapping[str, tf.Tensor], benchmark_name: str,
                   feature_names: Sequence[str], label_names: Sequence[str]) -> dict:
  """T5's `preprocessors.glue`: `inputs`, `targets` (label name or "<unk>"), `idx`, `label`."""
  parts = [benchmark_name]
  for key in feature_names:
    parts += [f"{key}:", x[key]]
  label = tf.cast(x["label"], tf.int64)
  targets = tf.cond(tf.equal(label, -1), lambda: tf.constant("<unk>"),
                    lambda: tf.gather(tf.constant(list(label_names)), label))
  return {"inputs": tf.strings.join(parts, separator=" "), "targets": targets,
          "idx": tf.cast(x["idx"], tf.int32), "label": label}


@seqio.map_over_dataset
def t5_stsb_format(x: Mapping[str, tf.Tensor]) -> dict:
  """T5's `preprocessors.stsb`: the score rounded to the nearest 0.2, printed with 1 decimal."""
  inputs = tf.strings.join(["stsb sentence1:", x["sentence1"], "sentence2:", x["sentence2"]],
                           separator=" ")
  label = tf.cast(x["label"], tf.float32)
  return {"inputs": inputs, "targets": tf.as_string(tf.round(label * 5) / 5, precision=1),
          "idx": tf.cast(x["idx"], tf.int32)}


def prepared_tfds_name(tfds_name: str, tfds_data_dir: str | None = None) -> str | None:
  """`"{tfds_name}:{version}"` if TFDS has it prepared in `tfds_data_dir`, else None.

  Only looks at local files (`builder.data_dir`); never downloads or prepares anything. A
  directory TFDS cannot read (e.g. an incomplete preparation) counts as absent, with a warning.
  """
  data_dir = (tfds_data_dir or os.environ.get("TFDS_DATA_DIR")
              or os.path.expanduser("~/tensorflow_datasets"))
  if not tf.io.gfile.isdir(os.path.join(data_dir, tfds_name)):
    return None  # Cheap check before constructing a builder.
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except Exception as e:  # noqa: BLE001 (TFDS raises many types for unreadable data)
    logging.warning("ignoring TFDS %s in %s: %s", tfds_name, data_dir, e)
    return None
  if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    return None
  return f"{tfds_name}:{builder.version}"


def file_split_paths(spec: BenchmarkTask, data_dir: str) -> dict[str, str]:
  """split -> path of the original files of `spec` present under `data_dir`."""
  folder = os.path.join(data_dir, spec.folder)
  return {split: os.path.join(folder, name) for split, name in spec.split_files.items()
          if os.path.isfile(os.path.join(folder, name))}


def _file_source(spec: BenchmarkTask, split_paths: Mapping[str, str]) -> RecordsDataSource:
  return RecordsDataSource(
      {split: [functools.partial(spec.read_file, path)] for split, path in split_paths.items()},
      spec.output_signature(), shard_names={s: [p] for s, p in split_paths.items()})


def _text_preprocessor(spec: BenchmarkTask) -> Callable[[tf.data.Dataset], tf.data.Dataset]:
  if not spec.is_classification:
    return t5_stsb_format
  return functools.partial(t5_glue_format, benchmark_name=spec.benchmark_name,
                           feature_names=spec.feature_names, label_names=spec.label_names)


def _add_task(name: str, key: tuple[Any, ...], **task_kwargs: Any) -> None:
  if name in seqio.TaskRegistry.names():
    if _REGISTERED.get(name) == key:
      return
    raise ValueError(f"task {name!r} is already registered from another source or vocabulary "
                     f"({_REGISTERED.get(name, 'elsewhere')!r})")
  seqio.TaskRegistry.add(name, **task_kwargs)
  _REGISTERED[name] = key


def register_benchmark_task(spec: BenchmarkTask, source: seqio.DataSource, origin: str,
                            vocabulary: seqio.Vocabulary, rank_variant: bool = True) -> list[str]:
  """Registers `spec.name` (and `{spec.name}_rank` for classification tasks) over `source`.

  The rank task expands every example into one row per label (`tasks.rank`), is scored with
  `tasks.rank.evaluate_rank_task` and reports `rank_classification` metrics.
  """
  features = {key: seqio.Feature(vocabulary=vocabulary, add_eos=True)
              for key in ("inputs", "targets")}
  tail = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
          seqio.preprocessors.append_eos_after_trim]
  key = (origin, vocabulary)
  if spec.is_classification:
    postprocess = functools.partial(metrics.string_label_to_class_id,
                                    label_classes=list(spec.label_names))
  else:
    postprocess = metrics.string_to_float
  _add_task(spec.name, key, source=source, output_features=features,
            preprocessors=[_text_preprocessor(spec), *tail], postprocess_fn=postprocess,
            metric_fns=list(spec.metric_fns))
  names = [spec.name]
  if spec.is_classification and rank_variant:
    _add_task(f"{spec.name}_rank", key, source=source, output_features=features,
              preprocessors=[_text_preprocessor(spec),
                             functools.partial(rank.expand_to_labels, label_names=spec.label_names),
                             *tail],
              postprocess_fn=rank.rank_classification_postprocess,
              metric_fns=[rank.rank_classification_metric(len(spec.label_names))])
    names.append(f"{spec.name}_rank")
  return names


def register_benchmark_tasks(specs: Sequence[BenchmarkTask], vocabulary: seqio.Vocabulary,
                             data_dir: str | os.PathLike | None, env_var: str,
                             tfds_data_dir: str | None = None, rank_variant: bool = True
                             ) -> list[str]:
  """Registers each spec from files (explicit `data_dir`), TFDS, or files under `$env_var`.

  Returns the registered task names (classification tasks also get `..._rank`). Raises
  ValueError when an explicit `data_dir` holds none of the tasks' files.
  """
  explicit = os.fspath(data_dir) if data_dir is not None else None
  env_dir = os.environ.get(env_var)
  names = []
  for spec in specs:
    source, origin = None, None
    split_paths = file_split_paths(spec, explicit) if explicit else {}
    if not explicit and (tfds_name := prepared_tfds_name(spec.tfds_name, tfds_data_dir)):
      source = seqio.TfdsDataSource(tfds_name=tfds_name, tfds_data_dir=tfds_data_dir)
      origin = f"tfds:{tfds_name}"
    elif not explicit and env_dir:
      split_paths = file_split_paths(spec, env_dir)
    if source is None and split_paths:
      source = _file_source(spec, split_paths)
      origin = f"files:{sorted(split_paths.items())}"
    if source is None:
      logging.info("no data for %s (TFDS %s, files %s/%s): not registered", spec.name,
                   spec.tfds_name, explicit or env_dir or f"${env_var}", spec.folder)
      continue
    names += register_benchmark_task(spec, source, origin, vocabulary, rank_variant)
  if explicit and not names:
    folders = sorted({spec.folder for spec in specs})
    raise ValueError(f"no task data under {explicit!r} (expected folders like {folders})")
  return names
