"""Two-operand einsum that accumulates in float32 in the forward *and* the backward pass.

`jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)` on bfloat16 operands is the fast
mixed-precision product (bfloat16 in, float32 accumulation). Its autodiff is not: the cotangent
of the float32 product arrives in float32, so both backward products become `float32 x bfloat16`,
which XLA runs as float32 x float32 (about half the speed of the bfloat16 kernels on CPUs with
AVX512-BF16, and a float32 GEMM instead of a tensor-core one on GPUs). `einsum` here gives the
backward pass the same form as the forward: the cotangent is cast to the operands' dtype and each
input gradient is a bfloat16 x bfloat16 product accumulated in float32, then cast to its input's
dtype (what `torch.autocast` does). float32 operands take plain `jnp.einsum`, so float32 runs are
unchanged bit for bit.

Operands are cast to the compute `dtype` inside, and the backward pass keeps the operands as they
came, not their casts: a float32 frozen kernel is alive anyway, while its bfloat16 copy would be
one more copy of the backbone (half its size) held from the forward to the backward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

# Remat policies look for `dot_general`, which the custom VJP below hides: its products carry
# these names instead (`t5.REMAT_POLICY_FNS` saves them where the policy saves dots).
BATCHED_NAME, UNBATCHED_NAME = "mixed_einsum_batched", "mixed_einsum"


def einsum(spec: str, a: Array, b: Array, out_dtype=None, dtype=None) -> Array:
  """`jnp.einsum(spec, a, b)` with both operands cast to `dtype` (default `a.dtype`), accumulated
  in float32 and returned as `out_dtype` (default `dtype`). `spec` is explicit
  (`'bqhd,bkhd->bhqk'`, no ellipsis); every index of an operand must appear in the output or the
  other operand (true of products and contractions). Gradients come back in each operand's own
  dtype."""
  dtype = jnp.dtype(dtype or a.dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  if dtype == jnp.float32:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                      preferred_element_type=jnp.float32).astype(out_dtype)
  lhs, rhs, out = _parse(spec)
  batched = bool(set(lhs) & set(rhs) & set(out))
  return checkpoint_name(_einsum_acc32(spec, out_dtype, dtype, a, b),
                         BATCHED_NAME if batched else UNBATCHED_NAME)


def _parse(spec: str) -> tuple[str, str, str]:
  inputs, out = spec.replace(" ", "").split("->")
  lhs, rhs = inputs.split(",")
  for name, operand, other in (("first", lhs, rhs), ("second", rhs, lhs)):
    if not set(operand) <= set(out) | set(other):
      raise ValueError(f"einsum {spec!r}: the {name} operand has an index that is summed on its "
                       "own, which mixed_einsum.einsum does not differentiate")
  return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _einsum_acc32(spec: str, out_dtype, dtype, a: Array, b: Array) -> Array:
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype),
                    preferred_element_type=jnp.float32).astype(out_dtype)


def _fwd(spec, out_dtype, dtype, a, b):
  _parse(spec)
  return _einsum_acc32(spec, out_dtype, dtype, a, b), (a, b)


def _bwd(spec, out_dtype, dtype, residuals, grad):
  a, b = residuals
  lhs, rhs, out = _parse(spec)
  grad, a_low, b_low = grad.astype(dtype), a.astype(dtype), b.astype(dtype)
  grad_a = jnp.einsum(f"{out},{rhs}->{lhs}", grad, b_low, preferred_element_type=jnp.float32)
  grad_b = jnp.einsum(f"{lhs},{out}->{rhs}", a_low, grad, preferred_element_type=jnp.float32)
  return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_einsum_acc32.defvjp(_fwd, _bwd)
