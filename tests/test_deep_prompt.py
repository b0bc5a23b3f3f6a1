"""Deep (per-layer) prompts: the encoder hook's exact semantics (against a layer-by-layer
reference), parameter counts, scanned == unscanned, add-with-zeros == vanilla, folding the
reparameterisation, only the prompt trains, the loss falls, and gin train/resume/infer."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptuning import gin_setup, param_tree, sharding
from ptuning.data.batches import make_batch_iterator
from ptuning.model import build, decoding
from ptuning.model.config import PRESETS
from ptuning.model.layers import RelativePositionBias, RMSNorm
from ptuning.model.t5 import EncoderDecoder, EncoderLayer, attention_mask_bias
from ptuning.prompts.deep import DeepPrompt, num_encoder_layers
from ptuning.prompts.method import prompted_logits
from ptuning.prompts.vanilla import PromptTuning
from ptuning.sharding import to_global_batch
from ptuning.train import loop
from ptuning.train.evaluation import predict
from ptuning.train.experiment import TrainConfig, build_experiment
from ptuning.train.step import eval_step
from ptuning.vocab import get_vocabulary
from task_files import write_task

LENGTHS = {"inputs": 16, "targets": 4}
CFG = PRESETS["tiny_t5_1_1"]  # 2 encoder layers, d_model 32
P = 3


@pytest.fixture(scope="module")
def backbones():
  """{'unscanned' | 'scanned' | 'scanned_remat': (cfg, params)}, identical weights, one device."""
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  params = build.init_params(CFG, jax.random.key(0), mesh)
  host = build.host_params(params)
  out = {"unscanned": (CFG, params)}
  for name, remat in (("scanned", "none"), ("scanned_remat", "full")):
    cfg = CFG.replace(scan_layers=True, remat_policy=remat)
    out[name] = (cfg, build.place_params(host, cfg, mesh))
  return out


def inputs(batch: int = 3, length: int = 10, seed: int = 0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, 200, size=(batch, length)).astype(np.int32)
  tokens[1, 6:] = 0  # padding
  targets = rng.integers(2, 200, size=(batch, 4)).astype(np.int32)
  return jnp.asarray(tokens), decoding.shift_right(jnp.asarray(targets))




def reference_encode(cfg, params, embeds, mask, layer_prompts, mode):
  """The hook's semantics spelled out with one EncoderLayer per layer (unscanned params)."""
  enc = params["encoder"]
  positions = jnp.arange(embeds.shape[1])
  bias = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                              cfg.relative_attention_max_distance, True).apply(
                                  {"params": enc["relpos_bias"]}, positions, positions)
  bias = bias + attention_mask_bias(None, mask)
  x = embeds
  for i in range(cfg.num_encoder_layers):
    prompt = jnp.broadcast_to(layer_prompts[i], (x.shape[0], P, x.shape[2]))
    rows = prompt if mode == "replace" else x[:, :P] + prompt
    x = x.at[:, :P].set(rows)
    x, _ = EncoderLayer(cfg).apply({"params": enc[f"layers_{i}"]}, x, bias)
  return RMSNorm(cfg.layer_norm_epsilon).apply({"params": enc["encoder_norm"]}, x)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_hook_matches_layer_by_layer_reference(backbones, mode):
  cfg, params = backbones["unscanned"]
  tokens, _ = inputs()
  model = EncoderDecoder(cfg)
  embeds = model.apply({"params": params}, tokens, method=EncoderDecoder.embed)
  mask = tokens > 0
  lp = jax.random.normal(jax.random.key(1), (cfg.num_encoder_layers, P, cfg.d_model))
  expected = reference_encode(cfg, params, embeds, mask, lp, mode)
  plain = model.apply({"params": params}, embeds, mask, method=EncoderDecoder.encode_embeddings)
  for name in ("unscanned", "scanned", "scanned_remat"):
    c, p = backbones[name]
    enc = jax.jit(lambda prompts, c=c, p=p: EncoderDecoder(c).apply(
        {"params": p}, embeds, mask, prompts, mode, method=EncoderDecoder.encode_embeddings))
    got = enc(lp)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, err_msg=name)
    # Per-example prompts [N, B, P, E] behave like the broadcast [N, P, E].
    per_example = jnp.broadcast_to(lp[:, None], (lp.shape[0], tokens.shape[0]) + lp.shape[1:])
    np.testing.assert_allclose(np.asarray(enc(per_example)), np.asarray(got), atol=1e-6)
    # The prompts really change the encoder; all-zero prompts in 'add' mode change nothing.
    assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-2
    if mode == "add":
      # (Two different jitted programs: equal up to XLA's float reassociation.)
      np.testing.assert_allclose(np.asarray(enc(jnp.zeros_like(lp))), np.asarray(enc(None)),
                                 atol=1e-5, rtol=0, err_msg=name)
  # 'replace' discards what layer 0 wrote into the prompt rows: the encoding does not depend on
  # the input rows [:P] at all (the prompt rows of the input embeddings are overwritten too).
  if mode == "replace":
    other = embeds.at[:, :P].set(123.0)
    again = model.apply({"params": params}, other, mask, lp, mode,
                        method=EncoderDecoder.encode_embeddings)
    np.testing.assert_allclose(np.asarray(again), np.asarray(expected), atol=1e-5)
  with pytest.raises(ValueError, match="layer_prompts of shape"):
    model.apply({"params": params}, embeds, mask, lp[:1], mode,
                method=EncoderDecoder.encode_embeddings)


