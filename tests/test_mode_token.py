"""UL2 mode tokens: no method equals UL2's text prefix, the encoder input layout before / after
the prompt for every method, deep prompts' row offset, train / eval / decode / score paths, and
bad configurations failing clearly."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptuning import gin_setup, param_tree, sharding
from ptuning.data.batches import make_batch_iterator
from ptuning.model import build, decoding, search
from ptuning.model.config import PRESETS
from ptuning.model.t5 import EncoderDecoder, EncoderLayer, apply_layer_prompt, attention_mask_bias
from ptuning.model.layers import RelativePositionBias, RMSNorm
from ptuning.prompts import method as method_module
from ptuning.prompts import mode_token
from ptuning.prompts.deep import DeepPrompt
from ptuning.prompts.dept import DePT
from ptuning.prompts.ept import EPT
from ptuning.prompts.method import prompted_encode, prompted_logits
from ptuning.prompts.mode_token import ModeToken
from ptuning.prompts.multitask import MPT, PromptBank
from ptuning.prompts.vanilla import PromptTuning
from ptuning.train import evaluation
from ptuning.train.experiment import TrainConfig, build_experiment
from ptuning.train.step import eval_step
from ptuning.vocab import get_vocabulary
from task_files import write_task

CFG = PRESETS["tiny_ul2"]  # 2 + 2 layers, d_model 32, gated-SiLU
LENGTHS = {"inputs": 16, "targets": 4}
TEXTS = ["is 4 even?", "a somewhat longer input sentence, with padding after the others"]
P = 3


@pytest.fixture(scope="module")
def vocab_path(shared_data):
  return str(shared_data / "t5_vocab/spiece.model")


@pytest.fixture(scope="module")
def vocab(vocab_path):
  return get_vocabulary(vocab_path)


@pytest.fixture(scope="module")
def backbone():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  return build.init_params(CFG, jax.random.key(0), mesh)


def pad(rows, length):
  out = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return jnp.asarray(out)


def input_tokens(vocab, extra_padding=3):
  """The padded batch `[2, L]` of TEXTS (EOS appended, row 0 padded)."""
  rows = [list(vocab.encode(t)) + [1] for t in TEXTS]
  return pad(rows, max(map(len, rows)) + extra_padding)


def decoder_inputs(batch=2, seed=0):
  targets = np.random.default_rng(seed).integers(2, 300, size=(batch, 4)).astype(np.int32)
  return decoding.shift_right(jnp.asarray(targets))


def embed(backbone, ids):
  """Frozen token embeddings `[..., E]` of `ids`."""
  return np.asarray(backbone["token_embedder"]["embedding"])[np.asarray(ids)]


class Recorder:
  """Records what `prompted_encode` feeds the encoder: (embeds `[B, L', E]`, mask, extra args)."""

  def __init__(self, monkeypatch):
    self.calls = []
    calls = self.calls

    class Recording(EncoderDecoder):
      def encode_embeddings(self, embeds, mask, *args):
        calls.append((np.asarray(embeds), np.asarray(mask), args))
        return super().encode_embeddings(embeds, mask, *args)

    monkeypatch.setattr(method_module, "EncoderDecoder", Recording)

  def encode(self, *args, **kwargs):
    """`prompted_encode(*args, **kwargs)` -> (its outputs, the recorded encoder input)."""
    self.calls.clear()
    out = prompted_encode(*args, **kwargs)
    (call,) = self.calls
    return out, call


# 1. No method: exactly UL2's text prefix.

@pytest.mark.parametrize("position", mode_token.POSITIONS)
def test_no_method_equals_the_text_prefix(backbone, vocab, vocab_path, position):
  mode = mode_token.tokenize("[NLU]", position, vocab_path)
  assert mode.ids == tuple(vocab.encode("[NLU]")) and len(mode.ids) > 1  # several pieces, no EOS
  tokens = input_tokens(vocab)
  prefixed = [list(vocab.encode("[NLU] " + t)) + [1] for t in TEXTS]
  assert prefixed == [list(mode.ids) + [int(t) for t in row if t] for row in np.asarray(tokens)]
  prefixed = pad(prefixed, tokens.shape[1] + len(mode.ids))
  dec = decoder_inputs()
  params = {"backbone": backbone}
  ours = prompted_logits(CFG, None, params, tokens, dec, mode_token=mode)
  plain = EncoderDecoder(CFG).apply({"params": backbone}, prefixed, dec)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), atol=1e-6, rtol=1e-6)
  without = prompted_logits(CFG, None, params, tokens, dec)
  assert not np.allclose(np.asarray(ours), np.asarray(without), atol=1e-3)


# 2. Vanilla prompt tuning: layout, positions differ, default unchanged.

def test_vanilla_layout_before_and_after_the_prompt(backbone, vocab, vocab_path, monkeypatch):
  method = PromptTuning(length=P)
  params = {"backbone": backbone, **method.init(jax.random.key(1), backbone)}
  prompt = np.asarray(params["prompt"]["prompt"])
  tokens, dec = input_tokens(vocab), decoder_inputs()
  recorder = Recorder(monkeypatch)
  ids = mode_token.tokenize("[NLU]", vocabulary_path=vocab_path).ids
  k, batch = len(ids), tokens.shape[0]
  mode_rows = np.broadcast_to(embed(backbone, ids), (batch, k, CFG.d_model))
  prompt_rows = np.broadcast_to(prompt, (batch, P, CFG.d_model))
  input_rows, input_mask = embed(backbone, tokens), np.asarray(tokens) > 0
  expected = {"before_prompt": [mode_rows, prompt_rows, input_rows],
              "after_prompt": [prompt_rows, mode_rows, input_rows]}
  logits = {}
  for position, rows in expected.items():
    mode = ModeToken(ids, position)
    (encoded, mask), (embeds, fed_mask, args) = recorder.encode(CFG, method, params, tokens,
                                                                 mode_token=mode)
    np.testing.assert_array_equal(embeds, np.concatenate(rows, axis=1))
    np.testing.assert_array_equal(fed_mask, np.concatenate(
        [np.ones((batch, k + P), bool), input_mask], axis=1))
    np.testing.assert_array_equal(np.asarray(mask), fed_mask)
    assert encoded.shape == (batch, k + P + tokens.shape[1], CFG.d_model)
    assert args[0] is None  # no layer prompts
    logits[position] = np.asarray(prompted_logits(CFG, method, params, tokens, dec,
                                                  mode_token=mode))
  assert not np.allclose(logits["before_prompt"], logits["after_prompt"], atol=1e-3)

  # No mode token (None or empty): bit-identical to the plain prompted forward pass.
  (_, _), (embeds, fed_mask, args) = recorder.encode(CFG, method, params, tokens,
                                                     mode_token=ModeToken())
  np.testing.assert_array_equal(embeds, np.concatenate([prompt_rows, input_rows], axis=1))
  assert args[-1] == 0
  reference = EncoderDecoder(CFG).apply(
      {"params": backbone}, jnp.asarray(embeds), jnp.asarray(fed_mask), dec,
      method=EncoderDecoder.forward_embeddings)
  default = prompted_logits(CFG, method, params, tokens, dec)
  for mode in (None, ModeToken(), ModeToken((), "after_prompt")):
    np.testing.assert_array_equal(
        np.asarray(prompted_logits(CFG, method, params, tokens, dec, mode_token=mode)),
        np.asarray(default))
  np.testing.assert_array_equal(np.asarray(default), np.asarray(reference))


# 4. Every method: the mode rows sit before / after the method's prompt rows, untouched by it.

def _methods():
  return {"dept": DePT(length=P, rank=2, max_length=32),
          "ept": EPT(length=P, rank=2, max_length=32, num_spaces=2, space_width=2),
          "prompt_bank": PromptBank(num_tasks=2, length=P, shared_length=2, combine="concat"),
          "mpt": MPT(num_tasks=2, length=P),
          "deep_replace": DeepPrompt(length=P),
          "deep_add": DeepPrompt(length=P, mode="add")}


def _randomised(tree, seed):
  """Every leaf replaced by noise (so B = 0 / zero deltas do not hide anything)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [0.3 * jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("position", mode_token.POSITIONS)
@pytest.mark.parametrize("name", list(_methods()))
def test_every_method_places_the_mode_rows(backbone, vocab, vocab_path, monkeypatch, name,
                                           position):
  method = _methods()[name]
  params = {"backbone": backbone, **_randomised(method.init(jax.random.key(2), backbone), 3)}
  tokens = input_tokens(vocab)
  task_ids = jnp.asarray([1, 0], jnp.int32) if name in ("prompt_bank", "mpt") else None
  mode = mode_token.tokenize("[S2S]", position, vocab_path)
  k, batch = len(mode.ids), tokens.shape[0]
  embeds = jnp.asarray(embed(backbone, tokens))
  out, out_mask, *rest = method.apply(params, embeds, jnp.asarray(tokens) > 0, task_ids)
  out, out_mask = np.asarray(out), np.asarray(out_mask)
  rows = out.shape[1] - tokens.shape[1]  # the method's prompt rows
  mode_rows = np.broadcast_to(embed(backbone, mode.ids), (batch, k, CFG.d_model))
  at = 0 if position == "before_prompt" else rows
  recorder = Recorder(monkeypatch)
  _, (fed, fed_mask, args) = recorder.encode(CFG, method, params, tokens, task_ids=task_ids,
                                             mode_token=mode)
  np.testing.assert_array_equal(fed, np.concatenate([out[:, :at], mode_rows, out[:, at:]], 1))
  np.testing.assert_array_equal(fed_mask, np.concatenate(
      [out_mask[:, :at], np.ones((batch, k), bool), out_mask[:, at:]], 1))
  if name.startswith("deep"):
    layer_prompts, layer_mode, offset = args
    np.testing.assert_array_equal(np.asarray(layer_prompts), np.asarray(rest[0]))
    assert layer_mode == method.mode and offset == (k if position == "before_prompt" else 0)
  else:
    assert args[0] is None


@pytest.mark.parametrize("layer_mode", ["replace", "add"])
def test_layer_prompt_offset_matches_layer_by_layer_reference(backbone, layer_mode):
  """Rows [k:k+P] of every layer's input get the per-layer prompt; rows [:k] are left alone."""
  k, batch, length = 4, 2, 12
  rng = np.random.default_rng(0)
  embeds = jnp.asarray(rng.normal(size=(batch, length, CFG.d_model)), jnp.float32)
  mask = jnp.asarray(np.arange(length)[None] < np.array([[length], [9]]))
  prompts = jnp.asarray(rng.normal(size=(CFG.num_encoder_layers, P, CFG.d_model)), jnp.float32)
  ours = EncoderDecoder(CFG).apply({"params": backbone}, embeds, mask, prompts, layer_mode, k,
                                   method=EncoderDecoder.encode_embeddings)
  enc = backbone["encoder"]
  positions = jnp.arange(length)
  bias = RelativePositionBias(CFG.num_heads, CFG.relative_attention_num_buckets,
                              CFG.relative_attention_max_distance, True).apply(
                                  {"params": enc["relpos_bias"]}, positions, positions)
  bias, x = bias + attention_mask_bias(None, mask), embeds
  for i in range(CFG.num_encoder_layers):
    rows = prompts[i] if layer_mode == "replace" else x[:, k:k + P] + prompts[i]
    x = x.at[:, k:k + P].set(jnp.broadcast_to(rows, (batch, P, CFG.d_model)))
    x, _ = EncoderLayer(CFG).apply({"params": enc[f"layers_{i}"]}, x, bias)
  reference = RMSNorm(CFG.layer_norm_epsilon).apply({"params": enc["encoder_norm"]}, x)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5, rtol=1e-5)
  # Offset 0 is the unshifted hook, bit for bit.
  x = embeds
  np.testing.assert_array_equal(np.asarray(apply_layer_prompt(x, prompts[0], layer_mode, 0)),
                                np.asarray(apply_layer_prompt(x, prompts[0], layer_mode)))
  with pytest.raises(ValueError, match="offset 10"):
    EncoderDecoder(CFG).apply({"params": backbone}, embeds, mask, prompts, layer_mode, 10,
                              method=EncoderDecoder.encode_embeddings)


