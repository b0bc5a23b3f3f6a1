"""ProMoT (Wang et al., ICLR 2024): prompt tuning, then model tuning with that prompt frozen.

Stage 1 trains a soft prompt `prompt/prompt [P, E]` on the frozen backbone (vanilla prompt
tuning). Stage 2 starts again from the *pretrained* backbone, attaches stage 1's final prompt
(frozen, bit for bit) and fine-tunes every backbone parameter (trainable `^backbone/`). The idea
of the paper: the prompt absorbs the task's format, so the fine-tuned backbone specialises less
and keeps its in-context / other-task abilities. The fine-tuned task is therefore evaluated
*with* the prompt, other tasks *without* it (`method=None`, backbone from stage 2).

One launch runs both stages (`ptuning promot --gin_file=runs/train.gin
--gin_file=methods/promot.gin ...`):

  MODEL_DIR/stage1/            a prompt-tuning run (`STAGE1_STEPS`, `LEARNING_RATE`, ...)
  MODEL_DIR/stage2/            a fine-tuning run (`STAGE2_STEPS`, `STAGE2_LEARNING_RATE`,
                               `STAGE2_OPTIMIZER_KWARGS`); its checkpoints hold the backbone
  MODEL_DIR/stage2/frozen_prompt.npy   the prompt stage 2 trained with (== stage 1's output)
  MODEL_DIR/promot_eval.json   the final evaluation (also appended to stage2/metrics.jsonl)

Each stage resumes from its own checkpoints; a stage whose latest checkpoint has reached its
step count is skipped, so rerunning the command after a preemption continues where it stopped
(and rerunning a finished run only evaluates). A preempted stage 1 never starts stage 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import numpy as np

from ptuning.checkpoints.train_state import TrainCheckpointer, _to_host
from ptuning.prompts import initializers
from ptuning.train import loop
from ptuning.train.evaluation import evaluate
from ptuning.train.experiment import Experiment, TrainConfig, build_experiment
from ptuning.vocab import get_vocabulary

STAGE1, STAGE2 = "stage1", "stage2"
PROMPT_KEY = "prompt/prompt"
FROZEN_PROMPT_FILE = "frozen_prompt.npy"
EVAL_FILE = "promot_eval.json"
# T5X fine-tuning (t5x/configs/runs/finetune.gin + t5_1_1/*.gin): Adafactor with parameter
# scaling, no weight decay, constant learning rate 1e-3 (see gin_configs/methods/full_finetuning.gin).
FINETUNE_LEARNING_RATE = 1e-3
FINETUNE_ADAFACTOR = {"multiply_by_parameter_scale": True, "weight_decay": 0.0}


@dataclasses.dataclass
class ProMoTConfig:
  """The two-stage schedule; everything else comes from the run's `TrainConfig`."""

  stage1_steps: int = 1000
  stage2_steps: int = 1000
  stage2_learning_rate: float = FINETUNE_LEARNING_RATE
  stage2_optimizer_kwargs: dict = dataclasses.field(
      default_factory=lambda: dict(FINETUNE_ADAFACTOR))
  other_tasks: Sequence[str] = ()  # evaluated without the prompt after stage 2


def stage_configs(base: TrainConfig, promot: ProMoTConfig) -> tuple[TrainConfig, TrainConfig]:
  """(stage 1, stage 2) configs derived from the run's config.

  Stage 2's method still carries `base.method`'s initialiser: `with_stage1_prompt` swaps in the
  stage 1 prompt once stage 1 has finished.
  """
  if base.method is None or not hasattr(base.method, "initializer"):
    raise ValueError("ProMoT needs a soft-prompt method with an `initializer` (methods/promot.gin "
                     f"binds PromptTuning); got method={base.method!r}")
  if promot.stage1_steps <= 0 or promot.stage2_steps <= 0:
    raise ValueError(f"STAGE1_STEPS={promot.stage1_steps} and STAGE2_STEPS={promot.stage2_steps} "
                     "must both be positive")
  stage1 = dataclasses.replace(base, model_dir=os.path.join(base.model_dir, STAGE1),
                               train_steps=promot.stage1_steps, trainable_pattern=None)
  stage2 = dataclasses.replace(base, model_dir=os.path.join(base.model_dir, STAGE2),
                               train_steps=promot.stage2_steps,
                               learning_rate=promot.stage2_learning_rate,
                               optimizer_kwargs=dict(promot.stage2_optimizer_kwargs),
                               group_learning_rates={}, trainable_pattern=r"^backbone/")
  return stage1, stage2


def checkpoint_dir(model_dir: str) -> str:
  return os.path.join(model_dir, "checkpoints")


def with_stage1_prompt(stage2: TrainConfig, stage1_model_dir: str) -> TrainConfig:
  """Stage 2's config whose prompt is initialised from stage 1's latest checkpoint."""
  init = initializers.from_file(checkpoint_dir(stage1_model_dir), key=PROMPT_KEY)
  return dataclasses.replace(stage2, method=dataclasses.replace(stage2.method, initializer=init))


