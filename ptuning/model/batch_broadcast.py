"""`broadcast_batch`: trainable rows shared by every example, `[*S] -> [batch, *S]`, whose gradient
(the sum over the batch) is taken as a matmul instead of a reduction.

Why: a prompt `[P, E]` joins every example, so its gradient is the batch sum of the embeddings'
cotangent `[B, P, E]`. As a reduction, XLA's GPU layout assignment makes the reduced (batch)
dimension minor-most and propagates that layout back through the backward pass into the saved
residual stream: on a T5 1.1 XL step compiled for an H100 every residual add then writes
`[S, E, B]` and every RMSNorm transposes back to `[B, S, E]` for the next matmul (148 + 46
transpose kernels, 21.8 ms of a 283.5 ms step in the profile of
`benchmarks/gpu_h100_t5_1_1_xl_cudnn_bf16_params.json`). The same sum as `ones[8, B] @ g[B, P*E]`
(8 rows, because XLA rewrites a vector-matrix product back into a reduction) leaves every layout
row-major: the step compiled for an H100 holds no transpose kernels at all. Cost: `16 * B * P * E`
FLOPs, nothing next to a step. Numerics: the products are exact (ones), accumulated in float32
(`Precision.HIGHEST`, so a float32 gradient is not rounded to bfloat16 or TF32 on TPU / GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

# Rows of ones in the batch-sum matmul: more than 1, so that XLA keeps it a matmul.
SUM_ROWS = 8


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast_batch(rows: Array, batch: int) -> Array:
  """`rows [*S]` -> `[batch, *S]` (every example the same rows)."""
  return jnp.broadcast_to(rows[None], (batch,) + rows.shape)


def batch_sum(grad: Array, dtype) -> Array:
  """`grad [B, *S]` -> `[*S]` in `dtype`: the sum over the batch, as a matmul accumulated in
  float32."""
  batch = grad.shape[0]
  ones = jnp.ones((SUM_ROWS, batch), grad.dtype)
  total = jnp.dot(ones, grad.reshape(batch, -1), precision=jax.lax.Precision.HIGHEST,
                  preferred_element_type=jnp.float32)[0]
  return total.reshape(grad.shape[1:]).astype(dtype)


def _fwd(rows, batch):
  return broadcast_batch(rows, batch), None


def _bwd(batch, _, grad):  # grad [B, *S] has the rows' dtype
  del batch
  return (batch_sum(grad, grad.dtype),)


broadcast_batch.defvjp(_fwd, _bwd)