def test_deep_prompt_before_prompt_scanned_equals_unscanned(backbone, vocab, vocab_path):
  method = DeepPrompt(length=P)
  mode = mode_token.tokenize("[NLU]", "before_prompt", vocab_path)
  prompt = _randomised(method.init(jax.random.key(4), backbone), 5)
  tokens, dec = input_tokens(vocab), decoder_inputs()
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  scanned_cfg = CFG.replace(scan_layers=True)
  scanned = build.place_params(build.host_params(backbone), scanned_cfg, mesh)
  run = lambda cfg, bb: np.asarray(prompted_logits(cfg, method, {"backbone": bb, **prompt},
                                                   tokens, dec, mode_token=mode))
  np.testing.assert_allclose(run(scanned_cfg, scanned), run(CFG, backbone), atol=1e-5, rtol=1e-5)


def test_non_prefix_placement_is_not_supported(backbone, vocab, vocab_path, tmp_path):
  method = PromptTuning(length=P, placement="after_bos")
  params = {"backbone": backbone, **method.init(jax.random.key(1), backbone)}
  mode = mode_token.tokenize("[NLU]", vocabulary_path=vocab_path)
  with pytest.raises(NotImplementedError, match="placement='after_bos'"):
    prompted_logits(CFG, method, params, input_tokens(vocab), decoder_inputs(), mode_token=mode)
  prompted_logits(CFG, method, params, input_tokens(vocab), decoder_inputs())  # no mode: fine
  config = TrainConfig(model_dir=str(tmp_path), model="tiny_ul2", method=method,
                       mode_token="[NLU]", vocabulary_path=vocab_path)
  with pytest.raises(NotImplementedError, match="prefix"):
    build_experiment(config, devices=jax.devices()[:1])


