"""Multi-process runs on localhost through launch/local_multiprocess.sh (2 processes x 4 fake CPU
devices = one (data=2, model=4) mesh): same losses as one process with 8 devices, checkpoints
move between process counts, SIGTERM to one process stops both at the same step; plus the
replica axis, the FSDP rules, the runtime's configuration and the launch scripts' syntax."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ptuning import distributed, gin_setup, sharding
from ptuning.data.batches import make_batch_iterator
from ptuning.prompts.vanilla import PromptTuning
from ptuning.sharding import to_global_batch
from ptuning.train import loop
from ptuning.train.experiment import TrainConfig, build_experiment
from ptuning.vocab import get_vocabulary
from task_files import write_task

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launch" / "local_multiprocess.sh"
LENGTHS = {"inputs": 16, "targets": 4}
STEPS = 8
TIMEOUT = 240  # seconds for one launch; a hung collective fails the test instead of CI




def train_args(model_dir, task, vocab, steps, partitioning="partitioning/data2_model4.gin",
               *extra) -> list[str]:
  return ["train", "--gin_file=runs/train.gin", "--gin_file=methods/prompt_tuning.gin",
          f"--gin_file={partitioning}", f"--gin.MODEL_DIR={model_dir}",
          f"--gin.MIXTURE_OR_TASK_NAME={task}", "--gin.MODEL=tiny_t5_1_1",
          f"--gin.VOCABULARY_PATH={vocab}", f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=8",
          f"--gin.TASK_FEATURE_LENGTHS={LENGTHS!r}", "--gin.PROMPT_LENGTH=5",
          "--gin.CHECKPOINT_PERIOD=100", "--gin.LOG_PERIOD=1", "--gin.EVAL_SPLIT=train",
          "--gin.ptuning.TrainConfig.eval_max_examples=8", "--gin.DROPOUT_RATE=0.1", *extra]


def launch(args: list[str], num_processes: int = 2, devices: int = 4) -> subprocess.Popen:
  env = dict(os.environ, NUM_PROCESSES=str(num_processes), DEVICES_PER_PROCESS=str(devices),
             PY=sys.executable)
  return subprocess.Popen(["bash", str(LAUNCHER), *args], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen) -> str:
  try:
    out, _ = proc.communicate(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f"launch timed out:\n{out[-4000:]}")
  assert proc.returncode == 0, out[-4000:]
  return out


def in_process_train(args: list[str]) -> dict:
  """The same `ptuning train` run in this (single, 8-device) process."""
  files, bindings, _ = gin_setup.parse(args[1:])
  return loop.train(gin_setup.load_config(files, bindings))


def train_losses(model_dir: Path) -> list[float]:
  rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  return [row["train/loss"] for row in rows if "train/loss" in row]


def final_prompt(model_dir: Path) -> np.ndarray:
  return np.load(model_dir / "checkpoints/prompts/latest/prompt.prompt.npy")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
  root = tmp_path_factory.mktemp("multihost")
  task = write_task(root / "t.jsonl")
  vocab = shared_data / "t5_vocab/spiece.model"
  out = finish(launch(train_args(root / "two", task, vocab, STEPS)))  # uninterrupted, 2 processes
  assert "launched process 1" in out and f"[process 0] step {STEPS:>6d}/{STEPS}" in out
  return root, task, vocab


def test_two_processes_equal_one_and_checkpoints_move_between_process_counts(setup, capsys):
  root, task, vocab = setup
  in_process_train(train_args(root / "one", task, vocab, STEPS))
  two, one = train_losses(root / "two"), train_losses(root / "one")
  assert len(two) == STEPS and two[0] != two[-1]
  np.testing.assert_allclose(two, one, rtol=1e-5)
  np.testing.assert_allclose(final_prompt(root / "two"), final_prompt(root / "one"), atol=1e-5)

  # Two processes' checkpoint -> one process; one process's -> two processes, on a hybrid
  # (replica=2 over the processes) x data x model mesh this time.
  shutil.copytree(root / "two", root / "two_then_one")
  shutil.copytree(root / "one", root / "one_then_two")
  capsys.readouterr()
  in_process_train(train_args(root / "two_then_one", task, vocab, STEPS + 2))
  assert f"resumed from step {STEPS}" in capsys.readouterr().out
  out = finish(launch(train_args(root / "one_then_two", task, vocab, STEPS + 2,
                                 "partitioning/multislice.gin", "--gin.MODEL_PARALLEL=2")))
  assert f"[process 0] resumed from step {STEPS}" in out
  np.testing.assert_allclose(train_losses(root / "one_then_two")[-2:],
                             train_losses(root / "two_then_one")[-2:], rtol=1e-5)
  np.testing.assert_allclose(final_prompt(root / "one_then_two"),
                             final_prompt(root / "two_then_one"), atol=1e-5)


def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_is_exact(setup):
  root, task, vocab = setup
  proc = launch(train_args(root / "stopped", task, vocab, STEPS))
  pids, lines = {}, []
  for line in proc.stdout:  # event driven: SIGTERM to process 1 once process 0 logs step 2
    lines.append(line)
    if line.startswith("launched process"):
      pids[int(line.split()[2])] = int(line.split()[4])
    if line.startswith("[process 0] step      2/"):
      os.kill(pids[1], signal.SIGTERM)
      break
  out = "".join(lines) + finish(proc)
  saved = {line.split("] ", 1)[0]: int(line.split("saved step ")[1].split(",")[0])
           for line in out.splitlines() if "SIGTERM: saved step" in line}
  assert set(saved) == {"[process 0", "[process 1"}, out[-4000:]
  assert len(set(saved.values())) == 1 and 2 <= saved["[process 0"] < STEPS, saved
  assert sorted(int(p.name) for p in (root / "stopped/checkpoints").iterdir()
                if p.name.isdigit()) == [saved["[process 0"]]

  out = finish(launch(train_args(root / "stopped", task, vocab, STEPS)))
  assert f"[process 0] resumed from step {saved['[process 0']}" in out
  np.testing.assert_array_equal(final_prompt(root / "stopped"), final_prompt(root / "two"))


def test_replica_axis_and_fsdp_rules_train_like_one_device(tmp_path, shared_data):
  config = sharding.MeshConfig(data=2, model=2, replica=2, rules="fsdp")
  rules = dict(sharding.rules_for(config))
  assert rules["batch"] == ("replica", "data") and rules["embed"] == ("replica", "data")
  assert dict(sharding.rules_for(sharding.MeshConfig(replica=2, rules="2d")))["embed"] == "data"
  assert sharding.rules_for(sharding.MeshConfig(rules="fsdp")) == sharding.PARAMETER_SHARDED_RULES
  assert sharding.parse_mesh_spec("replica=2,data=2,model=2") == sharding.MeshConfig(2, 2, replica=2)
  with pytest.raises(ValueError, match="replica=3"):
    sharding.make_mesh(sharding.MeshConfig(replica=3))

  task = write_task(tmp_path / "t.jsonl")
  vocab_path = str(shared_data / "t5_vocab/spiece.model")
  batches = make_batch_iterator(str(task), LENGTHS, 8, vocabulary=get_vocabulary(vocab_path),
                                global_batches=True)
  batches = [next(batches) for _ in range(3)]
  losses = {}
  for name, mesh in (("one", sharding.MeshConfig(data=1, model=1)), ("replica", config)):
    exp = build_experiment(TrainConfig(
        model_dir=str(tmp_path), model="tiny_t5_1_1", method=PromptTuning(length=5),
        task_feature_lengths=LENGTHS, batch_size=8, mesh=mesh),
        devices=jax.devices()[:8 if name == "replica" else 1])
    state, step_fn, losses[name] = exp.init_state(), None, []
    for local in batches:
      batch = to_global_batch(local, exp.mesh, global_batch_size=8)
      step_fn = step_fn or exp.train_step_fn(batch)
      state, metrics = step_fn(state, exp.frozen, batch, jax.random.key(1))
      losses[name].append(float(metrics["loss"]))
    if name == "replica":
      assert exp.mesh.axis_names == ("replica", "data", "model")
      assert batch["encoder_input_tokens"].sharding.spec[0] == ("replica", "data")
      embedding = exp.frozen["backbone"]["token_embedder"]["embedding"]
      assert embedding.sharding.spec == jax.sharding.PartitionSpec("model", ("replica", "data"))
  np.testing.assert_allclose(losses["replica"], losses["one"], rtol=2e-5)


def test_distributed_configuration_from_flags_environment_and_clusters(monkeypatch):
  assert distributed.resolve(environ={}) is None  # single process: nothing to start
  assert distributed.resolve("h:1", 2, 1, environ={}) == dict(
      coordinator_address="h:1", num_processes=2, process_id=1)
  env = {"PTUNING_COORDINATOR": "h:2", "PTUNING_NUM_PROCESSES": "4", "PTUNING_PROCESS_ID": "3"}
  assert distributed.resolve(environ=env)["process_id"] == 3
  assert distributed.resolve(process_id=0, environ=env)["process_id"] == 0  # flags win
  with pytest.raises(ValueError, match="num_processes"):
    distributed.resolve("h:1", environ={})
  with pytest.raises(ValueError, match="not in"):
    distributed.resolve("h:1", 2, 2, environ={})
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
           "SLURM_NNODES": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
           "SLURM_GPUS_ON_NODE": "8"}
  assert distributed.detect_cluster(slurm) == "slurm"
  assert distributed.resolve(environ=slurm) == {"local_device_ids": list(range(8))}
  assert distributed.resolve(environ={**slurm, "SLURM_NTASKS": "16"}) == {}  # one per GPU
  assert distributed.resolve(environ={**slurm, "SLURM_NTASKS": "1"}) is None
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == "tpu"
  assert distributed.any_process(True) and not distributed.any_process(False)
  assert not distributed.initialize()  # this test process: single-process, a no-op


@pytest.mark.parametrize("script", ["local_multiprocess.sh", "tpu_pod.sh", "slurm_gpu.sbatch",
                                    "demo.sh"])
def test_launch_scripts_parse(script):
  path = REPO / "launch" / script
  assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
  if shutil.which("shellcheck"):  # optional: not a test dependency
    result = subprocess.run(["shellcheck", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
  header = path.read_text().split("set -euo pipefail")[0]
  for name in {"local_multiprocess.sh": ("NUM_PROCESSES", "DEVICES_PER_PROCESS", "COORDINATOR_PORT"),
               "tpu_pod.sh": ("TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "ACTION"),
               "slurm_gpu.sbatch": ("PROCESSES_PER", "COORDINATOR_PORT", "PTUNING_DIR"),
               "demo.sh": ()}[script]:
    assert name in header, f"{script} does not document {name} at its top"


def test_tpu_pod_launcher_runs_the_command_on_the_workers_with_the_compilation_cache(tmp_path):
  """launch/tpu_pod.sh against a stand-in `gcloud` that runs the ssh command in a local
  directory: the arguments arrive intact (spaces, quotes) and JAX_COMPILATION_CACHE_DIR is
  passed on to the workers."""
  bin_dir, remote = tmp_path / "bin", tmp_path / "home" / "ptuning"
  (remote / ".venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  fake_python = remote / ".venv" / "bin" / "python"
  fake_python.write_text('#!/usr/bin/env bash\nprintf "cache=%s\\n" "$JAX_COMPILATION_CACHE_DIR"\n'
                         'printf "arg=%s\\n" "$@"\n')
  gcloud = bin_dir / "gcloud"  # describe: the VM exists; scp: no-op; ssh: runs the run command
  gcloud.write_text('#!/usr/bin/env bash\necho "$*" >> "$HOME/gcloud.log"\n'
                    'for a in "$@"; do case $a in --command=*"-m ptuning"*) '
                    'cd "$HOME" && env -i HOME="$HOME" PATH="$PATH" bash -c "${a#--command=}";; '
                    'esac; done\n')  # a worker's shell: none of the local environment
  for script in (fake_python, gcloud):
    script.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", HOME=str(tmp_path / "home"),
             TPU_NAME="pt-test", ZONE="us-central2-b", LOG_FILE=str(tmp_path / "run.log"),
             JAX_COMPILATION_CACHE_DIR="gs://bucket/xla cache")
  result = subprocess.run(["bash", str(LAUNCHER.parent / "tpu_pod.sh"), "train",
                           "--gin.MODEL_DIR=gs://bucket/run", "--gin.NAME='a b'"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  out = (tmp_path / "run.log").read_text().splitlines()
  assert out[-6:] == ["cache=gs://bucket/xla cache", "arg=-m", "arg=ptuning", "arg=train",
                      "arg=--gin.MODEL_DIR=gs://bucket/run", "arg=--gin.NAME='a b'"], out
  assert "reusing TPU VM pt-test" in result.stdout
  assert (tmp_path / "home" / "ptuning.pid").is_file()
