"""GLUE as SeqIO tasks in T5's text-to-text format (`glue_sst2`, `glue_rte`, ... + `_rank`).

Formats (T5's `preprocessors.glue`, text fields sorted by name unless T5 fixes an order):
  glue_cola  `cola sentence: {s}`                          -> unacceptable | acceptable
  glue_sst2  `sst2 sentence: {s}`                          -> negative | positive
  glue_mrpc  `mrpc sentence1: {a} sentence2: {b}`          -> not_equivalent | equivalent
  glue_qqp   `qqp question1: {a} question2: {b}`           -> not_duplicate | duplicate
  glue_stsb  `stsb sentence1: {a} sentence2: {b}`          -> score rounded to 0.2, e.g. `3.8`
  glue_mnli  `mnli hypothesis: {h} premise: {p}`           -> entailment | neutral | contradiction
  glue_qnli  `qnli question: {q} sentence: {s}`            -> entailment | not_entailment
  glue_rte   `rte sentence1: {a} sentence2: {b}`           -> entailment | not_entailment
  glue_wnli  `wnli sentence1: {a} sentence2: {b}`          -> not_entailment | entailment
Unlabelled (test) rows get the target `<unk>`. Metrics as T5: CoLA Matthews correlation;
MRPC/QQP F1 + accuracy; STS-B Pearson + Spearman; the rest accuracy.

Original files: `{data_dir}/{CoLA,SST-2,MRPC,QQP,STS-B,MNLI,QNLI,RTE,WNLI}/` with
`train.tsv`, `dev.tsv` (split `validation`), `test.tsv`; MNLI has `dev_matched.tsv`,
`dev_mismatched.tsv`, `test_matched.tsv`, `test_mismatched.tsv` (splits
`validation_matched`, ...). They are read as TFDS reads them (tab-separated, no quoting,
header row except CoLA train/dev; `idx` = row number).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import seqio

from tasks import metrics
from tasks.benchmark import BenchmarkTask, label_id, register_benchmark_tasks

GLUE_DIR_ENV = "PTUNING_GLUE_DIR"
_SPLITS = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}
_MNLI_SPLITS = {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                "validation_mismatched": "dev_mismatched.tsv",
                "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv"}
_COLA_COLUMNS = ("source", "label", "original_label", "sentence")


def read_glue_tsv(path: str, columns: Mapping[str, str], label_column: str,
                  label_names: Sequence[str], fieldnames: Sequence[str] | None = None
                  ) -> Iterator[dict[str, Any]]:
  """Raw records of one GLUE TSV file: `{feature: text, "label": id or float, "idx": row}`.

  `columns`: feature -> TSV column; `fieldnames`: the columns of a file without a header row.
  Rows with missing fields are skipped (as TFDS does); a label that is no class name and no
  number raises `ValueError("path:line: ...")`.
  """
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE, fieldnames=fieldnames)
    for idx, row in enumerate(reader):
      where = f"{path}:{reader.line_num}"
      record = {feature: row.get(column) for feature, column in columns.items()}
      if any(value is None for value in record.values()):
        continue
      raw_label = row.get(label_column)
      if not label_names:
        try:
          record["label"] = float(raw_label) if raw_label not in (None, "") else -1.0
        except ValueError:
          raise ValueError(f"{where}: score {raw_label!r} is not a number") from None
      else:
        record["label"] = label_id(raw_label, label_names, where)
      record["idx"] = idx
      yield record


def _spec(config: str, folder: str, columns: Mapping[str, str], label_column: str,
          label_names: Sequence[str], metric_fns: Sequence, splits: Mapping[str, str] = _SPLITS,
          headerless: Sequence[str] | None = None) -> BenchmarkTask:
  """`headerless`: the columns of this task's train/dev files, which have no header row."""
  def read(path: str) -> Iterator[dict[str, Any]]:
    test_file = os.path.basename(path).startswith("test")
    return read_glue_tsv(path, columns, label_column, label_names,
                         None if test_file else headerless)
  return BenchmarkTask(
      name=f"glue_{config}", tfds_name=f"glue/{config}", benchmark_name=config,
      feature_names=tuple(sorted(columns)), label_names=tuple(label_names),
      folder=folder, split_files=dict(splits), read_file=read, metric_fns=tuple(metric_fns))


_ACC = (metrics.accuracy,)
_F1_ACC = (metrics.f1_score_with_invalid, metrics.accuracy)
_PAIR = {"sentence1": "sentence1", "sentence2": "sentence2"}
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, BenchmarkTask] = {spec.name: spec for spec in (
    _spec("cola", "CoLA", {"sentence": "sentence"}, "label",
          ("unacceptable", "acceptable"), (metrics.matthews_corrcoef,), headerless=_COLA_COLUMNS),
    _spec("sst2", "SST-2", {"sentence": "sentence"}, "label", ("negative", "positive"), _ACC),
    _spec("mrpc", "MRPC", {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality",
          ("not_equivalent", "equivalent"), _F1_ACC),
    _spec("qqp", "QQP", {"question1": "question1", "question2": "question2"}, "is_duplicate",
          ("not_duplicate", "duplicate"), _F1_ACC),
    _spec("stsb", "STS-B", _PAIR, "score", (),
          (metrics.pearson_corrcoef, metrics.spearman_corrcoef)),
    _spec("mnli", "MNLI", {"premise": "sentence1", "hypothesis": "sentence2"}, "gold_label",
          ("entailment", "neutral", "contradiction"), _ACC, splits=_MNLI_SPLITS),
    _spec("qnli", "QNLI", {"question": "question", "sentence": "sentence"}, "label", _NLI2, _ACC),
    _spec("rte", "RTE", _PAIR, "label", _NLI2, _ACC),
    _spec("wnli", "WNLI", _PAIR, "label", ("not_entailment", "entailment"), _ACC),
)}


def register_glue_tasks(data_dir: str | os.PathLike | None = None, *,
                        vocabulary: seqio.Vocabulary, tasks: Sequence[str] | None = None,
                        tfds_data_dir: str | None = None, rank_variant: bool = True) -> list[str]:
  """Registers GLUE tasks whose data is found; returns their names (`glue_sst2`, ...).

  `data_dir`: the GLUE folder of original TSVs (wins over TFDS); without it TFDS is used
  where prepared (`tfds_data_dir`, default `$TFDS_DATA_DIR` or ~/tensorflow_datasets), else
  `$PTUNING_GLUE_DIR`. `tasks`: a subset of `GLUE_TASKS` (e.g. `["glue_sst2"]`).
  Classification tasks also get a `{name}_rank` rank-classification variant.
  """
  unknown = sorted(set(tasks or ()) - set(GLUE_TASKS))
  if unknown:
    raise ValueError(f"unknown GLUE tasks {unknown}; known: {sorted(GLUE_TASKS)}")
  specs = [GLUE_TASKS[name] for name in (tasks or GLUE_TASKS)]
  return register_benchmark_tasks(specs, vocabulary, data_dir, GLUE_DIR_ENV, tfds_data_dir,
                                  rank_variant)
