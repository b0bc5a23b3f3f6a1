"""`ptuning pretrain`: the whole backbone trains on UL2's mixture of denoisers through the one
trainer, the loss falls, and the exported HF checkpoint is exactly the trained backbone."""

import json

import numpy as np
import pytest

from ptuning import cli
from ptuning.checkpoints.load import backbone_arrays
from ptuning.checkpoints.train_state import read_trainable_params
from ptuning.prompts.vanilla import PromptTuning
from ptuning.train.experiment import TrainConfig
from ptuning.train.pretrain import check_pretraining_config

STEPS = 40


def losses(model_dir):
  rows = [json.loads(line) for line in open(model_dir / "metrics.jsonl")]
  return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shared_data):
  """40 steps of runs/pretrain.gin on tiny_t5_1_1 over 3,000 lines of tiny-shakespeare."""
  tmp = tmp_path_factory.mktemp("pretrain")
  text = tmp / "shakespeare.txt"
  lines = (shared_data / "text/tinyshakespeare_input.txt").read_text().splitlines()[:3000]
  text.write_text("\n".join(lines) + "\n")
  model_dir = tmp / "model"
  assert cli.main([
      "pretrain", "--gin_file=runs/train.gin", "--gin_file=runs/pretrain.gin",
      "--gin_file=models/tiny_t5_1_1.gin", f"--gin.MODEL_DIR='{model_dir}'",
      f"--gin.PRETRAIN_TEXT_FILES=['{text}']",
      f"--gin.VOCABULARY_PATH='{shared_data / 't5_vocab/spiece.model'}'",
      "--gin.UL2_MIXTURE_NAME='ul2_pretrain_test'", "--gin.INPUTS_LENGTH=64",
      "--gin.TARGETS_LENGTH=32", f"--gin.TRAIN_STEPS={STEPS}", "--gin.BATCH_SIZE=8",
      "--gin.tasks.ul2_mixture.merge_texts=4",
      "--gin.WARMUP_STEPS=10", "--gin.LOG_PERIOD=10", "--gin.CHECKPOINT_PERIOD=1000",
      "--gin.OPTIMIZER='adamw'", "--gin.LEARNING_RATE=0.03",
      "--gin.PRETRAIN_OPTIMIZER_KWARGS={'weight_decay': 0.0}",
      "--gin.ptuning.TrainConfig.eval_max_examples=16"]) == 0
  return model_dir


def test_pretraining_lowers_the_loss(pretrained):
  loss = losses(pretrained)
  print("UL2 pretraining loss by step:", {k: round(v, 3) for k, v in loss.items()})
  assert sorted(loss) == list(range(10, STEPS + 1, 10))
  assert loss[STEPS] < 0.8 * loss[10], loss


def test_export_is_the_trained_backbone_and_every_parameter_trained(pretrained, shared_data):
  exported = backbone_arrays(pretrained / "backbone")
  trained = read_trainable_params(pretrained / "checkpoints")
  assert set(trained) == {f"backbone/{name}" for name in exported}  # all of it is trainable
  for name, array in exported.items():
    np.testing.assert_array_equal(array, trained[f"backbone/{name}"], err_msg=name)
  assert ((pretrained / "backbone" / "spiece.model").read_bytes()
          == (shared_data / "t5_vocab/spiece.model").read_bytes())


def test_pretrain_refuses_configs_that_do_not_train_the_backbone(tmp_path):
  with pytest.raises(ValueError, match="method"):
    check_pretraining_config(TrainConfig(model_dir=str(tmp_path), model="tiny_t5_1_1",
                                         method=PromptTuning()))
  with pytest.raises(ValueError, match="trainable_pattern"):
    check_pretraining_config(TrainConfig(model_dir=str(tmp_path), model="tiny_t5_1_1",
                                         method=None, trainable_pattern="^backbone/encoder/"))
  with pytest.raises(ValueError, match="MODEL"):
    check_pretraining_config(TrainConfig(model_dir=str(tmp_path), method=None))
