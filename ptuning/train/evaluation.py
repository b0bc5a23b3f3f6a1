"""Evaluation and inference: prompted decoding with the KV cache, SeqIO metrics, predictions.

`predict` decodes every example of `config.eval_split` (greedy, beam or sampling, per
`config.decode_method`); `evaluate` adds the task's SeqIO metric functions (on postprocessed
targets and predictions) and exact-match accuracy.

Task ids (multitask prompts): when training ran on a SeqIO mixture, every evaluated example
carries its task's index in the training mixture's task list (as the training batches do), and
`decode` passes `task_ids [B]` to the method; see `eval_task_names`.

Mode tokens (UL2 '[NLU]', ...): decoding and `make_logits_fn` (rank scoring) use the run's
`exp.spec.mode_token`, so they see the encoder input the train step saw.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import seqio

from ptuning.data.batches import make_eval_examples
from ptuning.data.jsonl import resolve_task
from ptuning.data.task_ids import TASK_ID_FEATURE, task_names_of
from ptuning.model import search
from ptuning.prompts.method import prompted_encode, prompted_logits
from ptuning.train.experiment import Experiment, TrainConfig


def eval_task_name(config: TrainConfig) -> str:
  return config.eval_mixture_or_task_name or config.mixture_or_task_name


def eval_task_names(config: TrainConfig, vocab: seqio.Vocabulary | None) -> list[str] | None:
  """The training mixture's task list when every evaluated task is in it (evaluation then uses
  training's task ids), else None (a mixture is then tagged by its own task list)."""
  if not config.mixture_or_task_name:
    return None
  train = resolve_task(config.mixture_or_task_name, vocab)
  if not isinstance(seqio.get_mixture_or_task(train), seqio.Mixture):
    return None
  names = task_names_of(train)
  evaluated = task_names_of(resolve_task(eval_task_name(config), vocab))
  return names if set(evaluated) <= set(names) else None


def _pad_rows(rows: list[np.ndarray], batch: int, length: int) -> np.ndarray:
  out = np.zeros((batch, length), np.int32)
  for i, row in enumerate(rows):
    out[i, :min(len(row), length)] = row[:length]
  return out


def make_decode_fn(exp: Experiment, max_decode_length: int, method: str, **kwargs):
  """jit: (full params, input tokens `[B, L]`, task ids `[B]` | None) -> output ids
  `[B, max_decode_length]`."""
  @jax.jit
  def decode(params, tokens, task_ids=None):
    encoded, mask = prompted_encode(exp.model, exp.method, params, tokens, task_ids=task_ids,
                                    mode_token=exp.spec.mode_token)
    return search.decode(exp.model, params["backbone"], encoded, mask, max_decode_length,
                         method=method, **kwargs)
  return decode


def make_logits_fn(exp: Experiment, params: Any, task_ids: Any = None):
  """(input tokens `[N, L]`, decoder input tokens `[N * G, T]`) -> teacher-forced logits
  `[N * G, T, V]` of the prompted model (method and mode token as trained), jitted: the
  `logits_fn` of tasks/rank.py's scoring (decoder rows `i * G ... i * G + G - 1` are candidates
  of input `i`, which is encoded once). `task_ids [N]` (multitask methods, one per input)
  applies to every call."""
  logits = jax.jit(lambda p, x, d, t: prompted_logits(exp.model, exp.method, p, x, d,
                                                      task_ids=t, mode_token=exp.spec.mode_token))
  return lambda tokens, decoder_input_tokens: logits(params, tokens, decoder_input_tokens, task_ids)


def _text(ids: np.ndarray, vocab: seqio.Vocabulary) -> str:
  ids = [int(t) for t in ids]
  if vocab.eos_id in ids:
    ids = ids[:ids.index(vocab.eos_id)]
  return vocab.decode([t for t in ids if t > 0])


def predict(exp: Experiment, params: Any, config: TrainConfig, vocab: seqio.Vocabulary,
            **decode_kwargs) -> list[dict[str, Any]]:
  """One row per example: inputs, targets (text when the task keeps it) and the prediction."""
  examples = make_eval_examples(eval_task_name(config), config.eval_split,
                                config.task_feature_lengths, vocab,
                                task_names=eval_task_names(config, vocab))
  if config.eval_max_examples:
    examples = examples[:config.eval_max_examples]
  if not examples:
    raise ValueError(f"split {config.eval_split!r} of {eval_task_name(config)!r} is empty")
  max_len = config.max_decode_length or config.task_feature_lengths["targets"]
  decode = make_decode_fn(exp, max_len, config.decode_method, **decode_kwargs)
  names = eval_task_names(config, vocab) or task_names_of(resolve_task(eval_task_name(config), vocab))
  rows = []
  batch = config.batch_size
  for start in range(0, len(examples), batch):
    chunk = examples[start:start + batch]
    tokens = _pad_rows([ex["inputs"] for ex in chunk], batch, config.task_feature_lengths["inputs"])
    task_ids = None
    if all(TASK_ID_FEATURE in ex for ex in chunk):
      task_ids = np.zeros(batch, np.int32)
      task_ids[:len(chunk)] = [ex[TASK_ID_FEATURE] for ex in chunk]
    outputs = np.asarray(decode(params, tokens, task_ids))
    for ex, ids in zip(chunk, outputs):
      row = {"inputs": ex.get("inputs_pretokenized", _text(ex["inputs"], vocab)),
             "targets": ex.get("targets_pretokenized", _text(ex["targets"], vocab)),
             "prediction": _text(ids, vocab)}
      if TASK_ID_FEATURE in ex:
        row["task"] = names[int(ex[TASK_ID_FEATURE])]
      rows.append(row)
  return rows


def evaluate(exp: Experiment, params: Any, config: TrainConfig, vocab: seqio.Vocabulary
             ) -> dict[str, float]:
  rows = predict(exp, params, config, vocab)
  task = seqio.get_mixture_or_task(resolve_task(eval_task_name(config), vocab))
  results = {"eval/exact_match": float(np.mean([r["prediction"] == r["targets"] for r in rows])),
             "eval/examples": float(len(rows))}
  tasks = task.tasks if isinstance(task, seqio.Mixture) else [task]
  for sub in tasks:
    # A mixture's task is scored on its own rows only; score-based metrics (rank
    # classification) need per-candidate scores, see tasks/rank.py's evaluate_rank_task.
    own = [r for r in rows if r.get("task", sub.name) == sub.name]
    if not own:
      continue
    postprocess = functools.partial(sub.postprocess_fn or (lambda x, **_: x), is_target=False)
    target_post = functools.partial(sub.postprocess_fn or (lambda x, **_: x), is_target=True)
    targets = [target_post(r["targets"]) for r in own]
    predictions = [postprocess(r["prediction"]) for r in own]
    for metric_fn in getattr(sub, "predict_metric_fns", sub.metric_fns):
      for name, value in metric_fn(targets, predictions).items():
        value = value.value if hasattr(value, "value") else value
        results[f"eval/{sub.name}/{name}"] = float(value)
  return results
