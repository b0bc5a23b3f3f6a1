"""Activation memory: `attention_impl='recompute'` (the default) drops the per-layer float32
attention probabilities from the compiled prompt-tuning step and changes no number that matters;
the gated MLP's `gated_activation` keeps two `[B, S, d_ff]` buffers per layer, not six.

Memory figures come from XLA's compiled memory analysis of the abstract step (deterministic, no
timing); outputs and gradients from one tiny backbone run both ways.
"""

import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptuning import param_tree, plan
from ptuning.model import flash_attention, layers
from ptuning.model.config import T5Config
from ptuning.model.layers import ACTIVATIONS, gated_activation
from ptuning.prompts.method import prompted_logits
from ptuning.prompts.vanilla import PromptTuning
from ptuning.train import losses
from ptuning.train.experiment import TrainConfig, build_experiment
from ptuning.train.step import loss_and_metrics

# Attention-heavy on purpose: `[B, H, P+L, P+L]` float32 is 1 MiB per layer, activations 64 KiB;
# six encoder layers so that what is kept per layer outweighs one layer's backward transients.
MODEL = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=6,
                 num_decoder_layers=2)
BATCH, INPUTS, TARGETS, PROMPT = 4, 120, 4, 8


def config(tmp_path, impl: str, method="prompt_tuning", dropout_rate=0.0,
           prompt=PROMPT) -> TrainConfig:
  return TrainConfig(model_dir=str(tmp_path), model=MODEL.replace(attention_impl=impl),
                     method=PromptTuning(length=prompt) if method == "prompt_tuning" else None,
                     batch_size=BATCH, dropout_rate=dropout_rate,
                     task_feature_lengths={"inputs": INPUTS, "targets": TARGETS})


def compiled_memory(cfg: TrainConfig) -> dict:
  exp = build_experiment(cfg, devices=jax.devices()[:1], abstract=True)
  batch = plan.abstract_batch(cfg)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  analysis = exp.train_step_fn(batch).lower(exp.abstract_state, exp.frozen, batch,
                                            rng).compile().memory_analysis()
  return {k: getattr(analysis, f"{k}_size_in_bytes") for k in ("argument", "temp")}


def test_recompute_drops_the_attention_probabilities_from_the_prompt_tuning_step(tmp_path):
  plain = compiled_memory(config(tmp_path, "plain"))
  recompute = compiled_memory(config(tmp_path, "recompute"))
  length = PROMPT + INPUTS
  probabilities = BATCH * MODEL.num_heads * length * length * 4  # one float32 [B, H, S, S]
  assert plain["argument"] == recompute["argument"]
  # Plain autodiff keeps at least the probabilities of every encoder layer (in practice also the
  # softmax's exponentials and normaliser); recompute keeps none of them.
  saved = plain["temp"] - recompute["temp"]
  assert saved >= MODEL.num_encoder_layers * probabilities, (plain, recompute)


