"""T5's GLUE/SuperGLUE metrics and postprocessors, without scikit-learn.

Metric functions take `(targets, predictions)` (SeqIO's predict-metric signature) after the
task's `postprocess_fn` has mapped both to class ids (or floats for STS-B) and return
`{name: value}` scaled to 0-100, under the names T5 reports (`accuracy`, `f1`,
`mean_3class_f1`, `matthews_corrcoef`, `pearson_corrcoef`, `spearman_corrcoef`).
A prediction that is no label name postprocesses to -1, which counts as wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.stats

MetricFn = Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]


def string_label_to_class_id(string_label: str, label_classes: Sequence[str], default: int = -1,
                             **unused_kwargs: Any) -> int:
  """T5's postprocessor: the index of `string_label` in `label_classes`, else `default`."""
  del unused_kwargs  # SeqIO passes `example=` and `is_target=`.
  return label_classes.index(string_label) if string_label in label_classes else default


def string_to_float(string: str, default: float = -1.0, **unused_kwargs: Any) -> float:
  """T5's STS-B postprocessor: `float(string)`, `default` when it does not parse."""
  del unused_kwargs
  try:
    return float(string)
  except ValueError:
    return default


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
  """`{"accuracy": 100 * fraction of predictions equal to their target}`."""
  targets, predictions = np.asarray(targets), np.asarray(predictions)
  return {"accuracy": 100.0 * float(np.mean(targets == predictions))}


def _f1_per_class(targets: np.ndarray, predictions: np.ndarray, label: int) -> float:
  """F1 of one class; 0 where precision or recall is undefined (scikit-learn's default)."""
  true_pos = float(np.sum((predictions == label) & (targets == label)))
  predicted = float(np.sum(predictions == label))
  actual = float(np.sum(targets == label))
  if true_pos == 0:
    return 0.0
  precision, recall = true_pos / predicted, true_pos / actual
  return 2 * precision * recall / (precision + recall)


def f1_score_with_invalid(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """T5's binary F1 (positive class 1); a prediction other than 0/1 counts as the wrong class."""
  targets, predictions = np.asarray(targets), np.array(predictions)
  invalid = (predictions != 0) & (predictions != 1)
  predictions[invalid] = 1 - targets[invalid]
  return {"f1": 100.0 * _f1_per_class(targets, predictions, 1)}


def mean_multiclass_f1(num_classes: int) -> MetricFn:
  """T5's `mean_{n}class_f1`: unweighted mean of the per-class F1 over classes 0..n-1."""
  def mean_f1(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    targets, predictions = np.asarray(targets), np.asarray(predictions)
    scores = [_f1_per_class(targets, predictions, label) for label in range(num_classes)]
    return {f"mean_{num_classes}class_f1": 100.0 * float(np.mean(scores))}
  mean_f1.__name__ = f"mean_{num_classes}class_f1"
  return mean_f1


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
  """100 x the (multiclass) Matthews correlation, as scikit-learn computes it (0 if undefined)."""
  targets, predictions = np.asarray(targets), np.asarray(predictions)
  labels = np.union1d(targets, predictions)
  true_counts = np.array([np.sum(targets == k) for k in labels], np.float64)
  pred_counts = np.array([np.sum(predictions == k) for k in labels], np.float64)
  n, correct = float(len(targets)), float(np.sum(targets == predictions))
  cov_tp = correct * n - true_counts @ pred_counts
  cov_pp = n * n - pred_counts @ pred_counts
  cov_tt = n * n - true_counts @ true_counts
  mcc = 0.0 if cov_pp * cov_tt == 0 else cov_tp / np.sqrt(cov_tt * cov_pp)
  return {"matthews_corrcoef": 100.0 * float(mcc)}


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
  return {"pearson_corrcoef": 100.0 * float(scipy.stats.pearsonr(targets, predictions)[0])}


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
  return {"spearman_corrcoef": 100.0 * float(scipy.stats.spearmanr(targets, predictions)[0])}