# 3. Train, eval, decode and score with a mode token.

def tiny_config(tmp_path, vocab_path, **overrides) -> TrainConfig:
  fields = dict(model_dir=str(tmp_path / "run"),
                mixture_or_task_name=str(write_task(tmp_path / "t.jsonl")), model="tiny_ul2",
                vocabulary_path=vocab_path, method=PromptTuning(length=P),
                task_feature_lengths=LENGTHS, batch_size=8, train_steps=2, eval_split="train",
                eval_max_examples=8, dropout_rate=0.1, mode_token="[NLU]",
                mesh=sharding.MeshConfig(data=2, model=1))
  fields.update(overrides)
  return TrainConfig(**fields)


def test_train_step_eval_and_decode_with_a_mode_token(tmp_path, vocab, vocab_path):
  config = tiny_config(tmp_path, vocab_path, mode_token_position="after_prompt",
                       dropout_rate=0.0)
  exp = build_experiment(config, devices=jax.devices()[:2])
  assert exp.spec.mode_token == ModeToken(tuple(vocab.encode("[NLU]")), "after_prompt")
  local = next(make_batch_iterator(config.mixture_or_task_name, LENGTHS, config.batch_size,
                                   vocabulary=vocab))
  batch = jax.device_put(local, exp.batch_shardings(local))
  state = exp.init_state()
  before = {k: np.asarray(v) for k, v in param_tree.flatten(state.params).items()}
  frozen_before = {k: np.asarray(v) for k, v in param_tree.flatten(exp.frozen).items()}
  assert set(before) == {"prompt/prompt"}
  # Eval losses at the initial parameters, with and without the mode token.
  loss = lambda spec: float(jax.jit(functools.partial(eval_step, spec=spec))(
      exp.full_params(state), batch)["loss"])
  with_mode, without = loss(exp.spec), loss(dataclasses.replace(exp.spec, mode_token=ModeToken()))
  state, metrics = exp.train_step_fn(batch)(state, exp.frozen, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
  assert not np.array_equal(np.asarray(state.params["prompt"]["prompt"]), before["prompt/prompt"])
  assert set(param_tree.flatten(state.params)) == {"prompt/prompt"}
  for path, value in param_tree.flatten(exp.frozen).items():
    np.testing.assert_array_equal(np.asarray(value), frozen_before[path], err_msg=path)

  # The step's loss (no dropout) is the eval step's with the mode token, not without it.
  np.testing.assert_allclose(float(metrics["loss"]), with_mode, rtol=1e-5)
  assert not np.isclose(with_mode, without, rtol=1e-3)

  # Scoring logits and evaluation (greedy decoding) run with it.
  params = exp.full_params(state)
  inputs = (batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  logits = np.asarray(evaluation.make_logits_fn(exp, params)(*inputs))
  run = jax.jit(lambda p, x, d, mode: prompted_logits(exp.model, exp.method, p, x, d,
                                                      mode_token=mode), static_argnums=3)
  np.testing.assert_array_equal(logits, np.asarray(run(params, *inputs, exp.spec.mode_token)))
  assert not np.allclose(logits, np.asarray(run(params, *inputs, ModeToken())), atol=1e-3)
  results = evaluation.evaluate(exp, params, config, vocab)
  assert results["eval/examples"] == 8.0 and 0.0 <= results["eval/exact_match"] <= 1.0


def test_zero_shot_decoding_equals_decoding_the_prefixed_text(tmp_path, vocab, vocab_path):
  """No method (`method=None`): greedy decoding and scoring see `[NLU] ` + inputs."""
  exp = build_experiment(tiny_config(tmp_path, vocab_path, method=None,
                                     mesh=sharding.MeshConfig(data=1, model=1)),
                         devices=jax.devices()[:1])
  params = param_tree.merge(exp.trainable_init, exp.frozen)
  tokens = input_tokens(vocab)
  prefixed = pad([list(vocab.encode("[NLU] " + t)) + [1] for t in TEXTS],
                 tokens.shape[1] + len(exp.spec.mode_token.ids))
  ours = evaluation.make_decode_fn(exp, 6, "greedy")(params, tokens)
  model = EncoderDecoder(exp.model)
  encoded = model.apply({"params": params["backbone"]}, prefixed, method=EncoderDecoder.encode)
  plain = search.decode(exp.model, params["backbone"], encoded, prefixed > 0, 6)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(plain))
  dec = decoder_inputs()  # jitted vs eager: 1e-5
  np.testing.assert_allclose(
      np.asarray(evaluation.make_logits_fn(exp, params)(tokens, dec)),
      np.asarray(model.apply({"params": params["backbone"]}, prefixed, dec)), atol=1e-5, rtol=1e-5)


# 5. Bad configurations.

def test_bad_configurations_fail_clearly(tmp_path, vocab_path):
  with pytest.raises(ValueError, match=r"mode_token_position must be one of .*'before_prompt', "
                                       r"'after_prompt'.*'front'"):
    TrainConfig(model_dir=str(tmp_path), mode_token="[NLU]", mode_token_position="front")
  with pytest.raises(ValueError, match="mode_token_position"):
    ModeToken((784,), "prefix")
  with pytest.raises(ValueError, match=r"mode_token='\[NLU\]' needs vocabulary_path"):
    build_experiment(TrainConfig(model_dir=str(tmp_path), model="tiny_ul2", mode_token="[NLU]"),
                     devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="tokenises to no ids"):
    mode_token.tokenize(" ", vocabulary_path=vocab_path)
  with pytest.raises(ValueError, match="positive"):
    ModeToken((784, 0))
  assert mode_token.tokenize("", "after_prompt") == ModeToken((), "after_prompt")  # no vocab needed


def test_gin_macros(tmp_path, vocab_path):
  base = [f"MODEL_DIR = '{tmp_path}'", "MIXTURE_OR_TASK_NAME = 'x.jsonl'"]
  files = ["runs/train.gin", "methods/prompt_tuning.gin"]
  config = gin_setup.load_config(files, base)
  assert (config.mode_token, config.mode_token_position) == ("", "before_prompt")
  flags = ["--gin.MODE_TOKEN=[NLG]", "--gin.MODE_TOKEN_POSITION=after_prompt"]
  _, bindings, _ = gin_setup.parse(flags)
  config = gin_setup.load_config(files, base + bindings)
  assert (config.mode_token, config.mode_token_position) == ("[NLG]", "after_prompt")
  with pytest.raises(ValueError, match="mode_token_position"):
    gin_setup.load_config(files, base + ["MODE_TOKEN_POSITION = 'middle'"])


def test_run_signature_includes_the_mode_token(tmp_path, vocab, vocab_path):
  """Resuming with another mode token (or position) is refused like any other run's checkpoints:
  the signature carries it; without one the signature keeps its earlier form."""
  from ptuning.train.loop import run_signature
  signatures = {}
  for name, overrides in {"before": {}, "after": {"mode_token_position": "after_prompt"},
                          "none": {"mode_token": None}}.items():
    exp = build_experiment(tiny_config(tmp_path, vocab_path, **overrides),
                           devices=jax.devices()[:2])
    signatures[name] = json.loads(run_signature(exp))
  assert len({json.dumps(s, sort_keys=True) for s in signatures.values()}) == 3
  assert signatures["before"]["mode_token"] == {"ids": list(vocab.encode("[NLU]")),
                                                "position": "before_prompt"}
  assert set(signatures["none"]) == {"method", "trainable"}
