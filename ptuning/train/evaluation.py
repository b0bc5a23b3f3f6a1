"""Evaluation and inference: prompted decoding with the KV cache, SeqIO metrics, predictions.

`predict` decodes every example of `config.eval_split` (greedy, beam or sampling, per
`config.decode_method`); `evaluate` adds the task's SeqIO metric functions (on postprocessed
targets and predictions) and exact-match accuracy.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import seqio

from ptuning.data.batches import make_eval_examples
from ptuning.data.jsonl import resolve_task
from ptuning.model import search
from ptuning.prompts.method import prompted_encode
from ptuning.train.experiment import Experiment, TrainConfig


def eval_task_name(config: TrainConfig) -> str:
  return config.eval_mixture_or_task_name or config.mixture_or_task_name


def _pad_rows(rows: list[np.ndarray], batch: int, length: int) -> np.ndarray:
  out = np.zeros((batch, length), np.int32)
  for i, row in enumerate(rows):
    out[i, :min(len(row), length)] = row[:length]
  return out


def make_decode_fn(exp: Experiment, max_decode_length: int, method: str, **kwargs):
  """jit: (full params, input tokens `[B, L]`) -> output ids `[B, max_decode_length]`."""
  @jax.jit
  def decode(params, tokens):
    encoded, mask = prompted_encode(exp.model, exp.method, params, tokens)
    return search.decode(exp.model, params["backbone"], encoded, mask, max_decode_length,
                         method=method, **kwargs)
  return decode


def _text(ids: np.ndarray, vocab: seqio.Vocabulary) -> str:
  ids = [int(t) for t in ids]
  if vocab.eos_id in ids:
    ids = ids[:ids.index(vocab.eos_id)]
  return vocab.decode([t for t in ids if t > 0])


def predict(exp: Experiment, params: Any, config: TrainConfig, vocab: seqio.Vocabulary,
            **decode_kwargs) -> list[dict[str, Any]]:
  """One row per example: inputs, targets (text when the task keeps it) and the prediction."""
  examples = make_eval_examples(eval_task_name(config), config.eval_split,
                                config.task_feature_lengths, vocab)
  if config.eval_max_examples:
    examples = examples[:config.eval_max_examples]
  if not examples:
    raise ValueError(f"split {config.eval_split!r} of {eval_task_name(config)!r} is empty")
  max_len = config.max_decode_length or config.task_feature_lengths["targets"]
  decode = make_decode_fn(exp, max_len, config.decode_method, **decode_kwargs)
  rows = []
  batch = config.batch_size
  for start in range(0, len(examples), batch):
    chunk = examples[start:start + batch]
    tokens = _pad_rows([ex["inputs"] for ex in chunk], batch, config.task_feature_lengths["inputs"])
    outputs = np.asarray(decode(params, tokens))
    for ex, ids in zip(chunk, outputs):
      rows.append({
          "inputs": ex.get("inputs_pretokenized", _text(ex["inputs"], vocab)),
          "targets": ex.get("targets_pretokenized", _text(ex["targets"], vocab)),
          "prediction": _text(ids, vocab)})
  return rows


def evaluate(exp: Experiment, params: Any, config: TrainConfig, vocab: seqio.Vocabulary
             ) -> dict[str, float]:
  rows = predict(exp, params, config, vocab)
  task = seqio.get_mixture_or_task(resolve_task(eval_task_name(config), vocab))
  results = {"eval/exact_match": float(np.mean([r["prediction"] == r["targets"] for r in rows])),
             "eval/examples": float(len(rows))}
  tasks = task.tasks if isinstance(task, seqio.Mixture) else [task]
  for sub in tasks:
    postprocess = functools.partial(sub.postprocess_fn or (lambda x, **_: x), is_target=False)
    target_post = functools.partial(sub.postprocess_fn or (lambda x, **_: x), is_target=True)
    targets = [target_post(r["targets"]) for r in rows]
    predictions = [postprocess(r["prediction"]) for r in rows]
    for metric_fn in sub.metric_fns:
      for name, value in metric_fn(targets, predictions).items():
        value = value.value if hasattr(value, "value") else value
        results[f"eval/{sub.name}/{name}"] = float(value)
  return results
