"""`attention_impl='cudnn'`: T5 attention through `jax.nn.dot_product_attention`, cuDNN's flash
attention on a GPU, where no `[B, H, Q, K]` scores or probabilities are written to memory.

T5 adds a bias to the logits (relative positions and masks). cuDNN's backward with a bias also
writes the bias gradient, `dS [B, H, Q, K]`, and then reduces it and takes `dQ` from it in two
more kernels: on a T5 1.1 XL step on an H200 about a third of the attention time. Prompt tuning
never needs that gradient (the position-bias table is frozen), so `fused_attention` asks JAX,
through a `custom_vjp` with symbolic zeros, whether the bias is being differentiated at all; when
it is not, the GPU path calls cuDNN without the bias gradient (`variadic_args=(True, False)` of
JAX's cuDNN wrapper, which its public function sets only for boolean masks). Where the bias is
differentiated (full fine-tuning), the public call computes it as usual.

Padding by lengths (`PaddedBias`): the encoder's bias is its relative-position bias `[1, H, L, L]`
plus each example's key mask, `[B, H, L, L]` once added: 767 MB in bfloat16 for T5 1.1 XL at
batch 32 and 612 positions, read by each layer's forward and backward. Where the key padding is
trailing (as SeqIO pads, with prompts in front), the encoder passes the position bias shared by
the batch and each example's key length instead, and cuDNN masks keys at or past it (its padding
mask): the bias read is 24 MB. Padding must be trailing: `key_lengths_of` takes the last
visible key, so a masked key before it would be attended to.

Elsewhere (CPU, float32) the same function runs with `implementation='xla'`, which is how the CPU
tests check the conventions, the padding by lengths and the bias-gradient switch.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class PaddedBias(NamedTuple):
  """A bias shared by the batch and each example's key length (keys `>= key_lengths[b]` of
  example b are masked): the encoder's bias for `attention_impl='cudnn'`."""

  position: Array  # [1, H, Q, K] float32
  key_lengths: Array  # [B] int32


def key_lengths_of(mask: Array) -> Array:
  """`mask [B, K]` (1 = visible) -> `[B]` int32: one past each row's last visible key (at least
  1, so a row with no visible key attends to key 0 and stays finite, as with a mask bias)."""
  positions = jnp.arange(1, mask.shape[1] + 1, dtype=jnp.int32)
  return jnp.maximum(jnp.max(jnp.where(mask > 0, positions, 0), axis=1), 1)


def even_rows(embeds: Array, mask: Array) -> tuple[Array, Array]:
  """`embeds [B, L, E]`, `mask [B, L]` -> `[B, L', E]`, `[B, L']` with L' = L rounded up to even:
  an odd sequence gets one masked zero row at the end. Applied once to the encoder input (with
  its mask, which the cross-attention reads too), it spares `fused_attention` padding each layer's
  queries, keys and values to the even lengths cuDNN needs."""
  if embeds.shape[1] % 2 == 0:
    return embeds, mask
  return (jnp.pad(embeds, ((0, 0), (0, 1), (0, 0))),
          jnp.pad(mask, ((0, 0), (0, 1))))


def fused_attention(query: Array, key: Array, value: Array, bias: Array | PaddedBias) -> Array:
  """`query [B, Q, H, D]`, `key`, `value [B, K, H, D]`, float32 `bias` broadcastable to
  `[B, H, Q, K]` (or a `PaddedBias`) -> `[B, Q, H, D]`, with T5's conventions: no logit
  scaling; the bias cast to the activation dtype, masks clipped to a finite large negative number
  (finite in bfloat16, as cuDNN needs). Only the bias's batch and head dimensions may broadcast
  (cuDNN reads it whole)."""
  dtype = query.dtype
  key_lengths = None
  if isinstance(bias, PaddedBias):
    bias, key_lengths = bias.position, bias.key_lengths
  q_len, k_len = query.shape[1], key.shape[1]
  bias = jnp.broadcast_to(bias, bias.shape[:2] + (q_len, k_len))
  masked = 0.7 * float(jnp.finfo(dtype).min)
  bias = jnp.maximum(bias, masked).astype(dtype)
  query, key, value, bias = _even_lengths(query, key, value, bias, masked)
  on_gpu = jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)
  out = _attention(query, key, value, bias, key_lengths, "cudnn" if on_gpu else "xla")
  return out[:, :q_len]


