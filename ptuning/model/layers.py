"""T5 building blocks: RMSNorm, relative position bias, multi-head attention with a KV cache, MLP.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) and key
activations are constrained with `nn.with_logical_constraint`; ptuning/sharding.py maps the
names to mesh axes. Nothing here names a mesh axis.

Numerics follow the reference T5 (and transformers' PyTorch port): no 1/sqrt(d_kv) scaling of
attention logits (it is folded into the query initialiser), softmax and norm statistics in
float32, relative position buckets computed in float32 with truncation.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
P = nn.with_logical_partitioning
constrain = nn.with_logical_constraint

# Large negative number added to attention logits at masked positions (float32).
MASK_VALUE = float(np.finfo(np.float32).min)


def kernel_init(scale: float = 1.0) -> Callable:
  return nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal")


class RMSNorm(nn.Module):
  """T5 layer norm: no mean subtraction, no bias. `[..., embed] -> [..., embed]`."""

  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", P(nn.initializers.ones, ("embed",)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(variance + self.epsilon)
    return y.astype(self.dtype) * scale.astype(self.dtype)


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
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))


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


class MultiHeadAttention(nn.Module):
  """T5 attention with joined-head kernels `[embed, heads * d_kv]`.

  `bias` (float32, broadcastable to `[batch, heads, q, k]`) carries position bias and masks.
  With `decode=True` the module keeps a cache (collection 'cache'):
  self-attention stores `cached_key/value [batch, max_len, heads, d_kv]` written at
  `decode_position`; cross-attention (`is_cross=True`) stores the projected encoder
  keys/values once, at cache-initialisation time, and reuses them every step.
  """

  num_heads: int
  d_kv: int
  dropout_rate: float = 0.0
  is_cross: bool = False
  deterministic: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

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

    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(scores + bias, axis=-1).astype(self.dtype)
    if not self.deterministic and self.dropout_rate > 0:
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic=False)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
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
      h = act(dense("wi_0")(x)) * dense("wi_1")(x)
    h = constrain(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
    return Dense(x.shape[-1], ("mlp", "embed"), 1.0, self.dtype, self.param_dtype, name="wo")(h)