@pytest.mark.parametrize("reparameterize", [False, True])
@pytest.mark.parametrize("mode", ["replace", "add"])
def test_trainable_parameter_count_equals_formula(backbones, mode, reparameterize):
  n, e, h = CFG.num_encoder_layers, CFG.d_model, 16
  method = DeepPrompt(length=P, mode=mode, reparameterize=reparameterize, mlp_hidden=h)
  expected = P * e + e * h + h + h * n * e + n * e if reparameterize else n * P * e
  for name in ("unscanned", "scanned"):
    _, params = backbones[name]
    assert num_encoder_layers(params) == n
    tree = jax.eval_shape(method.init, jax.random.key(0), params)
    count = sum(x.size for x in jax.tree.leaves(tree))
    assert count == expected == method.num_params(n, e), (name, count)
  assert jax.tree.structure(tree) == jax.tree.structure(
      method.logical_axes(), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  print(f"tiny_t5_1_1 deep prompt mode={mode} reparameterize={reparameterize}: {count} params "
        f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in param_tree.flatten(tree).items())})")
  # A real size, abstractly: T5 1.1 base (12 layers x 768), P=20, H=512.
  base = build.param_shapes(PRESETS["t5_1_1_base"])
  base_tree = param_tree.unflatten(dict(base))
  big = DeepPrompt(length=20, mode=mode, reparameterize=reparameterize)
  count = sum(x.size for x in jax.tree.leaves(jax.eval_shape(big.init, jax.random.key(0), base_tree)))
  assert count == big.num_params(12, 768)
  print(f"t5_1_1_base deep prompt P=20 reparameterize={reparameterize}: {count:,} params")


def test_scanned_equals_unscanned_logits_and_gradients(backbones):
  tokens, decoder_inputs = inputs()
  method = DeepPrompt(length=P, mode="replace", reparameterize=True, mlp_hidden=16)
  prompt = method.init(jax.random.key(2), backbones["unscanned"][1])
  results = {}
  for name, (cfg, backbone) in backbones.items():
    def loss(pr, cfg=cfg, backbone=backbone):
      logits = prompted_logits(cfg, method, {"backbone": backbone, **pr}, tokens, decoder_inputs)
      return logits.mean(), logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(prompt)
    results[name] = (logits, grads)
  ref_logits, ref_grads = results.pop("unscanned")
  for name, (logits, grads) in results.items():
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, err_msg=name)
    for path, g in param_tree.flatten(grads).items():
      np.testing.assert_allclose(np.asarray(g), np.asarray(param_tree.flatten(ref_grads)[path]),
                                 atol=1e-6, rtol=1e-4, err_msg=f"{name} {path}")