def _even_lengths(query: Array, key: Array, value: Array, bias: Array, masked: float):
  """Odd query or key lengths padded by one (cuDNN's training kernels with a bias take even
  lengths only: a prompt of 5 before 512 inputs is 517 positions): a zero query, whose output is
  dropped, and a zero key that the bias (`masked`; beyond any key length too) gives no weight
  (exactly none wherever a row has a visible key). Done on every backend, so that the CPU tests
  run the shapes the GPU gets."""
  pad_q, pad_k = query.shape[1] % 2, key.shape[1] % 2
  if not (pad_q or pad_k):
    return query, key, value, bias
  rows = ((0, 0), (0, pad_q), (0, 0), (0, 0))
  keys = ((0, 0), (0, pad_k), (0, 0), (0, 0))
  bias = jnp.pad(bias, ((0, 0), (0, 0), (0, pad_q), (0, 0)))
  bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, pad_k)), constant_values=masked)
  return jnp.pad(query, rows), jnp.pad(key, keys), jnp.pad(value, keys), bias


def _public(implementation: str, key_lengths: Array | None):
  return lambda q, k, v, b: jax.nn.dot_product_attention(
      q, k, v, bias=b, scale=1.0, key_value_seq_lengths=key_lengths,
      implementation=implementation)


def _cudnn_without_bias_gradient(query: Array, key: Array, value: Array, bias: Array,
                                 key_lengths: Array | None) -> Array:
  """cuDNN flash attention whose backward returns no bias gradient (JAX's own cuDNN primitive,
  as `jax.nn.dot_product_attention` calls it, with `has_dbias=False`); with `key_lengths`, its
  padding mask (query lengths: all of Q)."""
  from jax._src.cudnn import fused_attention_stablehlo as sdpa
  unused = jnp.zeros(0, dtype=query.dtype)
  q_lengths, kv_lengths, mask_type = unused, unused, sdpa.MaskType.NO_MASK
  if key_lengths is not None:
    q_lengths = jnp.full(key_lengths.shape, query.shape[1], jnp.int32)
    kv_lengths, mask_type = key_lengths, sdpa.MaskType.PADDING
  return sdpa._dot_product_attention(  # pylint: disable=protected-access
      query, key, value, bias, q_lengths, kv_lengths, unused, unused, unused, unused, 1.0, 42,
      0.0, (True, False), mask_type, sdpa.AttentionLayout.BTNH.value, None,
      sdpa.check_cudnn_version(), False)


# The parameters of JAX's cuDNN primitive that `_cudnn_without_bias_gradient` passes by position
# (jax 0.10 and 0.11); another JAX falls back to the public call, with the bias gradient.
PRIVATE_CUDNN_PARAMETERS = (
    "query", "key", "value", "bias", "q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets",
    "page_table_k", "page_table_v", "scale", "seed", "dropout_rate", "variadic_args", "mask_type",
    "layout", "sliding_window_length", "cudnn_version", "return_residual")


def private_cudnn_call_matches() -> bool:
  """Whether this JAX's cuDNN primitive takes the arguments `_cudnn_without_bias_gradient` gives."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as sdpa
  except ImportError:
    return False
  fun = getattr(getattr(sdpa, "_dot_product_attention", None), "fun", None)
  return (fun is not None and hasattr(sdpa, "AttentionLayout") and hasattr(sdpa, "MaskType")
          and tuple(inspect.signature(fun).parameters) == PRIVATE_CUDNN_PARAMETERS)


def _frozen_bias(implementation: str, key_lengths: Array | None):
  """`(q, k, v, bias) -> out` for a bias that gets no gradient: the cuDNN call without one on a
  GPU (the public one, with a warning, if this JAX's primitive differs), the XLA call elsewhere."""
  if implementation == "cudnn":
    if private_cudnn_call_matches():
      return lambda q, k, v, b: _cudnn_without_bias_gradient(q, k, v, b, key_lengths)
    warnings.warn("jax's cuDNN attention primitive changed: the frozen T5 bias gets a gradient "
                  "computed and dropped (slower; see ptuning/model/flash_attention.py)")
  return _public(implementation, key_lengths)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(query, key, value, bias, key_lengths, implementation):
  return _public(implementation, key_lengths)(query, key, value, bias)


def _attention_fwd(query, key, value, bias, key_lengths, implementation):
  q, k, v = query.value, key.value, value.value
  lengths = None if key_lengths is None else key_lengths.value
  if bias.perturbed:  # the bias is differentiated: cuDNN writes its gradient
    out, vjp = jax.vjp(_public(implementation, lengths), q, k, v, bias.value)
  else:
    frozen = _frozen_bias(implementation, lengths)
    out, vjp = jax.vjp(lambda q, k, v: frozen(q, k, v, bias.value), q, k, v)
  return out, vjp


def _attention_bwd(implementation, vjp, grad):
  del implementation
  if isinstance(grad, jax.custom_derivatives.SymbolicZero):  # the output got no cotangent
    grad = jnp.zeros(grad.shape, grad.dtype)
  grads = vjp(grad)
  # None: no gradient for a frozen bias, nor for the key lengths
  return (*grads, None) if len(grads) == 4 else (*grads, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)