def latest_step(model_dir: str) -> int | None:
  """Newest committed training step of a run directory, or None."""
  directory = checkpoint_dir(model_dir)
  if not os.path.isdir(directory):
    return None
  with TrainCheckpointer(directory, max_to_keep=None) as checkpointer:
    return checkpointer.latest_step()


def _finished(config: TrainConfig) -> bool:
  step = latest_step(config.model_dir)
  if step is not None and step >= config.train_steps:
    loop._log(f"ProMoT: {config.model_dir} already finished (step {step}), skipping")
    return True
  return False


def _save_npy(path: str, array: np.ndarray) -> None:
  """Atomic np.save (process 0 only)."""
  if jax.process_index() != 0:
    return
  tmp = f"{path}.tmp-{os.getpid()}.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


def _task_label(task: str) -> str:
  base = os.path.basename(task)
  return base[:-len(".jsonl")] if base.endswith(".jsonl") else task


def evaluate_promot(stage2: TrainConfig, other_tasks: Sequence[str],
                    with_prompt: dict[str, float] | None = None,
                    exp: Experiment | None = None) -> dict[str, float]:
  """Evaluates stage 2's latest checkpoint (`exp`: stage 2's experiment, if already built).

  The fine-tuned task runs with the frozen prompt (keys `eval/...`, as `ptuning eval`; pass
  `with_prompt` when they are already known). Each of `other_tasks` runs without it
  (`method=None`, the stage 2 backbone): keys `eval_without_prompt/{task}/...`.
  """
  if not stage2.vocabulary_path:
    return {}
  if with_prompt is not None and not other_tasks:
    return dict(with_prompt)
  vocab = get_vocabulary(stage2.vocabulary_path)
  exp, params = loop.restore_params(stage2, exp)
  results = dict(with_prompt) if with_prompt is not None else evaluate(exp, params, stage2, vocab)
  if other_tasks:
    bare = dataclasses.replace(exp, method=None, spec=dataclasses.replace(exp.spec, method=None))
    backbone = {"backbone": params["backbone"]}
    for task in other_tasks:
      config = dataclasses.replace(stage2, eval_mixture_or_task_name=task)
      for name, value in evaluate(bare, backbone, config, vocab).items():
        results[name.replace("eval/", f"eval_without_prompt/{_task_label(task)}/", 1)] = value
  loop._log("ProMoT eval  " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))
  return results


def run(base: TrainConfig, promot: ProMoTConfig) -> dict[str, Any]:
  """Runs (or resumes) both stages and the final evaluation.

  Returns {'stage1': metrics, 'stage2': metrics, 'eval': metrics} (a skipped stage has {}), or,
  when a stage was preempted, its metrics with 'preempted_at' and no later stage.
  """
  stage1, stage2 = stage_configs(base, promot)
  results: dict[str, Any] = {"stage1": {}, "stage2": {}}
  if not _finished(stage1):
    results["stage1"] = loop.train(stage1)
    if "preempted_at" in results["stage1"]:
      return results
  stage2 = with_stage1_prompt(stage2, stage1.model_dir)
  with_prompt, exp = None, None
  if not _finished(stage2):
    exp = build_experiment(stage2)
    results["stage2"] = loop.train(stage2, exp)
    # The prompt stage 2 trained with (frozen: never donated, never updated).
    _save_npy(os.path.join(stage2.model_dir, FROZEN_PROMPT_FILE),
              _to_host(exp.frozen["prompt"]["prompt"]))
    if "preempted_at" in results["stage2"]:
      return results
    with_prompt = {k: v for k, v in results["stage2"].items() if k.startswith("eval/")} or None
  results["eval"] = evaluate_promot(stage2, promot.other_tasks, with_prompt, exp)
  without_prompt = {k: v for k, v in results["eval"].items() if k.startswith("eval_without_prompt/")}
  if without_prompt:
    writer = loop.MetricsWriter(stage2.model_dir)
    writer.write(stage2.train_steps, without_prompt)
    writer.close()
  if results["eval"] and jax.process_index() == 0:
    with open(os.path.join(base.model_dir, EVAL_FILE), "w", encoding="utf-8") as f:
      json.dump({"step": stage2.train_steps, **results["eval"]}, f, indent=1, sort_keys=True)
  return results


_GIN_CONFIGURABLE: list = []


def load_config(gin_files: Sequence[str], bindings: Sequence[str]
                ) -> tuple[TrainConfig, ProMoTConfig]:
  """Parses gin (the CLI edge: gin is imported only here) into (run config, ProMoT config)."""
  import gin
  from ptuning import gin_setup
  if not _GIN_CONFIGURABLE:
    _GIN_CONFIGURABLE.append(gin.external_configurable(ProMoTConfig, module="ptuning"))
  config = gin_setup.load_config(gin_files, bindings)
  return config, _GIN_CONFIGURABLE[0]()
