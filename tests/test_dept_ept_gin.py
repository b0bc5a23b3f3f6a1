"""DePT and EPT through the gin path of vanilla prompt tuning: runs/train.gin + methods/dept.gin
(or ept.gin) with their own optimizer set-up (AdamW, two learning-rate groups), `loop.train` ->
checkpoint -> `loop.train` resumed with more steps -> `loop.run_infer`."""

import json

import numpy as np
import pytest

from ptuning import gin_setup
from ptuning.prompts.dept import DePT
from ptuning.prompts.ept import EPT
from ptuning.train import loop
from test_train import LENGTHS, write_task


def _gin_config(gin_file: str, tmp_path, shared_data, steps: int, extra=()):
  task = tmp_path / "t.jsonl"
  if not task.exists():
    write_task(task)
  vocab = shared_data / "t5_vocab/spiece.model"
  bindings = [f"MODEL_DIR = '{tmp_path / 'run'}'", f"MIXTURE_OR_TASK_NAME = '{task}'",
              "MODEL = 'tiny_t5_1_1'", f"VOCABULARY_PATH = '{vocab}'",
              f"TRAIN_STEPS = {steps}", "BATCH_SIZE = 8", f"TASK_FEATURE_LENGTHS = {LENGTHS!r}",
              "PROMPT_LENGTH = 5", "LOWRANK_RANK = 4", "LOWRANK_MAX_LENGTH = 16",
              "WARMUP_STEPS = 0", "LOG_PERIOD = 1", "CHECKPOINT_PERIOD = 100",
              "EVAL_SPLIT = 'train'", "ptuning.TrainConfig.eval_max_examples = 8", *extra]
  return gin_setup.load_config(["runs/train.gin", gin_file], bindings)


@pytest.mark.parametrize("name", ["dept", "ept"])
def test_gin_train_resume_infer_round_trip(name, tmp_path, shared_data):
  extra = ("EPT_NUM_SPACES = 2", "EPT_SPACE_WIDTH = 4") if name == "ept" else ()
  config = _gin_config(f"methods/{name}.gin", tmp_path, shared_data, 2, extra)
  assert type(config.method) is {"dept": DePT, "ept": EPT}[name]
  assert (config.method.length, config.method.rank, config.method.max_length) == (5, 4, 16)
  assert config.optimizer == "adamw" and config.learning_rate == 0.3
  assert config.group_learning_rates["^prompt/lowrank_"] == 1e-4
  assert "eval/exact_match" in loop.train(config)
  more = _gin_config(f"methods/{name}.gin", tmp_path, shared_data, 3, extra)
  assert "eval/exact_match" in loop.train(more)
  rows = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]  # resumed at step 2
  latest = tmp_path / "run/checkpoints/prompts/latest"
  expected = {"prompt.prompt.npy", "prompt.lowrank_a.npy", "prompt.lowrank_b.npy"}
  if name == "ept":
    expected |= {"prompt.proj_down.npy", "prompt.proj_up.npy", "prompt.gate.npy"}
  assert {p.name for p in latest.iterdir()} == expected
  assert np.abs(np.load(latest / "prompt.lowrank_b.npy")).max() > 0  # B (init 0) trained
  assert loop.run_infer(more, str(tmp_path / "pred.jsonl")) == 8
  predictions = [json.loads(l) for l in (tmp_path / "pred.jsonl").read_text().splitlines()]
  assert {"inputs", "targets", "prediction"} <= set(predictions[0])