def batch_of(seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, MODEL.vocab_size, (BATCH, INPUTS)).astype(np.int32)
  tokens[1, 90:] = 0  # padding: the mask bias matters
  targets = rng.integers(2, MODEL.vocab_size, (BATCH, TARGETS)).astype(np.int32)
  decoder = np.concatenate([np.zeros((BATCH, 1), np.int32), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": tokens, "decoder_input_tokens": decoder,
          "decoder_target_tokens": targets, "decoder_loss_weights": np.ones_like(targets)}


def opcode_counts(hlo: str) -> collections.Counter:
  """{opcode: instructions} of an HLO module's text (names and metadata left out)."""
  return collections.Counter(re.findall(r"= [^ ]+ ([a-z][\w-]*)\(", hlo))


def logits_loss_grads(exp, model: T5Config, batch: dict, rng=None) -> tuple:
  """(float32 logits, loss, trainable gradients, the gradient step's texts {'lowered', 'compiled'})
  of `exp`'s initial parameters with its backbone config replaced by `model`."""
  spec = dataclasses.replace(exp.spec, model=model)
  factor, weights = losses.loss_normalizing_factor_and_weights(None, batch)
  args = (exp.trainable_init, exp.frozen, batch, rng, weights)
  lowered = jax.jit(jax.grad(lambda t, f, b, r, w: loss_and_metrics(t, f, b, r, spec, factor, w),
                             has_aux=True)).lower(*args)
  compiled = lowered.compile()
  grads, metrics = compiled(*args)
  params = param_tree.merge(exp.trainable_init, exp.frozen)
  logits = jax.jit(lambda p, e, d, r: prompted_logits(model, spec.method, p, e, d, r))(
      params, batch["encoder_input_tokens"], batch["decoder_input_tokens"], rng)
  return (np.asarray(logits, np.float32), float(metrics["loss"]), grads,
          {"lowered": lowered.as_text(), "compiled": compiled.as_text()})


@pytest.mark.parametrize("method,dropout_rate,impl,prompt", [
    ("prompt_tuning", 0.0, "recompute", PROMPT), ("prompt_tuning", 0.2, "recompute", PROMPT),
    ("full_finetuning", 0.0, "recompute", PROMPT), ("prompt_tuning", 0.0, "cudnn", PROMPT),
    ("prompt_tuning", 0.0, "cudnn", PROMPT - 1), ("full_finetuning", 0.0, "cudnn", PROMPT)])
def test_recompute_gives_the_same_logits_loss_and_gradients(tmp_path, method, dropout_rate, impl,
                                                            prompt):
  """... and so does 'cudnn' (`jax.nn.dot_product_attention`; its XLA implementation here, with
  the bias cast and masks clipped as for cuDNN; it has no dropout, see
  tests/test_flash_attention.py), also with an odd number of encoder positions (prompt 7 + 120
  inputs: padded to even for cuDNN)."""
  exp = build_experiment(config(tmp_path, "plain", method, dropout_rate, prompt),
                         devices=jax.devices()[:1])
  batch, rng = batch_of(), jax.random.key(3) if dropout_rate else None
  logits_p, loss_p, grads_p, _ = logits_loss_grads(exp, exp.model, batch, rng)
  logits_r, loss_r, grads_r, _ = logits_loss_grads(exp, exp.model.replace(attention_impl=impl),
                                                   batch, rng)
  # On CPU 'recompute' runs the fused kernel (tests/test_cpu_attention.py), which sums in
  # another order than XLA: a few float32 rounding steps on logits of magnitude about 2.
  np.testing.assert_allclose(logits_r, logits_p, rtol=0, atol=4e-6)
  assert loss_r == pytest.approx(loss_p, rel=1e-6)
  flat_p, flat_r = jax.tree.leaves_with_path(grads_p), jax.tree.leaves(grads_r)
  assert len(flat_p) == len(flat_r) and len(flat_p) >= (1 if method == "prompt_tuning" else 30)
  for (path, g_p), g_r in zip(flat_p, flat_r):
    g_p, g_r = np.asarray(g_p), np.asarray(g_r)
    scale = np.abs(g_p).max()
    assert scale > 0, jax.tree_util.keystr(path)  # every trainable leaf gets a gradient
    np.testing.assert_allclose(g_r, g_p, rtol=0, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_init_state_donates_the_initial_trainable_tree(tmp_path):
  """Full fine-tuning: the train state takes over the initial backbone's buffers, so the
  experiment no longer holds a second copy; `trainable_init` keeps only shapes and shardings."""
  exp = build_experiment(config(tmp_path, "recompute", "full_finetuning"),
                         devices=jax.devices()[:1])
  initial = jax.tree.leaves(exp.trainable_init)
  pointers = [x.unsafe_buffer_pointer() for x in initial]
  state = exp.init_state()
  assert [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.params)] == pointers
  assert all(x.is_deleted() for x in initial)
  abstract = jax.tree.leaves(exp.trainable_init)
  assert all(isinstance(a, jax.ShapeDtypeStruct) and a.shape == x.shape and a.sharding == x.sharding
             for a, x in zip(abstract, initial))
  assert param_tree.count(exp.trainable_init) == param_tree.count(state.params)
  with pytest.raises(ValueError, match="already called"):
    exp.init_state()


@pytest.mark.parametrize("activation", ["gated-gelu", "gated-silu"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_gated_activation_gradients_equal_autodiff(activation, dtype):
  gate, linear, grad = (jax.random.normal(jax.random.key(i), (3, 7, 16)).astype(dtype)
                        for i in range(3))
  plain = lambda g, l: ACTIVATIONS[activation](g) * l
  ours_out, ours_vjp = jax.vjp(lambda g, l: gated_activation(g, l, activation), gate, linear)
  ref_out, ref_vjp = jax.vjp(plain, gate, linear)
  np.testing.assert_array_equal(np.asarray(ours_out, np.float32), np.asarray(ref_out, np.float32))
  tolerance = 1e-6 if dtype == np.float32 else 1e-2
  for ours, ref in zip(ours_vjp(grad), ref_vjp(grad)):
    assert ours.dtype == ref.dtype == dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32),
                               rtol=tolerance, atol=tolerance)


def test_gated_activation_keeps_two_mlp_buffers_per_layer(tmp_path, monkeypatch):
  """MLP-heavy gated-GELU backbone: the custom backward keeps wi_0 and wi_1's outputs only;
  with autodiff of the tanh GELU the compiled step holds more than one and a half more
  `[B, S, d_ff]` float32 buffers per encoder layer (about 1.7 here; XLA fuses some of the six
  intermediates away)."""
  model = MODEL.replace(d_ff=512, feed_forward="gated-gelu")
  cfg = dataclasses.replace(config(tmp_path, "recompute"), model=model)
  ours = compiled_memory(cfg)
  monkeypatch.setattr(layers, "gated_activation",
                      lambda gate, linear, activation: ACTIVATIONS[activation](gate) * linear)
  plain = compiled_memory(cfg)
  mlp_buffer = BATCH * (PROMPT + INPUTS) * model.d_ff * 4
  assert plain["argument"] == ours["argument"]
  assert plain["temp"] - ours["temp"] >= 1.5 * model.num_encoder_layers * mlp_buffer, (plain, ours)


def compiled_cost(cfg: TrainConfig) -> dict:
  """FLOPs (cost analysis) and temporaries of the compiled abstract step."""
  exp = build_experiment(cfg, devices=jax.devices()[:1], abstract=True)
  batch = plan.abstract_batch(cfg)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  compiled = exp.train_step_fn(batch).lower(exp.abstract_state, exp.frozen, batch, rng).compile()
  hlo = compiled.as_text()
  return {"flops": compiled.cost_analysis()["flops"],
          "temp": compiled.memory_analysis().temp_size_in_bytes,
          # matmuls and attention kernels run (the kernel's FLOPs are not in the cost analysis)
          "products": hlo.count(" dot(") + hlo.count('custom_call_target="ptuning_attention')}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dots_remat_saves_the_products_in_both_precisions(tmp_path, dtype):
  """'dots' recomputes no matmul (the FLOPs of no remat) and keeps less than no remat; 'full'
  recomputes the layer. bfloat16 products go through `mixed_einsum`'s custom VJP, which the dot
  policies cannot see: without its checkpoint names 'dots' would recompute as much as 'full'."""
  costs = {}
  for policy in ("none", "dots", "full"):
    cfg = dataclasses.replace(config(tmp_path, "recompute"), dtype=dtype, remat_policy=policy)
    # FLOPs of the unrolled program (cost analysis counts a loop body once); memory of the
    # scanned one (unrolled, XLA:CPU schedules the recomputation early and keeps it).
    unrolled = compiled_cost(cfg)
    costs[policy] = {"flops": unrolled["flops"], "products": unrolled["products"],
                     "temp": compiled_cost(dataclasses.replace(cfg, scan_layers=True))["temp"]}
  print(dtype, costs)
  # 'dots' runs no product twice; what it recomputes is elementwise (bfloat16: the casts to
  # float32 around the CPU attention kernel, whose operands it keeps in bfloat16)
  assert costs["dots"]["products"] == costs["none"]["products"]
  assert costs["full"]["products"] > costs["none"]["products"]
  assert costs["dots"]["flops"] == pytest.approx(costs["none"]["flops"], rel=0.03)
  assert costs["full"]["flops"] > 1.1 * costs["none"]["flops"]
  assert costs["dots"]["temp"] < costs["none"]["temp"]


def test_an_odd_encoder_input_is_padded_once_not_in_every_attention_call(tmp_path, monkeypatch):
  """With 'cudnn', prompt 7 + 120 inputs (127 rows) reach every attention call as 128 (one masked
  row added to the encoder input), so no call pads its queries, keys and values itself."""
  exp = build_experiment(config(tmp_path, "cudnn", prompt=PROMPT - 1), devices=jax.devices()[:1])
  lengths = []
  original = flash_attention._even_lengths
  monkeypatch.setattr(flash_attention, "_even_lengths",
                      lambda q, k, *rest: lengths.append((q.shape[1], k.shape[1]))
                      or original(q, k, *rest))
  batch = batch_of()
  params = param_tree.merge(exp.trainable_init, exp.frozen)
  logits = prompted_logits(exp.spec.model, exp.spec.method, params,
                           batch["encoder_input_tokens"], batch["decoder_input_tokens"])
  length = PROMPT - 1 + INPUTS + 1
  assert logits.shape == (BATCH, TARGETS, MODEL.vocab_size)
  assert lengths == ([(length, length)] * MODEL.num_encoder_layers
                     + [(TARGETS, TARGETS), (TARGETS, length)] * MODEL.num_decoder_layers)


@pytest.mark.parametrize("method", ["prompt_tuning", "full_finetuning"])
def test_norm_barrier_keeps_every_norm_output_whole_and_changes_no_number(tmp_path, method):
  """`T5Config.norm_barrier`: every RMSNorm's output stands behind an optimization barrier in the
  lowered step (so a GPU compiler cannot fuse the scaling into the GEMMs that read it), and
  logits, loss and gradients are those of the model without it (bfloat16 activations)."""
  cfg = config(tmp_path, "cudnn", method)
  cfg = dataclasses.replace(cfg, model=cfg.model.replace(dtype="bfloat16"), dtype="bfloat16")
  exp = build_experiment(cfg, devices=jax.devices()[:1])
  norms = 2 * MODEL.num_encoder_layers + 1 + 3 * MODEL.num_decoder_layers + 1
  assert exp.model.norm_barrier  # the default
  logits_0, loss_0, grads_0, text_0 = logits_loss_grads(
      exp, exp.model.replace(norm_barrier=False), batch_of())
  logits_1, loss_1, grads_1, text_1 = logits_loss_grads(
      exp, exp.model.replace(norm_barrier=True), batch_of())
  assert "optimization_barrier" not in text_0["lowered"]
  assert text_1["lowered"].count("optimization_barrier") >= norms
  # On CPU XLA removes the barriers before fusing anything (a GPU compiler removes them after
  # fusion and scheduling): the same compiled program, instruction for instruction, and the
  # same numbers bit for bit.
  assert opcode_counts(text_1["compiled"]) == opcode_counts(text_0["compiled"])
  assert sum(opcode_counts(text_0["compiled"]).values()) > 100
  np.testing.assert_array_equal(logits_1, logits_0)
  assert loss_1 == loss_0
  flat_0, flat_1 = jax.tree.leaves_with_path(grads_0), jax.tree.leaves(grads_1)
  assert len(flat_0) == len(flat_1) and len(flat_0) >= (1 if method == "prompt_tuning" else 30)
  for (path, g_0), g_1 in zip(flat_0, flat_1):
    assert np.abs(np.asarray(g_0, np.float32)).max() > 0, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(g_1), np.asarray(g_0),
                                  err_msg=jax.tree_util.keystr(path))
