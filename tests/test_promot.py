"""ProMoT (`ptuning promot`, methods/promot.gin): one command trains a prompt (stage 1), then
fine-tunes the backbone with that prompt frozen (stage 2); each stage resumes on its own."""

import json

import numpy as np
import pytest

from ptuning import cli, param_tree
from ptuning.checkpoints.train_state import read_trainable_params
from ptuning.train import promot
from ptuning.train.experiment import build_experiment
from task_files import write_task

LENGTHS = {"inputs": 16, "targets": 4}




def promot_args(model_dir, task, other, vocab, stage2_steps):
  return ["promot", "--gin_file=runs/train.gin", "--gin_file=methods/promot.gin",
          "--gin_file=partitioning/data2_model4.gin", f"--gin.MODEL_DIR={model_dir}",
          f"--gin.MIXTURE_OR_TASK_NAME={task}", "--gin.MODEL=tiny_t5_1_1",
          f"--gin.VOCABULARY_PATH={vocab}", f"--gin.TASK_FEATURE_LENGTHS={LENGTHS!r}",
          "--gin.BATCH_SIZE=8", "--gin.PROMPT_LENGTH=5", "--gin.STAGE1_STEPS=4",
          f"--gin.STAGE2_STEPS={stage2_steps}", "--gin.STAGE2_LEARNING_RATE=0.01",
          f"--gin.PROMOT_OTHER_TASKS=[{str(other)!r}]", "--gin.DROPOUT_RATE=0.0",
          "--gin.LOG_PERIOD=1", "--gin.CHECKPOINT_PERIOD=100", "--gin.EVAL_SPLIT=train",
          "--gin.ptuning.TrainConfig.eval_max_examples=8"]


def train_losses(model_dir):
  lines = [json.loads(l) for l in (model_dir / "metrics.jsonl").read_text().splitlines()]
  return [m["train/loss"] for m in lines if "train/loss" in m]


def test_promot_two_stages_one_command_frozen_prompt_and_resume(tmp_path, shared_data, capsys):
  task, other = write_task(tmp_path / "t.jsonl"), write_task(tmp_path / "other.jsonl", seed=1)
  vocab = shared_data / "t5_vocab/spiece.model"
  run = tmp_path / "run"
  # First launch: both stages, stage 2 cut short at 6 of its 12 steps (as by a preemption).
  assert cli.main(promot_args(run, task, other, vocab, stage2_steps=6)) == 0
  first = capsys.readouterr().out
  assert promot.latest_step(str(run / "stage1")) == 4
  assert promot.latest_step(str(run / "stage2")) == 6
  stage1_metrics = (run / "stage1/metrics.jsonl").read_text()

  # Relaunch with the full schedule: stage 1 is skipped, stage 2 resumes from its step 6.
  assert cli.main(promot_args(run, task, other, vocab, stage2_steps=12)) == 0
  second = capsys.readouterr().out
  assert f"{run / 'stage1'} already finished (step 4), skipping" in second
  assert f"resumed from step 6 in {run / 'stage2'}" in second
  assert (run / "stage1/metrics.jsonl").read_text() == stage1_metrics
  assert promot.latest_step(str(run / "stage2")) == 12

  # Stage 2 trained with stage 1's final prompt, bit for bit, and never changed it.
  stage1_prompt = read_trainable_params(run / "stage1/checkpoints")["prompt/prompt"]
  stage2_prompt = np.load(run / "stage2" / promot.FROZEN_PROMPT_FILE)
  assert stage2_prompt.dtype == stage1_prompt.dtype == np.float32
  np.testing.assert_array_equal(stage2_prompt, stage1_prompt)
  # Stage 2's checkpoints hold the backbone (and only it); every leaf moved away from the
  # pretrained backbone that stage 1 kept frozen.
  stage2_params = read_trainable_params(run / "stage2/checkpoints")
  config, promot_config = promot.load_config(*_gin(promot_args(run, task, other, vocab, 12)))
  stage1_config, _ = promot.stage_configs(config, promot_config)
  pretrained = param_tree.flatten(build_experiment(stage1_config).frozen)
  assert set(stage2_params) == set(pretrained) and all(p.startswith("backbone/") for p in pretrained)
  unchanged = [p for p, v in stage2_params.items() if np.array_equal(v, np.asarray(pretrained[p]))]
  assert unchanged == []
  # Stage 2 learns the task: its loss falls over the 12 steps (two launches).
  losses = train_losses(run / "stage2")
  assert len(losses) == 12
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses

  # The evaluation: the task with the prompt, the other task without it.
  report = json.loads((run / promot.EVAL_FILE).read_text())
  assert report["step"] == 12 and report["eval/examples"] == 8
  assert "eval/exact_match" in report
  assert report["eval_without_prompt/other/examples"] == 8
  assert "eval_without_prompt/other/exact_match" in report
  assert "ProMoT eval" in first and "ProMoT eval" in second

  # A finished run relaunched: both stages skipped, only evaluated.
  assert cli.main(promot_args(run, task, other, vocab, stage2_steps=12)) == 0
  third = capsys.readouterr().out
  assert "resumed from" not in third and third.count("already finished") == 2
  assert promot.latest_step(str(run / "stage2")) == 12


def _gin(argv):
  from ptuning.gin_setup import parse
  files, bindings, _ = parse(argv)
  return files, bindings


def test_promot_needs_a_prompt_method(tmp_path):
  from ptuning.train.experiment import TrainConfig
  with pytest.raises(ValueError, match="soft-prompt method"):
    promot.stage_configs(TrainConfig(model_dir=str(tmp_path), method=None), promot.ProMoTConfig())
