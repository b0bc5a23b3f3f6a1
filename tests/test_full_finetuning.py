"""Full fine-tuning (methods/full_finetuning.gin): the whole backbone is the trainable tree, a
(data=2, model=4) mesh matches one device, Adafactor slots are sharded like their parameters,
and the full tree survives an Orbax checkpoint round trip on the mesh."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ptuning import gin_setup, param_tree, sharding
from ptuning.checkpoints.train_state import TrainCheckpointer, flat_with_paths
from ptuning.data.batches import make_batch_iterator
from ptuning.sharding import to_global_batch
from ptuning.train.experiment import build_experiment
from ptuning.vocab import get_vocabulary
from task_files import write_task

LENGTHS = {"inputs": 16, "targets": 4}
STEPS = 3
KERNEL = "backbone/encoder/layers_0/mlp/wi_0/kernel"  # [embed 32, mlp 64]




def full_finetuning_config(tmp_path, shared_data, mesh):
  """methods/full_finetuning.gin on the tiny preset; factoring threshold lowered to 32 so that
  the tiny kernels (axes 32 / 64 < optax's 128) get factored Adafactor slots."""
  config = gin_setup.load_config(
      ["runs/train.gin", "methods/full_finetuning.gin"],
      [f"MODEL_DIR = '{tmp_path / 'run'}'", f"MIXTURE_OR_TASK_NAME = '{write_task(tmp_path / 't.jsonl')}'"])
  assert config.method is None and config.trainable_pattern == "^backbone/"
  assert config.learning_rate == 1e-3 and config.schedule == "constant"
  assert config.optimizer_kwargs == {"multiply_by_parameter_scale": True, "weight_decay": 0.0}
  return dataclasses.replace(
      config, model="tiny_t5_1_1", vocabulary_path=str(shared_data / "t5_vocab/spiece.model"),
      task_feature_lengths=LENGTHS, batch_size=8, train_steps=STEPS, dropout_rate=0.1, mesh=mesh,
      optimizer_kwargs={**config.optimizer_kwargs, "min_dim_size_to_factor": 32})


def spec_of(leaf):
  """A sharded array's PartitionSpec padded to its rank."""
  spec = tuple(leaf.sharding.spec)
  return spec + (None,) * (leaf.ndim - len(spec))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
  """Three full fine-tuning steps on one device and on a (data=2, model=4) mesh."""
  tmp_path = tmp_path_factory.mktemp("full_ft")
  out = {}
  for name, mesh in (("one", sharding.MeshConfig(data=1, model=1)),
                     ("eight", sharding.MeshConfig(data=2, model=4))):
    config = full_finetuning_config(tmp_path, shared_data, mesh)
    exp = build_experiment(config, devices=jax.devices()[:mesh.data * mesh.model])
    state = exp.init_state()
    initial = {p: np.asarray(v) for p, v in param_tree.flatten(state.params).items()}
    it = make_batch_iterator(config.mixture_or_task_name, LENGTHS, config.batch_size,
                             vocabulary=get_vocabulary(config.vocabulary_path))
    step_fn, losses = None, []
    for _ in range(STEPS):
      batch = to_global_batch(next(it), exp.mesh)
      step_fn = step_fn or exp.train_step_fn(batch)
      state, metrics = step_fn(state, exp.frozen, batch, jax.random.key(1))
      losses.append(float(metrics["loss"]))
    out[name] = dict(exp=exp, state=state, initial=initial, losses=losses, tmp_path=tmp_path)
  return out


def test_sharded_full_finetuning_matches_one_device(runs):
  one, eight = runs["one"]["losses"], runs["eight"]["losses"]
  assert one[0] != one[-1]
  np.testing.assert_allclose(eight, one, rtol=1e-4)


def test_optimizer_state_is_sharded_like_the_parameters(runs):
  exp, state = runs["eight"]["exp"], runs["eight"]["state"]
  params = param_tree.flatten(state.params)
  slots = flat_with_paths(state.opt_state)
  print("\nAdafactor slots on the (data=2, model=4) mesh: path, shape, sharding spec")
  for path, leaf in slots.items():
    print(f"  {path:70s} {str(tuple(leaf.shape)):12s} {leaf.sharding.spec}")
  # Every array carries the sharding that build_experiment declared for it.
  declared = flat_with_paths(exp.state_shardings.opt_state)
  for path, leaf in slots.items():
    assert leaf.sharding.is_equivalent_to(declared[path], leaf.ndim), path
  # The factored [embed, mlp] kernel: v_row [embed] drops the mlp axis, v_col [mlp] keeps the
  # model sharding; the unfactored `v` is a (1,) placeholder.
  assert spec_of(params[KERNEL]) == (None, "model")
  assert slots[f"0/v_row/{KERNEL}"].shape == (32,) and spec_of(slots[f"0/v_row/{KERNEL}"]) == (None,)
  assert slots[f"0/v_col/{KERNEL}"].shape == (64,) and spec_of(slots[f"0/v_col/{KERNEL}"]) == ("model",)
  assert slots[f"0/v/{KERNEL}"].shape == (1,)
  # The unfactored [heads, buckets] relative-position table: `v` takes the parameter's spec.
  relpos = "backbone/encoder/relpos_bias/rel_embedding"
  assert spec_of(slots[f"0/v/{relpos}"]) == spec_of(params[relpos]) == ("model", None)
  # No model-sharded parameter keeps a replicated copy of its statistics: the slot that holds
  # its model-sharded axis (v_col, v_row or v) is model-sharded too.
  model_sharded = [p for p, v in params.items() if "model" in spec_of(v)]
  assert len(model_sharded) > 10
  for path in model_sharded:
    stats = [slots[f"0/{k}/{path}"] for k in ("v_row", "v_col", "v")]
    assert any("model" in spec_of(s) for s in stats if s.size > 1), path
  one_device_bytes = sum(s.nbytes for s in slots.values())
  per_device = sum(s.addressable_shards[0].data.nbytes for s in slots.values())
  assert per_device < 0.5 * one_device_bytes


def test_factored_slots_follow_2d_parameter_sharding(tmp_path, shared_data):
  """With 2-D parameter sharding (embed over 'data'), v_row takes the embed axis' 'data'; the
  same holds inside per-group optimizers (`group_learning_rates`)."""
  config = full_finetuning_config(tmp_path, shared_data, sharding.MeshConfig(2, 4, "2d"))
  exp = build_experiment(config)
  shardings = flat_with_paths(exp.state_shardings)
  assert tuple(shardings[f"params/{KERNEL}"].spec) == ("data", "model")
  assert tuple(shardings[f"opt_state/0/v_row/{KERNEL}"].spec) == ("data",)
  assert tuple(shardings[f"opt_state/0/v_col/{KERNEL}"].spec) == ("model",)
  # Per-group learning rates (optax.multi_transform: MaskedNode()s for other groups' leaves).
  grouped = build_experiment(dataclasses.replace(config, group_learning_rates={"/mlp/": 1e-2}))
  state = grouped.init_state()
  slots = flat_with_paths(state.opt_state)
  mlp, attention = "inner_states/group_0/inner_state/0", "inner_states/default/inner_state/0"
  assert spec_of(slots[f"{mlp}/v_col/{KERNEL}"]) == ("model",)
  assert spec_of(slots[f"{mlp}/v_row/{KERNEL}"]) == ("data",)
  query = "backbone/encoder/layers_0/attention/query/kernel"  # [embed, joined_kv]
  assert spec_of(slots[f"{attention}/v_col/{query}"]) == ("model",)
  assert f"{attention}/v_col/{KERNEL}" not in slots and f"{mlp}/v_col/{query}" not in slots


def test_every_backbone_leaf_trains_and_checkpoint_round_trips_on_the_mesh(runs):
  run = runs["eight"]
  exp, state = run["exp"], run["state"]
  trained = param_tree.flatten(state.params)
  # The trainable tree is the whole backbone and nothing else; nothing stays frozen.
  assert set(trained) == set(run["initial"]) and all(p.startswith("backbone/") for p in trained)
  assert param_tree.flatten(exp.frozen) == {}
  unchanged = [p for p, v in trained.items() if np.array_equal(np.asarray(v), run["initial"][p])]
  assert unchanged == []
  # Orbax save -> restore of the whole train state on the mesh: same values, same shardings.
  directory = run["tmp_path"] / "checkpoints"
  with TrainCheckpointer(directory) as checkpointer:
    checkpointer.save(STEPS, state, {"position": 3}, {"run_signature": "full"}, force=True)
  with TrainCheckpointer(directory) as checkpointer:
    restored, data_state, meta = checkpointer.restore(exp.abstract_state, exp.state_shardings)
  assert data_state == {"position": 3} and len(meta["trainable_shapes"]) == len(trained)
  saved, loaded = flat_with_paths(state), flat_with_paths(restored)
  assert set(saved) == set(loaded)
  for path, leaf in saved.items():
    np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(leaf), err_msg=path)
    assert loaded[path].sharding.is_equivalent_to(leaf.sharding, leaf.ndim), path
  assert spec_of(loaded[f"params/{KERNEL}"]) == (None, "model")
