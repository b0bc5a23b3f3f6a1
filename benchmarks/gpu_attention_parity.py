"""GPU check of `--attention cudnn`: `flash_attention.fused_attention` (cuDNN flash attention in
bfloat16) against `layers.dot_product_attention` in float32 on the same inputs, forward and
gradients, for a bias shared over the batch `[1, H, T, S]`, a per-example one `[B, H, T, S]`
(padding masks) and a shared one with the padding as key lengths (`PaddedBias`), also at odd
lengths (padded to even by `fused_attention`), each with the bias differentiated (cuDNN writes
its gradient) and frozen (the call without a bias gradient: no `dbias` kernel). Prints relative
errors and whether the compiled program really calls cuDNN. Usage (on a GPU machine): python benchmarks/gpu_attention_parity.py
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from ptuning.model.flash_attention import PaddedBias, fused_attention
from ptuning.model.layers import MASK_VALUE, dot_product_attention

B, T, S, H, D = 4, 256, 612, 8, 64


def relative_error(x, ref) -> float:
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def check(bias_batch: int, seed: int, bias_gradient: bool, padded: bool = False,
          odd: bool = False) -> bool:
  """`padded`: a bias shared by the batch with padding as key lengths (`PaddedBias`, what the
  encoder passes), against float32 attention with the padding mask added to the bias. `odd`:
  one query and one key fewer (odd lengths, which `fused_attention` pads to even for cuDNN)."""
  t, s = (T - 1, S - 1) if odd else (T, S)
  keys = jax.random.split(jax.random.key(seed), 5)
  q, k, v = (jax.random.normal(keys[i], shape).astype(jnp.bfloat16)
             for i, shape in enumerate([(B, t, H, D), (B, s, H, D), (B, s, H, D)]))
  bias = 2.0 * jax.random.normal(keys[3], (bias_batch, H, t, s))
  if bias_batch > 1:  # padding: the last keys of two examples are masked out
    bias = bias.at[1, :, :, 500:].set(MASK_VALUE).at[3, :, :, 300:].set(MASK_VALUE)
  cotangent = jax.random.normal(keys[4], (B, t, H, D))
  lengths = jnp.array([s, 500, s, 300], jnp.int32)
  pad = jnp.where(jnp.arange(s) < lengths[:, None], 0.0, MASK_VALUE)[:, None, None, :]
  ours_attend, ref_attend = fused_attention, dot_product_attention
  if padded:
    ours_attend = lambda q, k, v, b: fused_attention(q, k, v, PaddedBias(b, lengths))
    ref_attend = lambda q, k, v, b: dot_product_attention(q, k, v, b + pad)

  def loss(attend, dtype):
    return lambda q, k, v, b: jnp.sum(attend(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                             b).astype(jnp.float32) * cotangent)

  argnums = (0, 1, 2, 3) if bias_gradient else (0, 1, 2)
  ours = jax.jit(jax.value_and_grad(loss(ours_attend, jnp.bfloat16), argnums=argnums))
  ref = jax.jit(jax.value_and_grad(loss(ref_attend, jnp.float32), argnums=argnums))
  hlo = ours.lower(q, k, v, bias).compile().as_text()
  calls_cudnn = "__cudnn$fmha" in hlo
  (out, grads), (out_ref, grads_ref) = ours(q, k, v, bias), ref(q, k, v, bias)
  errors = [relative_error(g, r) for g, r in zip(grads, grads_ref)]
  print(f"bias [{bias_batch}, H, {t}, {s}]{' + key lengths' if padded else ''}, "
        f"{'differentiated' if bias_gradient else 'frozen'}: "
        f"cuDNN call {calls_cudnn} | loss {float(out):.4f} vs {float(out_ref):.4f} | relative "
        f"error of grads " + " ".join(f"{n} {e:.2e}" for n, e in zip("qkv", errors)) +
        (f" bias {errors[3]:.2e}" if bias_gradient else ""), flush=True)
  finite = all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  return calls_cudnn and finite and max(errors) < 2e-2


if __name__ == "__main__":
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  results = []
  for bias_batch, padded, odd in ((1, False, False), (B, False, False), (1, True, False),
                                  (B, False, True), (1, True, True)):
    for bias_gradient in (True, False):
      try:
        results.append(check(bias_batch, seed=bias_batch, bias_gradient=bias_gradient,
                             padded=padded, odd=odd))
      except Exception as e:  # report which case cuDNN refuses, then check the others
        print(f"bias [{bias_batch}, H, T, S], padded {padded}, odd {odd}, bias gradient "
              f"{bias_gradient}: "
              f"FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
        results.append(False)
  sys.exit(0 if all(results) else 1)
