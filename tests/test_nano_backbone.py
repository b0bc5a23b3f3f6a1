"""The committed nano backbone (launch/nano_t5/): it loads as the nano_t5 preset, is small, its
vocabulary is the synthetic generator's, and the documented pretraining command reproduces the
committed run (its first logged steps, within tolerance) from scratch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from ptuning.checkpoints.load import read_backbone
from ptuning.model import build
from ptuning.model.config import get_preset
from ptuning.train.compare_metrics import compare, read_metrics
from tasks import synthetic

ROOT = Path(__file__).resolve().parents[1]
NANO = ROOT / "launch" / "nano_t5"
REPRODUCED_STEPS = 100


def test_committed_backbone_is_the_nano_preset_and_small():
  params, _ = read_backbone(NANO)
  expected = {k: tuple(v.shape) for k, v in build.param_shapes(get_preset("nano_t5")).items()}
  assert {k: tuple(np.shape(v)) for k, v in params.items()} == expected
  assert all(np.all(np.isfinite(np.asarray(v))) for v in params.values())
  size = sum(f.stat().st_size for f in NANO.iterdir() if f.is_file())
  print(f"launch/nano_t5: {sum(np.size(v) for v in params.values()):,} parameters, "
        f"{size / 2**20:.2f} MiB on disk")
  assert size < 5 * 2**20


def test_committed_vocabulary_is_the_generators(tmp_path):
  synthetic.generate(tmp_path / "data", seed=0)
  assert (tmp_path / "data" / "spiece.model").read_bytes() == (NANO / "spiece.model").read_bytes()


def test_pretraining_command_reproduces_the_committed_run(tmp_path):
  """launch/nano_t5/pretrain.sh's configuration, stopped after REPRODUCED_STEPS steps (the
  schedule does not depend on TRAIN_STEPS), logs the committed losses."""
  out = tmp_path / "nano"
  env_out = {"OUT": str(out), "PY": sys.executable}
  result = subprocess.run(
      ["bash", str(NANO / "pretrain.sh"), f"--gin.TRAIN_STEPS={REPRODUCED_STEPS}",
       "--gin.ptuning.TrainConfig.eval_max_examples=8"],
      cwd=ROOT, env={**_base_env(), **env_out}, capture_output=True, text=True, timeout=900)
  assert (out / "model" / "metrics.jsonl").is_file(), result.stdout[-3000:] + result.stderr[-3000:]
  reference = {step: {k: v for k, v in m.items() if k == "train/loss"}
               for step, m in read_metrics(str(NANO / "pretrain_metrics.jsonl")).items()
               if step <= REPRODUCED_STEPS}
  rows = compare(reference, read_metrics(str(out / "model" / "metrics.jsonl")),
                 loss_rtol=1e-3, eval_atol=0.0)
  print("\n".join(rows))
  assert rows and all(row.endswith("ok") for row in rows), rows


def _base_env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the command runs as users run it: one CPU device
  return env


def test_demo_prompt_tuning_clearly_beats_zero_shot(tmp_path):
  """launch/demo.sh (the README's main job) with 100 instead of 300 prompt-tuning steps."""
  out = tmp_path / "demo"
  result = subprocess.run(["bash", str(ROOT / "launch" / "demo.sh"), "--gin.TRAIN_STEPS=100"],
                          cwd=ROOT, env={**_base_env(), "OUT": str(out), "PY": sys.executable},
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

  def final_accuracy(name):
    rows = [json.loads(line) for line in open(out / name / "metrics.jsonl")]
    return [row for row in rows if "eval/exact_match" in row][-1]["eval/exact_match"]

  zero_shot, tuned = final_accuracy("zero_shot"), final_accuracy("prompt_tuning")
  print(f"held-out topic_synb: zero-shot {zero_shot:.3f}, prompt-tuned {tuned:.3f} (chance 0.25)")
  assert "zero-shot accuracy" in result.stdout
  assert zero_shot < 0.25 and tuned > 0.9, (zero_shot, tuned)
