"""Training checkpoints: round trip on a mesh, retention, .npy exports, safety checks."""

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ptuning import sharding
from ptuning.checkpoints import train_state as ts
from ptuning.checkpoints.train_state import TrainCheckpointer, TrainState
from ptuning.train import optim

META = {"backbone": "/models/t5_1_1_base", "method": "prompt", "model": {"d_model": 32},
        "run_signature": {"model": "t5_1_1_base", "method": "prompt", "prompt": [16, 32]}}


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(sharding.MeshConfig(data=2, model=4))


def _state(mesh, shape=(16, 32), optimizer="adafactor", updates=1, seed=0) -> TrainState:
  """A replicated TrainState after `updates` optimizer steps (so the optimizer state is not 0)."""
  rng = np.random.default_rng(seed)
  params = {"prompt": {"prompt": jnp.asarray(rng.normal(size=shape), jnp.float32)}}
  tx = optim.make_optimizer(optimizer, 0.1)
  state = TrainState.create(params, tx)
  for _ in range(updates):
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), state.params)
    upd, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, upd),
                          opt_state=opt_state)
  return jax.device_put(state, sharding.replicated(mesh))


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _snapshot(directory: Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha1(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_round_trip_on_mesh(tmp_path, mesh, optimizer):
  state = _state(mesh, optimizer=optimizer, updates=2)
  data_state = {"epoch": 1, "examples_seen": 4096, "shard": [3, 7]}
  with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.save(2, state, data_state, META)

  # Ask for the prompt sharded over 'model' and everything else replicated.
  replicated = sharding.replicated(mesh)
  wanted = jax.tree.map(lambda _: replicated, state)
  wanted = wanted.replace(params={"prompt": {"prompt": NamedSharding(mesh, P(None, "model"))}})
  with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() == 2
    restored, restored_data, meta = ckpt.restore(_abstract(state), wanted)

  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for got, want, want_sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                                      jax.tree.leaves(wanted)):
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), strict=True)
    assert got.sharding.is_equivalent_to(want_sharding, got.ndim)
  assert int(restored.step) == 2
  assert restored_data == data_state
  assert meta["run_signature"] == META["run_signature"] and meta["backbone"] == META["backbone"]
  assert meta["trainable_shapes"] == {"prompt/prompt": [16, 32, "float32"]}


def test_retention_latest_npy_export_and_size(tmp_path, mesh):
  directory = tmp_path / "ckpt"
  states = {}
  with TrainCheckpointer(directory, max_to_keep=2, save_interval_steps=2) as ckpt:
    for step in range(1, 7):
      states[step] = _state(mesh, updates=0, seed=step)
      saved = ckpt.save(step, states[step], {"step": step}, META, force=step == 5)
      # Orbax always saves the first step; then every 2nd step; `force` overrides.
      assert saved == (step in (1, 2, 4, 5, 6))
    assert ckpt.all_steps() == [5, 6] and ckpt.latest_step() == 6

  prompts = directory / "prompts"
  assert sorted(p.name for p in prompts.iterdir()) == ["latest", "step_5", "step_6"]
  for name, step in (("step_5", 5), ("step_6", 6), ("latest", 6)):
    got = np.load(prompts / name / "prompt.prompt.npy")
    np.testing.assert_array_equal(got, np.asarray(states[step].params["prompt"]["prompt"]))

  # A real-size prompt run: [100, 768] float32 prompt + Adafactor state is KBs, not a backbone.
  big = tmp_path / "big"
  with TrainCheckpointer(big) as ckpt:
    ckpt.save(1, _state(mesh, shape=(100, 768), updates=1), {}, META)
  size = sum(p.stat().st_size for p in big.rglob("*") if p.is_file())
  assert size < 2 * 2**20, size


def test_shape_mismatch_names_path_and_shapes(tmp_path, mesh):
  with TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, _state(mesh, shape=(16, 32)), {}, META)
    other = _abstract(_state(mesh, shape=(8, 32)))
    with pytest.raises(ValueError) as err:
      ckpt.restore(other, sharding.replicated(mesh))
  message = str(err.value)
  assert "params/prompt/prompt" in message
  assert "stored shape (16, 32) vs requested shape (8, 32)" in message

  # Another optimizer's state is a structural mismatch, reported by path.
  with TrainCheckpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="opt_state/0/mu"):
    ckpt.restore(_abstract(_state(mesh, optimizer="adamw")), sharding.replicated(mesh))


def test_other_run_signature_is_refused_and_nothing_changes(tmp_path, mesh):
  state = _state(mesh)
  with TrainCheckpointer(tmp_path, max_to_keep=1) as ckpt:
    ckpt.save(10, state, {"pos": 1}, META)
  before = _snapshot(tmp_path)

  other = dict(META, run_signature={"model": "t5_1_1_base", "method": "prompt", "prompt": [50, 32]})
  with TrainCheckpointer(tmp_path, max_to_keep=1) as ckpt:
    with pytest.raises(ValueError, match="choose another checkpoint directory"):
      ckpt.save(20, state, {"pos": 2}, other)
    assert ckpt.all_steps() == [10]
  assert _snapshot(tmp_path) == before

  # The same run resumes in place.
  with TrainCheckpointer(tmp_path, max_to_keep=1) as ckpt:
    assert ckpt.save(20, state, {"pos": 2}, META)
    assert ckpt.all_steps() == [20]


def test_interrupted_save_is_ignored_and_read_trainable_params(tmp_path, mesh):
  state = _state(mesh, updates=1)
  with TrainCheckpointer(tmp_path) as ckpt:
    ckpt.save(3, state, {}, META)
  # A crash mid-save of step 7 leaves Orbax's tmp directory behind.
  crashed = tmp_path / "7.orbax-checkpoint-tmp-1712345678901234"
  (crashed / "state").mkdir(parents=True)
  (crashed / "state" / "garbage").write_bytes(b"\0" * 10)

  prompt = np.asarray(state.params["prompt"]["prompt"])
  for source in (tmp_path, tmp_path / "3"):
    params = ts.read_trainable_params(source)
    assert list(params) == ["prompt/prompt"]
    assert isinstance(params["prompt/prompt"], np.ndarray)
    np.testing.assert_array_equal(params["prompt/prompt"], prompt, strict=True)

  with TrainCheckpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
    restored, _, _ = ckpt.restore(_abstract(state), sharding.replicated(mesh))
    np.testing.assert_array_equal(np.asarray(restored.params["prompt"]["prompt"]), prompt)
    # The next save of step 7 still succeeds.
    assert ckpt.save(7, state, {}, META)
    assert ckpt.latest_step() == 7


def test_async_save_exports_npy_once_committed(tmp_path, mesh):
  state = _state(mesh, updates=1)
  with TrainCheckpointer(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(1, state, {"pos": 5}, META)
    assert ckpt.save(2, state, {"pos": 6}, META)
  assert ckpt.all_steps() == [1, 2]
  for name in ("step_1", "step_2", "latest"):
    np.testing.assert_array_equal(np.load(tmp_path / "prompts" / name / "prompt.prompt.npy"),
                                  np.asarray(state.params["prompt"]["prompt"]))
