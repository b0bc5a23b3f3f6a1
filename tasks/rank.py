"""Rank classification: score every label of an example, predict the most likely one.

The pieces follow T5/SeqIO's `rank_classification` preprocessor, postprocessor and metric:
- `expand_to_labels` (preprocessor, after the text-to-text one): each example becomes one row
  per label name, with `idx = [example index, label index]` (int32 `[2]`), the example's
  `inputs`, `targets = label name` and `is_correct` (bool; all False for unlabelled rows).
- `rank_classification_postprocess(score, example=, is_target=)`: for targets, the tuple
  `(idx, is_correct, weight=1.0, target length)` that `rank_classification` reads.
- `rank_classification(targets, scores, num_classes)`: a `(targets, scores)` SeqIO score
  metric: accuracy and F1 (binary, positive class 1) or mean per-class F1 (more classes).
- `evaluate_rank_task`: scores a registered `*_rank` task's rows with
  `ptuning.model.decoding.sequence_log_likelihood` (summed target log-probability; each input
  encoded once for all its label rows) and applies the task's score metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from tasks import metrics

# (inputs [N, L] int32, decoder input tokens [N * G, T] int32) -> logits [N * G, T, V], decoder
# rows i*G ... i*G+G-1 scored against input i (G = 1: row by row), as
# `EncoderDecoder.decode_logits` and `ptuning.train.evaluation.make_logits_fn` do.
LogitsFn = Callable[[Any, Any], Any]


def expand_to_labels(ds: tf.data.Dataset, label_names: Sequence[str]) -> tf.data.Dataset:
  """`{inputs, label, ...}` -> one `{idx, inputs, targets, is_correct}` row per label name."""
  num = len(label_names)

  def rows(index: tf.Tensor, x: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    index = tf.cast(index, tf.int32)
    return {
        "idx": tf.stack([tf.fill([num], index), tf.range(num, dtype=tf.int32)], axis=1),
        "inputs": tf.fill([num], x["inputs"]),
        "targets": tf.constant(list(label_names)),
        "is_correct": tf.equal(tf.range(num, dtype=tf.int64), tf.cast(x["label"], tf.int64)),
    }
  return ds.enumerate().map(rows, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def rank_classification_postprocess(score: Any, example: Mapping[str, Any] | None = None,
                                    is_target: bool = False) -> Any:
  """T5's rank postprocessor: targets -> `(idx, is_correct, weight, target length)`."""
  if not is_target:
    return score
  if example is None:
    raise ValueError("rank classification targets need the example (pass example=)")
  return (tuple(int(i) for i in example["idx"]), bool(example["is_correct"]),
          float(example.get("weight", 1.0)), len(example["targets"]))


def rank_classification(targets: Sequence[tuple], scores: Sequence[float],
                        num_classes: int | None = None) -> dict[str, float]:
  """Accuracy (and F1) of picking, per example, the label row with the highest score.

  `targets`: `(idx, is_correct, weight, length)` per row; `scores`: log-likelihood per row.
  With `num_classes`, every example has exactly that many rows; without it only accuracy is
  reported. Weights other than 1 weight the accuracy only.
  """
  if len(targets) != len(scores) or not targets:
    raise ValueError(f"{len(targets)} targets vs {len(scores)} scores (need equal, non-zero)")
  order = sorted(range(len(targets)), key=lambda i: tuple(targets[i][0]))
  groups: dict[int, list[int]] = {}
  for i in order:
    groups.setdefault(int(targets[i][0][0]), []).append(i)
  labels, predictions, weights, correct = [], [], [], []
  for rows in groups.values():
    if num_classes and len(rows) != num_classes:
      raise ValueError(f"example {targets[rows[0]][0][0]} has {len(rows)} rows, "
                       f"expected {num_classes}")
    best = max(range(len(rows)), key=lambda j: scores[rows[j]])
    is_correct = [bool(targets[r][1]) for r in rows]
    labels.append(is_correct.index(True) if any(is_correct) else -1)
    predictions.append(best)
    weights.append(float(targets[rows[0]][2]))
    correct.append(is_correct[best])
  weights_arr = np.asarray(weights)
  result = {"accuracy": 100.0 * float(np.sum(weights_arr * np.asarray(correct))
                                      / np.sum(weights_arr))}
  if num_classes == 2:
    result.update(metrics.f1_score_with_invalid(labels, predictions))
  elif num_classes:
    result.update(metrics.mean_multiclass_f1(num_classes)(labels, predictions))
  return result


