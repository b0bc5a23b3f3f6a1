"""`attention_impl='cudnn'` (ptuning/model/flash_attention.py) on CPU: the XLA implementation of
the same call, T5's conventions, and the switch that drops the bias gradient when nothing
differentiates the bias (on a GPU, the cuDNN call without its `dbias` kernels;
benchmarks/gpu_attention_parity.py checks that call against float32 there)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptuning.model import flash_attention
from ptuning.model.layers import MASK_VALUE, dot_product_attention

B, T, S, H, D = 2, 6, 10, 3, 8


def inputs():
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (B, T, H, D))
  k, v = (jax.random.normal(keys[i], (B, S, H, D)) for i in (1, 2))
  bias = 2.0 * jax.random.normal(keys[3], (1, H, T, S)) + jnp.where(
      jnp.arange(S) < jnp.array([[S], [7]]), 0.0, MASK_VALUE)[:, None, None, :]  # [B, H, T, S]
  return q, k, v, bias, jax.random.normal(keys[4], (B, T, H, D))


@pytest.fixture
def frozen_calls(monkeypatch):
  calls = []
  original = flash_attention._frozen_bias
  monkeypatch.setattr(flash_attention, "_frozen_bias",
                      lambda impl, lengths: calls.append(impl) or original(impl, lengths))
  return calls


@pytest.mark.parametrize("bias_gradient", [False, True])
def test_fused_attention_matches_t5_attention_and_drops_only_an_unused_bias_gradient(
    frozen_calls, bias_gradient):
  q, k, v, bias, cotangent = inputs()
  argnums = (0, 1, 2, 3) if bias_gradient else (0, 1, 2)
  loss = lambda attend: lambda q, k, v, b: jnp.sum(attend(q, k, v, b) * cotangent)
  out, grads = jax.value_and_grad(loss(flash_attention.fused_attention), argnums)(q, k, v, bias)
  ref_out, ref_grads = jax.value_and_grad(loss(dot_product_attention), argnums)(q, k, v, bias)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5)
  assert len(grads) == len(argnums)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
  if bias_gradient:  # the differentiated bias takes the public call, which returns its gradient
    assert frozen_calls == [] and float(jnp.abs(grads[3]).max()) > 0
  else:
    assert frozen_calls == ["xla"]  # on CPU; on a GPU in bfloat16 this is "cudnn"


@pytest.mark.parametrize("bias_gradient", [False, True])
def test_padding_by_key_lengths_matches_the_padding_mask_in_the_bias(frozen_calls, bias_gradient):
  """`PaddedBias` (a bias shared by the batch plus key lengths, what the encoder passes for
  'cudnn') gives the output and gradients of the `[B, H, T, S]` bias with the mask added; a
  differentiated shared bias gets the batch sum of the full bias's gradient."""
  q, k, v, _, cotangent = inputs()
  position = 2.0 * jax.random.normal(jax.random.key(7), (1, H, T, S))
  mask = jnp.arange(S) < jnp.array([[S], [7]])  # example 1: keys 7.. are padding
  lengths = flash_attention.key_lengths_of(mask)
  full = position + jnp.where(mask, 0.0, MASK_VALUE)[:, None, None, :]
  argnums = (0, 1, 2, 3) if bias_gradient else (0, 1, 2)

  def loss_padded(q, k, v, b):
    return jnp.sum(flash_attention.fused_attention(
        q, k, v, flash_attention.PaddedBias(b, lengths)) * cotangent)

  loss_full = lambda q, k, v, b: jnp.sum(dot_product_attention(q, k, v, b) * cotangent)
  out, grads = jax.value_and_grad(loss_padded, argnums)(q, k, v, position)
  ref_out, ref_grads = jax.value_and_grad(loss_full, argnums)(q, k, v, full)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5)
  for g, r in zip(grads[:3], ref_grads[:3]):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
  if bias_gradient:
    assert grads[3].shape == (1, H, T, S) and frozen_calls == []
    np.testing.assert_allclose(grads[3], ref_grads[3].sum(0, keepdims=True), rtol=1e-4, atol=1e-5)
  else:
    assert frozen_calls == ["xla"]


