"""The one trainer loop (train), plus eval and infer over the same experiment.

Train: restore the latest checkpoint of `model_dir` if there is one (trainable state + data
iterator position), else initialise; then step, log one line per `log_every` steps (step, loss,
learning rate, steps/s, tokens/s, ETA) to stdout, TensorBoard and `metrics.jsonl`, evaluate every
`eval_every` steps and at the end, checkpoint every `checkpoint_every` steps, at the end, and on
SIGTERM (preemption: finish the step, save, exit cleanly).
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax

from ptuning import distributed, param_tree, sharding
from ptuning.checkpoints.train_state import TrainCheckpointer
from ptuning.data.batches import make_batch_iterator
from ptuning.sharding import to_global_batch
from ptuning.train.evaluation import evaluate
from ptuning.train.experiment import Experiment, TrainConfig, build_experiment
from ptuning.vocab import get_vocabulary


class MetricsWriter:
  """metrics.jsonl + TensorBoard in the model dir, written by process 0 only."""

  def __init__(self, model_dir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      os.makedirs(model_dir, exist_ok=True)
      self._jsonl = open(os.path.join(model_dir, "metrics.jsonl"), "a", encoding="utf-8")
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(model_dir, "tensorboard"))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class PreemptionFlag:
  """Set by SIGTERM; the loop checks it after each step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def run_signature(exp: Experiment) -> str:
  """What a resumed run must share with the checkpoints it resumes: method, trainable shapes and
  (when set) the mode token ids and position, which change every encoder input."""
  shapes = {p: list(v.shape) for p, v in param_tree.flatten(exp.trainable_init).items()}
  signature = {"method": getattr(exp.method, "name", "full_finetuning"), "trainable": shapes}
  mode = exp.spec.mode_token
  if mode is not None and mode.ids:  # absent otherwise: earlier runs' signatures still match
    signature["mode_token"] = {"ids": list(mode.ids), "position": mode.position}
  return json.dumps(signature, sort_keys=True)


def _log(*parts: Any) -> None:
  if jax.process_index() == 0:
    print(*parts, flush=True)


