"""T5 building blocks: RMSNorm, relative position bias, multi-head attention with a KV cache, MLP.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) and key
activations are constrained with `nn.with_logical_constraint`; ptuning/sharding.py maps the
names to mesh axes. Nothing here names a mesh axis.

Numerics follow the reference T5 (and transformers' PyTorch port): no 1/sqrt(d_kv) scaling of
attention logits (it is folded into the query initialiser), softmax and norm statistics in
float32, relative position buckets computed in float32 with truncation.

Memory: `recomputed_attention` (the default, `T5Config.attention_impl='recompute'`) keeps only
q, k, v and the shared bias for the backward pass and recomputes the `[B, H, Q, K]` float32
probabilities there, one call at a time; plain autodiff (`'plain'`) keeps them for every layer.
`'cudnn'` (`flash_attention.fused_attention`) never writes them out on a GPU: cuDNN flash attention.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from ptuning.model import cpu_attention, mixed_einsum
from ptuning.model.flash_attention import fused_attention

Array = jax.Array
P = nn.with_logical_partitioning
constrain = nn.with_logical_constraint

# The checkpoint name of `recomputed_attention`'s output (saved by the 'dots' remat policy).
ATTENTION_NAME = "recomputed_attention"

# Large negative number added to attention logits at masked positions (float32).
MASK_VALUE = float(np.finfo(np.float32).min)


def kernel_init(scale: float = 1.0) -> Callable:
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class RMSNorm(nn.Module):
  """T5 layer norm: no mean subtraction, no bias. `[..., embed] -> [..., embed]`.

  `output_barrier` puts the (unchanged) output behind `jax.lax.optimization_barrier`, so that
  XLA computes it once in the norm's own kernel instead of fusing the scaling into the
  prologue of every projection that reads it (`T5Config.norm_barrier`).
  """

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  output_barrier: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", P(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(variance + self.epsilon)
    y = y.astype(self.dtype) * scale.astype(self.dtype)
    return jax.lax.optimization_barrier(y) if self.output_barrier else y


class Dense(nn.Module):
  """`[..., in] @ kernel[in, out]` with logical axes `axes` on the kernel; no bias (as in T5)."""

  features: int
  axes: tuple[str, str]
  init_scale: float = 1.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", P(kernel_init(self.init_scale), self.axes),
                        (x.shape[-1], self.features), self.param_dtype)
    lead = "abcdefgh"[:x.ndim - 1]
    return mixed_einsum.einsum(f"{lead}y,yz->{lead}z", x, kernel, dtype=self.dtype)


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """T5's bucketing of `memory_position - query_position` (int array of any shape) into ids.

  Half the buckets are exact offsets, the rest grow logarithmically up to `max_distance`;
  bidirectional (encoder) stacks use separate buckets for keys after the query.
  """
  ret = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    ret = ret + (relative_position > 0).astype(relative_position.dtype) * num_buckets
    n = jnp.abs(relative_position)
  else:
    n = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # float32 throughout, truncating toward zero, exactly as the reference implementations.
  scaled = (jnp.log(n.astype(jnp.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact))
  val_if_large = max_exact + jnp.where(is_small, 0, scaled).astype(relative_position.dtype)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBias(nn.Module):
  """Learned per-head scalar bias from bucketed relative positions, `-> [1, heads, q, k]` float32."""

  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query_positions: Array, key_positions: Array) -> Array:
    """query_positions: `[q]`, key_positions: `[k]` int32."""
    table = self.param(
        "rel_embedding",
        P(nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"), ("heads", "relpos_buckets")),
        (self.num_heads, self.num_buckets), self.param_dtype)
    relative = key_positions[None, :] - query_positions[:, None]
    buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    bias = jnp.take(table.astype(jnp.float32), buckets, axis=1)  # [heads, q, k]
    return bias[None]


def dot_product_attention(query: Array, key: Array, value: Array, bias: Array,
                          dropout_rng: Array | None = None, dropout_rate: float = 0.0,
                          dtype: jnp.dtype = jnp.float32) -> Array:
  """T5's attention core: `query [B, Q, H, D]`, `key`, `value [B, K, H, D]`, `bias` float32
  broadcastable to `[B, H, Q, K]` -> `[B, Q, H, D]`.

  Logits are not scaled, softmax is float32, the weights are cast to `dtype` and, with a
  `dropout_rng`, dropped out (`nn.Dropout(dropout_rate)`). Differentiated as it is, JAX keeps the
  float32 `[B, H, Q, K]` probabilities (and softmax intermediates) of every call for the backward.
  """
  scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(scores + bias, axis=-1).astype(dtype)
  if dropout_rng is not None:
    weights = nn.Dropout(dropout_rate, parent=None).apply({}, weights, deterministic=False,
                                                        rng=dropout_rng)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def recomputed_attention(query: Array, key: Array, value: Array, bias: Array,
                         dropout_rng: Array | None, dropout_rate: float, dtype: jnp.dtype) -> Array:
  """`dot_product_attention` (same arguments, same forward) whose backward pass recomputes the
  `[B, H, Q, K]` scores and probabilities (and dropout mask) from the saved `query`, `key`,
  `value`, `bias` instead of keeping them: one more `Q x K` product per call in the backward, and
  `[B, H, Q, K]` float32 buffers live for one call at a time instead of for every layer.

  On CPU, where `cpu_attention.supports` the call (no dropout), the fused kernel of
  `cpu_attention` computes it in float32 (the same recomputing backward, no `[B, H, Q, K]`
  buffers at all; bfloat16 operands are cast to float32 and back); on other platforms, and
  otherwise, XLA does."""
  xla = lambda q, k, v, b: _xla_recomputed_attention(q, k, v, b, dropout_rng, dropout_rate, dtype)
  if cpu_attention.supports(query, key, value, bias, dropout_rng, dtype):
    out_dtype = jnp.promote_types(dtype, value.dtype)  # as `dot_product_attention` returns
    cpu = lambda q, k, v, b: cpu_attention.attention(q, k, v, b).astype(out_dtype)
    out = jax.lax.platform_dependent(query, key, value, bias, cpu=cpu, default=xla)
  else:
    out = xla(query, key, value, bias)
  # Named, so that the 'dots' remat policy saves it: the dot policies cannot see the products
  # inside a custom VJP or the CPU kernel, and would recompute the whole attention wherever the
  # backward needs its output (the output projection's weight gradient).
  return checkpoint_name(out, ATTENTION_NAME)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _xla_recomputed_attention(query: Array, key: Array, value: Array, bias: Array,
                              dropout_rng: Array | None, dropout_rate: float,
                              dtype: jnp.dtype) -> Array:
  """`recomputed_attention` in XLA on every platform."""
  return dot_product_attention(query, key, value, bias, dropout_rng, dropout_rate, dtype)


def _recomputed_fwd(query, key, value, bias, dropout_rng, dropout_rate, dtype):
  out = dot_product_attention(query, key, value, bias, dropout_rng, dropout_rate, dtype)
  return out, (query, key, value, bias, dropout_rng)


def _recomputed_bwd(dropout_rate, dtype, residuals, grad):
  query, key, value, bias, dropout_rng = residuals
  # Make the recomputation depend on this call's cotangent (same shape and sharding as `query`;
  # `+ 0 * grad` is exact for finite values): XLA's CPU scheduler otherwise runs every layer's
  # recomputation as soon as its operands exist, early in the backward pass, and the saving is
  # lost (an optimization barrier does not survive to CPU scheduling).
  query = query + (grad * 0).astype(query.dtype)
  if jnp.dtype(dtype) == jnp.float32:
    attend = lambda q, k, v, b: dot_product_attention(q, k, v, b, dropout_rng, dropout_rate, dtype)
    _, vjp = jax.vjp(attend, query, key, value, bias)
    return (*vjp(grad), None)
  return (*_low_precision_attention_grads(query, key, value, bias, dropout_rng, dropout_rate,
                                          dtype, grad), None)


def _low_precision_attention_grads(query, key, value, bias, dropout_rng, dropout_rate, dtype,
                                   grad):
  """Gradients of `dot_product_attention` w.r.t. query, key, value `[B, *, H, D]` and bias for a
  bfloat16 (or other low-precision) `dtype`, written out so that every product is `dtype` x
  `dtype` accumulated in float32 (autodiff would multiply the float32 cotangents by `dtype`
  operands, which runs as float32 x float32). Softmax and its gradient stay float32."""
  f32 = jnp.float32
  scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=f32)
  probs = jax.nn.softmax(scores + bias, axis=-1)
  weights = probs.astype(dtype)
  keep = None
  if dropout_rng is not None:  # the forward's mask: same key, same shape; kept entries 1/keep
    keep = nn.Dropout(dropout_rate, parent=None).apply({}, jnp.ones_like(weights),
                                                      deterministic=False, rng=dropout_rng)
    weights = weights * keep
  grad = grad.astype(dtype)
  grad_value = jnp.einsum("bhqk,bqhd->bkhd", weights, grad, preferred_element_type=f32)
  grad_weights = jnp.einsum("bqhd,bkhd->bhqk", grad, value.astype(dtype), preferred_element_type=f32)
  if keep is not None:
    grad_weights = grad_weights * keep.astype(f32)
  grad_scores = probs * (grad_weights - jnp.sum(grad_weights * probs, axis=-1, keepdims=True))
  grad_bias = jnp.sum(grad_scores, axis=tuple(range(grad_scores.ndim - bias.ndim)))
  broadcast = tuple(i for i, n in enumerate(bias.shape) if n == 1 and grad_bias.shape[i] != 1)
  grad_bias = jnp.sum(grad_bias, axis=broadcast, keepdims=True).astype(bias.dtype)
  grad_scores = grad_scores.astype(dtype)
  grad_query = jnp.einsum("bhqk,bkhd->bqhd", grad_scores, key, preferred_element_type=f32)
  grad_key = jnp.einsum("bhqk,bqhd->bkhd", grad_scores, query, preferred_element_type=f32)
  return (grad_query.astype(query.dtype), grad_key.astype(key.dtype),
          grad_value.astype(value.dtype), grad_bias)


_xla_recomputed_attention.defvjp(_recomputed_fwd, _recomputed_bwd)


class MultiHeadAttention(nn.Module):
  """T5 attention with joined-head kernels `[embed, heads * d_kv]`.

  `bias` (float32, broadcastable to `[batch, heads, q, k]`) carries position bias and masks.
  With `decode=True` the module keeps a cache (collection 'cache'):
  self-attention stores `cached_key/value [batch, max_len, heads, d_kv]` written at
  `decode_position`; cross-attention (`is_cross=True`) stores the projected encoder
  keys/values once, at cache-initialisation time, and reuses them every step.
  `attention_impl` 'recompute' (`recomputed_attention`) or 'plain' (`dot_product_attention`):
  the same forward, only what the backward pass keeps differs; 'cudnn' (`fused_attention`):
  flash attention on a GPU (no dropout: `T5Config` refuses it with `dropout_rate > 0`), except
  in cached decoding, which takes 'recompute' (one query row per step).

  Cross-attention may take `inputs_q [batch * G, q, embed]` against `inputs_kv [batch, k, embed]`
  (and `bias` over `batch`): query rows `i * G ... i * G + G - 1` all attend to key row `i`, as if
  the keys were repeated G times, but keys and values are projected once per row and the G
  rows' queries go through one `[G * q, k]` attention (rank classification: G candidates per
  input share one encoding).
  """

  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  is_cross: bool = False
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention_impl: str = "recompute"

  def _project(self, name: str, x: Array, init_scale: float = 1.0) -> Array:
    y = Dense(self.num_heads * self.d_kv, ("embed", "joined_kv"), init_scale, self.dtype,
              self.param_dtype, name=name)(x)
    y = y.reshape(y.shape[:-1] + (self.num_heads, self.d_kv))
    return constrain(y, ("batch", "length", "heads", "kv"))

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array, *, decode: bool = False,
               decode_position: Array | None = None, max_decode_length: int | None = None) -> Array:
    """inputs_q `[batch, q, embed]`, inputs_kv `[batch, k, embed]` -> `[batch, q, embed]`."""
    query = self._project("query", inputs_q, init_scale=1.0 / self.d_kv)
    if decode and self.is_cross:
      # Encoder keys/values are fixed during decoding: project once, reuse every step.
      key = self.variable("cache", "cross_key", lambda: self._project("key", inputs_kv)).value
      value = self.variable("cache", "cross_value", lambda: self._project("value", inputs_kv)).value
    else:
      key = self._project("key", inputs_kv)
      value = self._project("value", inputs_kv)
    if decode and not self.is_cross:
      initialised = self.has_variable("cache", "cached_key")
      batch, _, heads, d_kv = key.shape
      shape = (batch, max_decode_length, heads, d_kv)
      cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)
      if initialised:  # One new token at `decode_position`; attend over the whole cache.
        index = (0, decode_position, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, index)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, index)
        key, value = cached_key.value, cached_value.value

    dropout_rng = None
    if not self.deterministic and self.dropout_rate > 0:
      # The key the weights' `nn.Dropout` child has always drawn: the same masks as before.
      dropout_rng = nn.Dropout(self.dropout_rate, name="Dropout_0").make_rng("dropout")
    group = query.shape[0] // key.shape[0]
    if group > 1:  # `group` query rows per key row (see the class docstring): attend as one row
      query = query.reshape((key.shape[0], group * query.shape[1]) + query.shape[2:])
    if self.attention_impl == "cudnn" and not decode:
      out = fused_attention(query, key, value, bias)
    else:
      attend = dot_product_attention if self.attention_impl == "plain" else recomputed_attention
      out = attend(query, key, value, bias, dropout_rng, self.dropout_rate, self.dtype)
    if group > 1:
      out = out.reshape((key.shape[0] * group, -1) + out.shape[2:])
    out = constrain(out, ("batch", "length", "heads", "kv"))
    out = out.reshape(out.shape[:2] + (self.num_heads * self.d_kv,))
    return Dense(inputs_q.shape[-1], ("joined_kv", "embed"), 1.0, self.dtype, self.param_dtype,
                 name="out")(out)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    # 'gated-gelu' is the tanh approximation, as in T5X and transformers' 'gelu_new'.
    "gated-gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gated-silu": jax.nn.silu,
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated_activation(gate: Array, linear: Array, activation: str) -> Array:
  """`ACTIVATIONS[activation](gate) * linear` (`[..., mlp]` each) whose backward pass keeps only
  the two inputs and recomputes the activation and its derivative from `gate`: autodiff of the
  tanh-approximated GELU keeps about six `[B, L, mlp]` intermediates per layer instead."""
  return ACTIVATIONS[activation](gate) * linear


def _gated_fwd(gate, linear, activation):
  return gated_activation(gate, linear, activation), (gate, linear)


def _gated_bwd(activation, residuals, grad):
  gate, linear = residuals
  gate = gate + (grad * 0).astype(gate.dtype)  # recompute in this layer's backward, not early
  act, act_vjp = jax.vjp(ACTIVATIONS[activation], gate)
  (grad_gate,) = act_vjp((grad * linear).astype(act.dtype))
  return grad_gate, (grad * act).astype(linear.dtype)


gated_activation.defvjp(_gated_fwd, _gated_bwd)


class MlpBlock(nn.Module):
  """Feed-forward block `[batch, length, embed] -> same`; gated variants use wi_0 (act) * wi_1."""

  d_ff: int
  feed_forward: str
  dropout_rate: float = 0.0
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = lambda name: Dense(self.d_ff, ("embed", "mlp"), 1.0, self.dtype, self.param_dtype,
                               name=name)
    act = ACTIVATIONS[self.feed_forward]
    if self.feed_forward == "relu":
      h = act(dense("wi")(x))
    else:
      h = gated_activation(dense("wi_0")(x), dense("wi_1")(x), self.feed_forward)
    h = constrain(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
    return Dense(x.shape[-1], ("mlp", "embed"), 1.0, self.dtype, self.param_dtype, name="wo")(h)
