"""Sharded execution equals one device; parameter shardings follow the rules table; big configs
are sized abstractly (no memory) and match their published parameter counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ptuning import param_tree, sharding
from ptuning.checkpoints import hf
from ptuning.model import build
from ptuning.model.config import PRESETS
from ptuning.model.t5 import EncoderDecoder


def test_eight_fake_devices_present():
  assert jax.device_count() == 8, "tests/conftest.py must set 8 fake CPU devices before jax import"


@pytest.mark.parametrize("preset", ["tiny_t5_1_1", "tiny_t5"])
@pytest.mark.parametrize("rules_name", ["default", "2d"])
def test_sharded_logits_equal_single_device(preset, rules_name):
  cfg = PRESETS[preset]
  rules = sharding.RULE_SETS[rules_name]
  mesh8 = sharding.make_mesh(sharding.MeshConfig(data=2, model=4))
  mesh1 = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  params8 = build.init_params(cfg, jax.random.key(0), mesh8, rules)
  host = build.host_params(params8)
  params1 = build.place_params(host, cfg, mesh1)

  # Every parameter's sharding is exactly what the logical axes + rules table imply.
  logical = param_tree.flatten(build.logical_specs(cfg))
  for path, array in param_tree.flatten(params8).items():
    expected = nn.logical_to_mesh_axes(tuple(logical[path]), rules)
    assert array.sharding.spec == expected, path
    assert array.sharding.mesh.shape == {"data": 2, "model": 4}
  assert param_tree.flatten(params8)["encoder/layers_0/mlp/wi_0/kernel" if cfg.gated else
                                     "encoder/layers_0/mlp/wi/kernel"].sharding.spec[1] == "model"

  rng = np.random.default_rng(0)
  inputs = rng.integers(2, 500, size=(4, 12)).astype(np.int32)
  inputs[1, 7:] = 0
  targets = rng.integers(2, 500, size=(4, 5)).astype(np.int32)
  apply = lambda p, x, y: EncoderDecoder(cfg).apply({"params": p}, x, y)
  single = jax.jit(apply)(params1, inputs, targets)
  batch_sharding = sharding.batch_sharding(mesh8, rules)
  with sharding.activate(mesh8, rules):
    sharded = jax.jit(apply, in_shardings=(build.param_shardings(cfg, mesh8, rules), batch_sharding,
                                           batch_sharding))(params8, inputs, targets)
  assert sharded.sharding.spec[0] == "data"
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=2e-5, rtol=2e-5)


def test_random_init_gives_scanned_and_unrolled_layers_the_same_numbers():
  """`build.init_params` initialises the layers as one scan (one layer's initialiser compiled
  and looped, not one per layer) and slices the stacks for an unrolled config: both layouts
  start from the same numbers, each leaf has its abstract shape, dtype and sharding, the layers
  differ from each other and each kernel has its fan-in scale."""
  cfg = PRESETS["tiny_t5_1_1"].replace(num_encoder_layers=3, param_dtype="bfloat16")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=2, model=4))
  key = jax.random.key(7)
  unrolled = param_tree.flatten(build.init_params(cfg, key, mesh))
  scanned = param_tree.flatten(build.init_params(cfg.replace(scan_layers=True), key, mesh))
  for layout, params in ((cfg, unrolled), (cfg.replace(scan_layers=True), scanned)):
    shapes = build.param_shapes(layout)
    shardings = param_tree.flatten(build.param_shardings(layout, mesh))
    assert set(params) == set(shapes)
    for path, value in params.items():
      assert (value.shape, value.dtype) == (shapes[path].shape, shapes[path].dtype), path
      assert value.sharding == shardings[path], path
  rematted = param_tree.flatten(build.init_params(cfg.replace(remat_policy="full"), key, mesh))
  assert set(rematted) == set(unrolled)  # remat changes no parameter, nor its numbers
  for path, value in rematted.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(unrolled[path]), err_msg=path)
  host = build.unstack_layers({p: np.asarray(v, np.float32) for p, v in scanned.items()})
  assert set(host) == set(unrolled)
  for path, value in unrolled.items():
    np.testing.assert_array_equal(np.asarray(value, np.float32), host[path], err_msg=path)
  wo = [host[f"encoder/layers_{i}/mlp/wo/kernel"] for i in range(3)]
  assert not np.array_equal(wo[0], wo[1]) and not np.array_equal(wo[1], wo[2])
  for w in wo:  # truncated normal, variance 1 / fan_in (d_ff = 64 inputs)
    assert np.std(w) == pytest.approx(cfg.d_ff ** -0.5, rel=0.1)


def test_building_a_model_again_reuses_its_compiled_initialiser():
  """A second `init_params` of the same config, mesh and rules (another key) traces and compiles
  nothing: the jitted initialiser is kept (train then eval in one process, the tests)."""
  cfg = PRESETS["tiny_t5_1_1"].replace(num_decoder_layers=3)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, model=2))
  first = param_tree.flatten(build.init_params(cfg, jax.random.key(1), mesh))
  hits = build._initializer.cache_info().hits
  second = param_tree.flatten(build.init_params(cfg, jax.random.key(2), mesh))
  assert build._initializer.cache_info().hits == hits + 1
  scanned = cfg.replace(scan_layers=True, remat_policy="none")
  assert build._initializer(scanned, mesh, sharding.DEFAULT_RULES)._cache_size() == 1
  path = "encoder/layers_0/attention/query/kernel"
  assert not np.array_equal(np.asarray(first[path]), np.asarray(second[path]))  # the new key


def hf_parameter_count(cfg) -> int:
  """transformers' own count for the same architecture, built on the meta device (no memory)."""
  config = transformers.T5Config(**{k: v for k, v in hf.t5_config_to_hf_dict(cfg).items()
                                    if k not in ("architectures", "model_type")})
  with torch.device("meta"):
    model = transformers.T5ForConditionalGeneration(config)
    if not cfg.tie_embeddings:  # transformers 5 ties lm_head at construction; real T5 1.1 /
      # UL2 checkpoints carry their own head, which from_pretrained keeps untied.
      model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))
  return model.num_parameters()  # de-duplicates tied weights


@pytest.mark.parametrize("preset, published", [
    # Published as "T5 1.1 XXL, 11B" and "UL2 20B"; exact counts are transformers' own.
    ("t5_1_1_xxl", 11_135_332_352),
    ("ul2_20b", 19_591_209_984),
])
def test_abstract_init_gives_published_parameter_counts(preset, published):
  cfg = PRESETS[preset]
  count = param_tree.count(nn.meta.unbox(build.abstract_params(cfg)))
  print(f"{preset}: {count:,} parameters")
  assert count == published
  assert count == hf_parameter_count(cfg)
  scanned = param_tree.count(nn.meta.unbox(build.abstract_params(cfg.replace(scan_layers=True))))
  assert scanned == count
