"""`ptuning pretrain`: full-parameter training of the backbone through the one trainer.

Pretraining is the trainer with no prompt method and the whole backbone trainable
(`TrainConfig.method = None`, trainable rule `^backbone/`), started from a random backbone of
the `MODEL` preset (or from `INITIAL_CHECKPOINT_PATH`, to continue pretraining), usually on a
UL2 mixture of denoisers (`gin_configs/runs/pretrain.gin`). Checkpoints, resumption, SIGTERM and
evaluation are the trainer's. At the end the trained backbone is exported as a Hugging Face
checkpoint (`config.json` + `model.safetensors`, plus the run's `spiece.model`) in
`{MODEL_DIR}/backbone`, which `INITIAL_CHECKPOINT_PATH` of a prompt-tuning run (and
transformers) loads directly.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax

from ptuning.checkpoints.hf import write_hf_checkpoint
from ptuning.model import build
from ptuning.train import loop
from ptuning.train.experiment import Experiment, TrainConfig, build_experiment

EXPORT_DIR = "backbone"


def check_pretraining_config(config: TrainConfig) -> None:
  """Pretraining trains the backbone itself: no method, and a rule that selects the backbone."""
  if config.method is not None:
    raise ValueError(f"pretrain trains the backbone, but ptuning.TrainConfig.method is "
                     f"{type(config.method).__name__}: use gin_configs/runs/pretrain.gin "
                     "(method = None)")
  if config.trainable_pattern not in (None, "^backbone/", r"^backbone/"):
    raise ValueError(f"pretrain trains every backbone parameter; trainable_pattern "
                     f"{config.trainable_pattern!r} is not '^backbone/'")
  if not config.initial_checkpoint_path and config.model is None:
    raise ValueError("pretrain needs MODEL (a preset name, e.g. 'nano_t5') for a random "
                     "backbone, or INITIAL_CHECKPOINT_PATH to continue pretraining")


def export_backbone(exp: Experiment, params: Any, directory: str,
                    vocabulary_path: str | None) -> str:
  """Writes the backbone of `params` (full tree) as an HF checkpoint in `directory`; its path."""
  flat = build.host_params(params["backbone"])
  if jax.process_index() == 0:
    write_hf_checkpoint(flat, exp.model.replace(scan_layers=False, remat_policy="none",
                                                dropout_rate=0.0), directory)
    if vocabulary_path:
      shutil.copyfile(vocabulary_path, os.path.join(directory, "spiece.model"))
  return directory


def run(config: TrainConfig) -> dict[str, Any]:
  """Trains (or resumes) the backbone, then exports it; returns the final metrics."""
  check_pretraining_config(config)
  exp = build_experiment(config)
  metrics = loop.train(config, exp)
  if "preempted_at" in metrics:
    return metrics
  exp, params = loop.restore_params(config, exp)
  directory = export_backbone(exp, params, os.path.join(config.model_dir, EXPORT_DIR),
                              config.vocabulary_path)
  print(f"exported the pretrained backbone to {directory}", flush=True)
  return metrics
