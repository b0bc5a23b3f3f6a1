"""Prompt-tuning training invariants: only the prompt changes, sharded == single device, the step
compiles once, kill-and-resume equals an uninterrupted run, and bad input fails clearly."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ptuning import gin_setup, param_tree, sharding
from ptuning.checkpoints import t5x
from ptuning.data.batches import make_batch_iterator
from ptuning.prompts import initializers
from ptuning.prompts.vanilla import PromptTuning
from ptuning.sharding import to_global_batch
from ptuning.train import loop
from ptuning.train.experiment import TrainConfig, build_experiment
from ptuning.vocab import get_vocabulary
from task_files import write_task

REPO = Path(__file__).resolve().parents[1]
LENGTHS = {"inputs": 16, "targets": 4}




def tiny_config(tmp_path, shared_data, **overrides) -> TrainConfig:
  fields = dict(model_dir=str(tmp_path / "run"), mixture_or_task_name=str(write_task(tmp_path / "t.jsonl")),
                model="tiny_t5_1_1", vocabulary_path=str(shared_data / "t5_vocab/spiece.model"),
                method=PromptTuning(length=5), task_feature_lengths=LENGTHS, batch_size=8,
                train_steps=4, log_every=2, checkpoint_every=2, eval_split="train",
                eval_max_examples=8, dropout_rate=0.1)
  fields.update(overrides)
  return TrainConfig(**fields)


def batches(config, n):
  vocab = get_vocabulary(config.vocabulary_path)
  it = make_batch_iterator(config.mixture_or_task_name, LENGTHS, config.batch_size, vocabulary=vocab)
  return [next(it) for _ in range(n)]


def test_one_sharded_update_changes_only_the_prompt(tmp_path, shared_data):
  checkpoint = shared_data / "t5x_checkpoints/t5_1_1_tiny/checkpoint_3"
  config = tiny_config(tmp_path, shared_data, model=None, initial_checkpoint_path=str(checkpoint),
                       mesh=sharding.MeshConfig(data=4, model=2))
  exp = build_experiment(config)
  state = exp.init_state()
  prompt_before = np.asarray(state.params["prompt"]["prompt"])
  batch = to_global_batch(batches(config, 1)[0], exp.mesh)
  state, metrics = exp.train_step_fn(batch)(state, exp.frozen, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
  # The prompt moved; every backbone leaf equals the stored checkpoint array bit for bit.
  assert not np.array_equal(np.asarray(state.params["prompt"]["prompt"]), prompt_before)
  assert set(param_tree.flatten(state.params)) == {"prompt/prompt"}
  stored = t5x.read_t5x_checkpoint(checkpoint)
  frozen = param_tree.flatten(exp.frozen)
  assert set(frozen) == {f"backbone/{k}" for k in stored}
  for key, array in stored.items():
    np.testing.assert_array_equal(np.asarray(frozen[f"backbone/{key}"]), array, err_msg=key)
  # Optimizer state exists only for the prompt: no slot is shaped like a backbone parameter.
  slots = [leaf for leaf in jax.tree.leaves(state.opt_state) if getattr(leaf, "ndim", 0) >= 1]
  assert slots and sum(s.size for s in slots) <= 2 * prompt_before.size
  assert state.params["prompt"]["prompt"].sharding.mesh.shape == {"data": 4, "model": 2}


def test_sharded_training_matches_single_device_and_compiles_once(tmp_path, shared_data):
  losses = {}
  for name, mesh in (("one", sharding.MeshConfig(data=1, model=1)),
                     ("eight", sharding.MeshConfig(data=2, model=4))):
    config = tiny_config(tmp_path, shared_data, mesh=mesh)
    exp = build_experiment(config, devices=jax.devices()[:mesh.data * mesh.model])
    state = exp.init_state()
    step_fn, run = None, []
    for local in batches(config, 4):
      batch = to_global_batch(local, exp.mesh)
      step_fn = step_fn or exp.train_step_fn(batch)
      state, metrics = step_fn(state, exp.frozen, batch, jax.random.key(1))
      run.append(float(metrics["loss"]))
    assert step_fn._cache_size() == 1  # four different batches, one compilation
    losses[name] = run
  assert losses["one"][0] != losses["one"][-1]
  np.testing.assert_allclose(losses["eight"], losses["one"], rtol=2e-5)


def _train_command(model_dir, task, vocab, steps):
  return [sys.executable, "-m", "ptuning", "train", "--gin_file=runs/train.gin",
          "--gin_file=methods/prompt_tuning.gin", f"--gin.MODEL_DIR={model_dir}",
          f"--gin.MIXTURE_OR_TASK_NAME={task}", "--gin.MODEL=tiny_t5_1_1",
          f"--gin.VOCABULARY_PATH={vocab}", f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8",
          f"--gin.TASK_FEATURE_LENGTHS={LENGTHS!r}", "--gin.PROMPT_LENGTH=5",
          "--gin.CHECKPOINT_PERIOD=5", "--gin.LOG_PERIOD=50", "--gin.EVAL_SPLIT=train",
          "--gin.DROPOUT_RATE=0.1"]


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(tmp_path, shared_data):
  task = write_task(tmp_path / "t.jsonl")
  vocab = shared_data / "t5_vocab/spiece.model"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONUNBUFFERED="1")
  steps = 150
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_train_command(killed, task, vocab, steps), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:  # event driven: kill right after the first checkpoint lands
    if line.startswith("saved checkpoint step 5"):
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resumed = subprocess.run(_train_command(killed, task, vocab, steps), cwd=REPO, env=env,
                           capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  resumed_from = int(resumed.stdout.split("resumed from step ")[1].split()[0])
  assert 5 <= resumed_from < steps
  straight = subprocess.run(_train_command(tmp_path / "straight", task, vocab, steps), cwd=REPO,
                            env=env, capture_output=True, text=True)
  assert straight.returncode == 0, straight.stderr
  final = lambda d: np.load(d / "checkpoints/prompts/latest/prompt.prompt.npy")
  np.testing.assert_array_equal(final(killed), final(tmp_path / "straight"))


def test_real_pretrained_prompt_loads_as_initial_prompt(shared_data):
  path = shared_data / "pretrained_prompts/t5_1_1_lm100k_base/sst2.npy"
  array = np.load(path)
  init = initializers.from_file(path)
  prompt = init(jax.random.key(0), None, (100, 768))
  np.testing.assert_array_equal(np.asarray(prompt), array)
  with pytest.raises(ValueError, match=r"sst2.npy.*\(100, 768\).*\(50, 768\)"):
    init(jax.random.key(0), None, (50, 768))


def test_bad_inputs_fail_clearly(tmp_path, shared_data):
  with pytest.raises(ValueError, match="unknown gin binding 'TRAIN_STEPZ'"):
    gin_setup.load_config(["runs/train.gin", "methods/prompt_tuning.gin"], ["TRAIN_STEPZ = 5"])
  # A prompt file of the wrong shape names the file and both shapes.
  np.save(tmp_path / "p.npy", np.zeros((3, 32), np.float32))
  config = tiny_config(tmp_path, shared_data, method=PromptTuning(
      length=5, initializer=initializers.from_file(tmp_path / "p.npy")))
  with pytest.raises(ValueError, match=r"p.npy.*\(3, 32\).*\(5, 32\)"):
    build_experiment(config)
  # A backbone whose width does not match the configured model.
  config = tiny_config(tmp_path, shared_data, model="t5_1_1_small",
                       initial_checkpoint_path=str(shared_data / "t5x_checkpoints/t5_1_1_tiny/checkpoint_3"))
  with pytest.raises(ValueError, match="d_model: config 512 vs checkpoint 4"):
    build_experiment(config)
  # A jsonl line without targets: file and line number; the run dir keeps no partial state.
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"inputs": "a", "targets": "b"}\n{"inputs": "c"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2.*targets"):
    loop.train(tiny_config(tmp_path, shared_data, mixture_or_task_name=str(bad)))
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  with pytest.raises(ValueError, match="empty|no example"):
    loop.train(tiny_config(tmp_path, shared_data, mixture_or_task_name=str(empty),
                           model_dir=str(tmp_path / "run_empty")))


def test_train_resume_eval_infer_round_trip(tmp_path, shared_data):
  config = tiny_config(tmp_path, shared_data, train_steps=4)
  first = loop.train(config)
  assert "train/loss" in first and "eval/exact_match" in first
  ckpt_files = [p for p in (tmp_path / "run/checkpoints").rglob("*") if p.is_file()]
  assert sum(p.stat().st_size for p in ckpt_files) < 1_000_000  # KBs, not the backbone
  again = loop.train(config.__class__(**{**config.__dict__, "train_steps": 6}))
  assert "train/loss" in again
  assert loop.run_infer(config, str(tmp_path / "pred.jsonl")) == 8
  rows = [json.loads(l) for l in (tmp_path / "pred.jsonl").read_text().splitlines()]
  assert {"inputs", "targets", "prediction"} <= set(rows[0])
  metrics = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics if "train/loss" in m] == [2, 4, 6]