@pytest.mark.parametrize("padded_bias", [False, True])
@pytest.mark.parametrize("bias_gradient", [False, True])
def test_odd_lengths_reach_the_kernel_even_and_give_the_unpadded_attention(
    monkeypatch, padded_bias, bias_gradient):
  """cuDNN's training kernels with a bias take even lengths only: 5 queries and 9 keys reach the
  kernel as 6 and 10 (one masked key, one dropped query) with the outputs and gradients of the
  unpadded attention, the bias's included, for a `[B, H, T, S]` bias and for a `PaddedBias`."""
  shapes = []
  original = flash_attention._attention
  monkeypatch.setattr(flash_attention, "_attention",
                      lambda q, k, v, b, *rest: shapes.append((q.shape, k.shape, b.shape))
                      or original(q, k, v, b, *rest))
  t, s = T - 1, S - 1
  q, k, v, _, cotangent = inputs()
  q, k, v, cotangent = q[:, :t], k[:, :s], v[:, :s], cotangent[:, :t]
  position = 2.0 * jax.random.normal(jax.random.key(7), (1, H, t, s))
  mask = jnp.arange(s) < jnp.array([[s], [6]])
  full = position + jnp.where(mask, 0.0, MASK_VALUE)[:, None, None, :]
  bias = flash_attention.PaddedBias(position, flash_attention.key_lengths_of(mask))
  ours = (lambda q, k, v, b: flash_attention.fused_attention(q, k, v, bias._replace(position=b))
          ) if padded_bias else flash_attention.fused_attention
  argnums = (0, 1, 2, 3) if bias_gradient else (0, 1, 2)
  loss = lambda attend: lambda q, k, v, b: jnp.sum(attend(q, k, v, b) * cotangent)
  out, grads = jax.value_and_grad(loss(ours), argnums)(q, k, v, position if padded_bias else full)
  ref_out, ref_grads = jax.value_and_grad(loss(dot_product_attention), argnums)(q, k, v, full)
  assert shapes == [((B, T, H, D), (B, S, H, D), (1 if padded_bias else B, H, T, S))]
  np.testing.assert_allclose(out, ref_out, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    if g.shape != r.shape:  # a shared bias: the batch sum of the full bias's gradient
      r = r.sum(0, keepdims=True)
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_key_lengths_are_one_past_the_last_visible_key():
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(flash_attention.key_lengths_of(mask), [3, 5, 3, 1])


def test_masked_keys_get_no_weight_in_bfloat16():
  """Masks are clipped to a finite bfloat16 number: a fully visible row and a padded one both
  give finite outputs, and the padded keys' values do not leak into them."""
  q, k, v, bias, _ = inputs()
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = flash_attention.fused_attention(q, k, v, bias)
  leaked = flash_attention.fused_attention(q, k, v.at[1, 7:].set(1e4), bias)
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_array_equal(np.asarray(out[1], np.float32), np.asarray(leaked[1], np.float32))


def test_gin_attention_impl_and_norm_barrier_reach_the_model(tmp_path):
  """`--gin.ATTENTION_IMPL='cudnn'` (runs/train.gin) sets the backbone's attention; the default
  keeps 'recompute'; an unknown name fails with the field and the choices, and so does 'cudnn'
  with dropout. `NORM_BARRIER` (default True) sets `T5Config.norm_barrier`."""
  from ptuning import gin_setup
  from ptuning.train.experiment import build_experiment

  def model_of(*bindings):
    config = gin_setup.load_config(
        ["runs/train.gin", "methods/prompt_tuning.gin", "models/tiny_t5_1_1.gin"],
        [f"MODEL_DIR = '{tmp_path}'", "PROMPT_LENGTH = 4", *bindings])
    return build_experiment(config, devices=jax.devices()[:1], abstract=True).model

  assert model_of().attention_impl == "recompute"
  assert model_of("ATTENTION_IMPL = 'cudnn'", "DROPOUT_RATE = 0.0").attention_impl == "cudnn"
  assert model_of().norm_barrier and not model_of("NORM_BARRIER = False").norm_barrier
  with pytest.raises(ValueError, match=r"attention_impl='flash'.*cudnn"):
    model_of("ATTENTION_IMPL = 'flash'")
  # runs/train.gin's dropout (0.1) would be silently lost to flash attention: refused instead.
  with pytest.raises(ValueError, match=r"'cudnn'.*no dropout.*dropout_rate=0.1.*DROPOUT_RATE"):
    model_of("ATTENTION_IMPL = 'cudnn'")


def test_the_pinned_jax_has_the_cudnn_primitive_we_call_without_a_bias_gradient():
  """The GPU path calls JAX's own cuDNN primitive by position; with the pinned JAX its parameters
  are the ones we pass (a JAX that changes them falls back to the public call, with a warning)."""
  assert flash_attention.private_cudnn_call_matches()
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the fallback to the public call would warn
    flash_attention._frozen_bias("cudnn", None)