def test_add_with_zero_deltas_equals_vanilla_and_replace_differs(backbones):
  cfg, backbone = backbones["unscanned"]
  tokens, decoder_inputs = inputs()
  add = DeepPrompt(length=P, mode="add")
  deep = add.init(jax.random.key(3), backbone)["prompt"]["deep"]
  assert not np.any(np.asarray(deep[1:]))  # 'add' starts with zero deltas
  logits = lambda method, prompt: np.asarray(prompted_logits(
      cfg, method, {"backbone": backbone, "prompt": prompt}, tokens, decoder_inputs))
  vanilla = logits(PromptTuning(length=P), {"prompt": deep[0]})
  np.testing.assert_array_equal(logits(add, {"deep": deep}), vanilla)
  # Non-zero deltas, or 'replace' with its own prompt per layer, change the logits.
  deltas = deep.at[1:].set(jax.random.normal(jax.random.key(4), deep[1:].shape))
  assert np.abs(logits(add, {"deep": deltas}) - vanilla).max() > 1e-3
  replace = DeepPrompt(length=P, mode="replace")
  assert np.abs(logits(replace, {"deep": deltas}) - vanilla).max() > 1e-3
  # 'replace' with deep[i] = deep[0] is still not vanilla: layer 1 reads deep[0] again, not
  # what layer 0 computed for the prompt rows.
  repeated = jnp.broadcast_to(deep[:1], deep.shape)
  assert np.abs(logits(replace, {"deep": repeated}) - vanilla).max() > 1e-3


def test_fold_gives_identical_logits(backbones):
  cfg, backbone = backbones["scanned"]
  tokens, decoder_inputs = inputs()
  method = DeepPrompt(length=P, mode="add", reparameterize=True, mlp_hidden=16)
  params = {"backbone": backbone, **method.init(jax.random.key(5), backbone)}
  folded = method.fold(params)
  assert set(param_tree.flatten(folded["prompt"])) == {"deep"}
  assert folded["prompt"]["deep"].shape == (CFG.num_encoder_layers, P, CFG.d_model)
  assert folded["backbone"] is backbone
  run = jax.jit(lambda p: prompted_logits(cfg, method, p, tokens, decoder_inputs))
  np.testing.assert_array_equal(np.asarray(run(folded)), np.asarray(run(params)))
  assert method.fold(folded) == folded  # idempotent


def tiny_config(tmp_path, shared_data, **overrides) -> TrainConfig:
  fields = dict(model_dir=str(tmp_path / "run"), mixture_or_task_name=str(write_task(tmp_path / "t.jsonl")),
                model="tiny_t5_1_1", vocabulary_path=str(shared_data / "t5_vocab/spiece.model"),
                method=DeepPrompt(length=P), task_feature_lengths=LENGTHS, batch_size=8,
                train_steps=4, dropout_rate=0.1, mesh=sharding.MeshConfig(data=1, model=1))
  fields.update(overrides)
  return TrainConfig(**fields)


def local_batches(config: TrainConfig, n: int) -> list:
  vocab = get_vocabulary(config.vocabulary_path)
  it = make_batch_iterator(config.mixture_or_task_name, LENGTHS, config.batch_size, vocabulary=vocab)
  return [next(it) for _ in range(n)]


@pytest.mark.parametrize("method", [DeepPrompt(length=P),
                                    DeepPrompt(length=P, mode="add", reparameterize=True,
                                               mlp_hidden=16)], ids=["replace", "add_mlp"])