def rank_classification_metric(num_classes: int | None) -> Callable[..., dict[str, float]]:
  """`rank_classification` bound to `num_classes`, with SeqIO's `(targets, scores)` signature."""
  def rank_metric(targets: Sequence[tuple], scores: Sequence[float]) -> dict[str, float]:
    return rank_classification(targets, scores, num_classes=num_classes)
  return rank_metric


def _pad(rows: Sequence[np.ndarray], batch: int, length: int) -> np.ndarray:
  out = np.zeros((batch, length), np.int32)
  for i, row in enumerate(rows):
    out[i, :min(len(row), length)] = row[:length]
  return out


def candidates_per_input(examples: Sequence[Mapping[str, Any]]) -> int:
  """G when the rows come in consecutive runs with the same `inputs` (a rank task's label rows
  of one example; runs of different lengths padded to the longest), else 1
  (`ptuning.scoring.candidate_group_size`)."""
  from ptuning.scoring import candidate_group_size  # jax/flax only when scoring.
  return candidate_group_size(_input_keys(examples))


def _input_keys(examples: Sequence[Mapping[str, Any]]) -> list[tuple[int, ...]]:
  return [tuple(np.asarray(ex["inputs"]).tolist()) for ex in examples]


def score_examples(examples: Sequence[Mapping[str, Any]], logits_fn: LogitsFn,
                   task_feature_lengths: Mapping[str, int], batch_size: int = 32) -> np.ndarray:
  """Summed log p(targets | inputs) `[num_examples]` of tokenised examples.

  `logits_fn` is a `LogitsFn`; for a trained run `ptuning.train.evaluation.make_logits_fn(exp,
  params)` (its method and mode token, as in training). Rows that come as candidates of one
  input (`candidates_per_input`: G) are scored with that input encoded once: each call passes
  `batch_size // G` inputs and G candidate slots each. Padding slots (smaller groups, the last
  batch) are empty rows whose scores are dropped.
  """
  from ptuning.model import decoding  # jax/flax only when scoring.
  from ptuning.scoring import candidate_batches, scatter_scores

  def run(batch):
    inputs = _pad([examples[r]["inputs"] for r in batch.inputs], batch.num_inputs,
                  task_feature_lengths["inputs"])
    targets = _pad([examples[r]["targets"] if r >= 0 else np.zeros(0, np.int32)
                    for r in batch.targets], batch.num_rows, task_feature_lengths["targets"])
    logits = logits_fn(inputs, decoding.shift_right(targets))
    return batch, np.asarray(decoding.sequence_log_likelihood(logits, targets))
  return scatter_scores(map(run, candidate_batches(_input_keys(examples), batch_size)),
                        len(examples))


def evaluate_rank_task(task_name: str, split: str, task_feature_lengths: Mapping[str, int],
                       logits_fn: LogitsFn, batch_size: int = 32) -> dict[str, float]:
  """Scores every row of a rank task's split and returns its score metrics (`{name: value}`)."""
  from ptuning.data.batches import make_eval_examples

  task = seqio.get_mixture_or_task(task_name)
  if not isinstance(task, seqio.Task) or not task.score_metric_fns:
    raise ValueError(f"{task_name!r} is not a task with score metrics (a *_rank task)")
  examples = make_eval_examples(task_name, split, task_feature_lengths)
  if not examples:
    raise ValueError(f"split {split!r} of {task_name!r} is empty")
  scores = score_examples(examples, logits_fn, task_feature_lengths, batch_size)
  targets = [task.postprocess_fn(None, example=ex, is_target=True) for ex in examples]
  results = {}
  for metric_fn in task.score_metric_fns:
    results.update({name: float(value) for name, value in metric_fn(targets, list(scores)).items()})
  return results
