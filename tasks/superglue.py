"""SuperGLUE as SeqIO tasks in T5's text-to-text format (`super_glue_rte`, ... + `_rank`).

Formats (T5's `preprocessors.glue`: text fields sorted by name, WiC in T5's fixed order):
  super_glue_boolq `boolq passage: {p} question: {q}`           -> False | True
  super_glue_cb    `cb hypothesis: {h} premise: {p}`    -> entailment | contradiction | neutral
  super_glue_copa  `copa choice1: {a} choice2: {b} premise: {p} question: {q}` -> choice1 | choice2
  super_glue_rte   `rte hypothesis: {h} premise: {p}`           -> entailment | not_entailment
  super_glue_wic   `wic sentence1: {a} sentence2: {b} word: {w}` -> False | True
(T5's *GLUE* RTE, `glue_rte`, is `rte sentence1: ... sentence2: ...`: GLUE's fields differ.)
Unlabelled (test) rows get the target `<unk>`. Metrics as T5: CB mean 3-class F1 + accuracy,
the others accuracy. MultiRC, ReCoRD and WSC (grouped or span-marking formats) are not here.

Original files: `{data_dir}/{BoolQ,CB,COPA,RTE,WiC}/{train,val,test}.jsonl` (split `val` ->
`validation`), one JSON object per line with the text fields, `label` (class name, bool or
int; absent in test) and `idx`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import seqio

from tasks import metrics
from tasks.benchmark import BenchmarkTask, label_id, register_benchmark_tasks

SUPERGLUE_DIR_ENV = "PTUNING_SUPERGLUE_DIR"
_SPLITS = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}


def read_superglue_jsonl(path: str, feature_names: Sequence[str], label_names: Sequence[str]
                         ) -> Iterator[dict[str, Any]]:
  """Raw records of one SuperGLUE jsonl file: `{feature: text, "label": id, "idx": int}`.

  Errors (bad JSON, a missing field, an unknown label) raise `ValueError("path:line: ...")`.
  """
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
      missing = [key for key in feature_names if key not in row]
      if missing:
        raise ValueError(f"{where}: missing field(s) {missing} (fields: {sorted(row)})")
      record: dict[str, Any] = {key: str(row[key]) for key in feature_names}
      record["label"] = label_id(row.get("label"), label_names, where)
      record["idx"] = int(row.get("idx", lineno - 1))
      yield record


def _spec(config: str, folder: str, feature_names: Sequence[str], label_names: Sequence[str],
          metric_fns: Sequence = (metrics.accuracy,)) -> BenchmarkTask:
  def read(path: str) -> Iterator[dict[str, Any]]:
    return read_superglue_jsonl(path, feature_names, label_names)
  return BenchmarkTask(
      name=f"super_glue_{config}", tfds_name=f"super_glue/{config}", benchmark_name=config,
      feature_names=tuple(feature_names), label_names=tuple(label_names), folder=folder,
      split_files=dict(_SPLITS), read_file=read, metric_fns=tuple(metric_fns))


SUPERGLUE_TASKS: dict[str, BenchmarkTask] = {spec.name: spec for spec in (
    _spec("boolq", "BoolQ", ("passage", "question"), ("False", "True")),
    _spec("cb", "CB", ("hypothesis", "premise"), ("entailment", "contradiction", "neutral"),
          (metrics.mean_multiclass_f1(3), metrics.accuracy)),
    _spec("copa", "COPA", ("choice1", "choice2", "premise", "question"), ("choice1", "choice2")),
    _spec("rte", "RTE", ("hypothesis", "premise"), ("entailment", "not_entailment")),
    _spec("wic", "WiC", ("sentence1", "sentence2", "word"), ("False", "True")),
)}


def register_superglue_tasks(data_dir: str | os.PathLike | None = None, *,
                             vocabulary: seqio.Vocabulary, tasks: Sequence[str] | None = None,
                             tfds_data_dir: str | None = None, rank_variant: bool = True
                             ) -> list[str]:
  """Registers SuperGLUE tasks whose data is found; returns their names (`super_glue_cb`, ...).

  `data_dir`: the SuperGLUE folder of original jsonl files (wins over TFDS); without it TFDS
  is used where prepared, else `$PTUNING_SUPERGLUE_DIR`. `tasks`: a subset of
  `SUPERGLUE_TASKS`. Every task also gets a `{name}_rank` rank-classification variant.
  """
  unknown = sorted(set(tasks or ()) - set(SUPERGLUE_TASKS))
  if unknown:
    raise ValueError(f"unknown SuperGLUE tasks {unknown}; known: {sorted(SUPERGLUE_TASKS)}")
  specs = [SUPERGLUE_TASKS[name] for name in (tasks or SUPERGLUE_TASKS)]
  return register_benchmark_tasks(specs, vocabulary, data_dir, SUPERGLUE_DIR_ENV, tfds_data_dir,
                                  rank_variant)