def test_one_sharded_step_changes_only_the_prompt(tmp_path, shared_data, method):
  config = tiny_config(tmp_path, shared_data, method=method,
                       mesh=sharding.MeshConfig(data=4, model=2))
  exp = build_experiment(config)
  state = exp.init_state()
  before = {k: np.asarray(v) for k, v in param_tree.flatten(state.params).items()}
  frozen_before = {k: np.asarray(v) for k, v in param_tree.flatten(exp.frozen).items()}
  assert all(k.startswith("prompt/") for k in before)
  assert all(k.startswith("backbone/") for k in frozen_before)
  assert sum(v.size for v in before.values()) == method.num_params(CFG.num_encoder_layers, CFG.d_model)
  batch = to_global_batch(local_batches(config, 1)[0], exp.mesh)
  state, metrics = exp.train_step_fn(batch)(state, exp.frozen, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
  after = param_tree.flatten(state.params)
  assert set(after) == set(before)
  for path, value in after.items():  # every trainable leaf moved ('add': the deltas too)
    assert not np.array_equal(np.asarray(value), before[path]), path
  for path, value in param_tree.flatten(exp.frozen).items():
    np.testing.assert_array_equal(np.asarray(value), frozen_before[path], err_msg=path)


def test_short_training_lowers_the_loss(tmp_path, shared_data):
  config = tiny_config(tmp_path, shared_data, dropout_rate=0.0, method=DeepPrompt(length=10))
  exp = build_experiment(config, devices=jax.devices()[:1])
  data = [to_global_batch(local, exp.mesh) for local in local_batches(config, 30)]
  evaluate = jax.jit(functools.partial(eval_step, spec=exp.spec))
  held_loss = lambda state: np.mean([float(evaluate(exp.full_params(state), b)["loss"])
                                     for b in data[:4]])
  state, step_fn, losses = exp.init_state(), None, []
  before = held_loss(state)
  for batch in data:
    step_fn = step_fn or exp.train_step_fn(batch)
    state, metrics = step_fn(state, exp.frozen, batch, jax.random.key(1))
    losses.append(float(metrics["loss"]))
  after = held_loss(state)
  print(f"deep prompt (replace, P=10) train loss {losses[0]:.1f} -> {losses[-1]:.1f}; "
        f"same 4 batches before/after: {before:.1f} -> {after:.1f}")
  assert after < 0.85 * before
  assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
  assert step_fn._cache_size() == 1


def test_gin_train_resume_infer_round_trip(tmp_path, shared_data):
  task = write_task(tmp_path / "t.jsonl")
  bindings = [f"MODEL_DIR = '{tmp_path / 'run'}'", f"MIXTURE_OR_TASK_NAME = '{task}'",
              "MODEL = 'tiny_t5_1_1'", f"VOCABULARY_PATH = '{shared_data / 't5_vocab/spiece.model'}'",
              "TRAIN_STEPS = 4", "BATCH_SIZE = 8", f"TASK_FEATURE_LENGTHS = {LENGTHS!r}",
              f"PROMPT_LENGTH = {P}", "CHECKPOINT_PERIOD = 2", "LOG_PERIOD = 2",
              "EVAL_SPLIT = 'train'", "DEEP_PROMPT_MODE = 'add'",
              "DEEP_PROMPT_REPARAMETERIZE = True", "DEEP_PROMPT_MLP_HIDDEN = 16",
              "ptuning.TrainConfig.eval_max_examples = 8"]
  config = gin_setup.load_config(["runs/train.gin", "methods/deep_prompt.gin"], bindings)
  assert config.method == DeepPrompt(length=P, mode="add", reparameterize=True, mlp_hidden=16,
                                     initializer=config.method.initializer)
  first = loop.train(config)
  assert "train/loss" in first and "eval/exact_match" in first
  latest = tmp_path / "run/checkpoints/prompts/latest"
  assert {p.name for p in latest.iterdir()} == {
      "prompt.embedding.npy", "prompt.mlp.dense_0.kernel.npy", "prompt.mlp.dense_0.bias.npy",
      "prompt.mlp.dense_1.kernel.npy", "prompt.mlp.dense_1.bias.npy"}
  config = gin_setup.load_config(["runs/train.gin", "methods/deep_prompt.gin"],
                                 bindings + ["TRAIN_STEPS = 6"])
  again = loop.train(config)
  assert "train/loss" in again
  metrics = [json.loads(l) for l in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in metrics if "train/loss" in m] == [2, 4, 6]
  assert loop.run_infer(config, str(tmp_path / "pred.jsonl")) == 8
  rows = [json.loads(l) for l in (tmp_path / "pred.jsonl").read_text().splitlines()]
  assert {"inputs", "targets", "prediction"} <= set(rows[0])
  # Inference from the folded tree predicts exactly the same.
  exp, params = loop.restore_params(config)
  assert [r["prediction"] for r in predict(exp, exp.method.fold(params), config,
                                           get_vocabulary(config.vocabulary_path))] == \
      [r["prediction"] for r in rows]