def train(config: TrainConfig, exp: Experiment | None = None) -> dict[str, Any]:
  """Runs (or resumes) training; returns the final metrics (train and eval).

  `exp`: the experiment built from `config`, when the caller needs it afterwards (ProMoT reads
  the frozen prompt of stage 2); default `build_experiment(config)`.
  """
  exp = build_experiment(config) if exp is None else exp
  vocab = get_vocabulary(config.vocabulary_path) if config.vocabulary_path else None
  data = make_batch_iterator(config.mixture_or_task_name, config.task_feature_lengths,
                             config.batch_size, seed=config.seed, vocabulary=vocab,
                             global_batches=config.global_batches)
  checkpointer = TrainCheckpointer(os.path.join(config.model_dir, "checkpoints"),
                                   max_to_keep=config.keep_checkpoints)
  meta = {"run_signature": run_signature(exp), "backbone": exp.backbone_path,
          "model": str(exp.model)}
  if checkpointer.latest_step() is not None:
    state, data_state, _ = checkpointer.restore(exp.abstract_state, exp.state_shardings)
    data.restore(data_state)
    _log(f"resumed from step {int(state.step)} in {config.model_dir}")
  else:
    state = exp.init_state()
  writer = MetricsWriter(config.model_dir)
  preemption = PreemptionFlag()
  step_fn, rng = None, jax.random.key(config.seed + 1)
  schedule_lr = lambda s: float(exp.schedule(s))
  last = {"time": time.perf_counter(), "step": int(state.step), "tokens": 0}
  metrics: dict[str, Any] = {}
  step = int(state.step)
  try:
    while step < config.train_steps:
      local = next(data)
      last["tokens"] += int((local["encoder_input_tokens"] > 0).sum()
                            + (local["decoder_target_tokens"] > 0).sum()
                            ) * (config.batch_size // len(local["encoder_input_tokens"]))
      batch = to_global_batch(local, exp.mesh, global_batch_size=config.batch_size)
      if step_fn is None:
        step_fn = exp.train_step_fn(batch)
      with sharding.activate(exp.mesh, exp.rules):  # activation constraints apply when traced
        state, step_metrics = step_fn(state, exp.frozen, batch, rng)
      step += 1
      stop = distributed.any_process(preemption.requested)  # all processes stop at one step
      if step % config.log_every == 0 or step == config.train_steps:
        metrics = _train_log_line(step, step_metrics, last, config, schedule_lr)
        writer.write(step, metrics)
      if config.eval_every and step % config.eval_every == 0 and step < config.train_steps:
        writer.write(step, _eval(exp, state, config, vocab))
      if step % config.checkpoint_every == 0 or step == config.train_steps or stop:
        checkpointer.save(step, state, data.state(), meta, force=True)
        _log(f"saved checkpoint step {step}")
      if stop:
        print(f"SIGTERM: saved step {step}, exiting (process {jax.process_index()})", flush=True)
        return {"preempted_at": step, **metrics}
    eval_metrics = _eval(exp, state, config, vocab)
    writer.write(step, eval_metrics)
    return dict(metrics, **eval_metrics)
  finally:
    preemption.restore()
    writer.close()
    checkpointer.close()


def _train_log_line(step, step_metrics, last, config, schedule_lr) -> dict[str, float]:
  host = jax.device_get(step_metrics)
  now = time.perf_counter()
  steps_per_s = (step - last["step"]) / max(now - last["time"], 1e-9)
  tokens_per_s = last["tokens"] / max(now - last["time"], 1e-9)
  eta = (config.train_steps - step) / max(steps_per_s, 1e-9)
  loss = float(host["loss"])
  metrics = {"train/loss": loss, "train/z_loss": float(host["z_loss"]),
             "train/accuracy": float(host["correct"]) / max(float(host["weight_sum"]), 1.0),
             "train/grad_norm": float(host["grad_norm"]), "train/learning_rate": schedule_lr(step),
             "perf/steps_per_second": steps_per_s, "perf/tokens_per_second": tokens_per_s}
  _log(f"step {step:>6d}/{config.train_steps}  loss {loss:.4f}  lr {metrics['train/learning_rate']:.3g}"
       f"  {steps_per_s:.2f} steps/s  {tokens_per_s:,.0f} tokens/s  ETA {eta:,.0f}s")
  last.update(time=now, step=step, tokens=0)
  return metrics


def _eval(exp: Experiment, state, config: TrainConfig, vocab) -> dict[str, float]:
  if vocab is None:
    return {}
  results = evaluate(exp, exp.full_params(state), config, vocab)
  _log("eval  " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
  return results


def restore_params(config: TrainConfig, exp: Experiment | None = None):
  """The experiment and its full parameter tree with the latest trained state (eval / infer)."""
  exp = exp or build_experiment(config)
  checkpointer = TrainCheckpointer(os.path.join(config.model_dir, "checkpoints"))
  try:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {config.model_dir}/checkpoints to evaluate")
    state, _, _ = checkpointer.restore(exp.abstract_state, exp.state_shardings)
  finally:
    checkpointer.close()
  return exp, exp.full_params(state)


def run_eval(config: TrainConfig) -> dict[str, float]:
  exp, params = restore_params(config)
  vocab = get_vocabulary(config.vocabulary_path)
  results = evaluate(exp, params, config, vocab)
  _log("eval  " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
  return results


def run_infer(config: TrainConfig, output_path: str) -> int:
  from ptuning.train.evaluation import predict
  from ptuning.scoring import write_jsonl_atomically
  exp, params = restore_params(config)
  vocab = get_vocabulary(config.vocabulary_path)
  rows = predict(exp, params, config, vocab)
  if jax.process_index() == 0:  # every process decodes the same rows; one writes them
    write_jsonl_atomically(output_path, rows)
  _log(f"wrote {len(rows)} predictions to {output_path}")
  return len(rows)

