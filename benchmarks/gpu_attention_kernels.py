"""Head-dim-64 attention on one GPU: cuDNN (with and without T5's bias) against JAX's Pallas
Mosaic-GPU flash attention (no bias support), forward and forward+backward, T5 1.1 XL encoder
shapes (batch 32, 640 positions = 612 rounded up to the Pallas kernel's 128 blocks, 32 heads).

  python benchmarks/gpu_attention_kernels.py     # prints ms and TFLOP/s per variant
"""
import time

import jax
import jax.numpy as jnp

B, S, H, D = 32, 640, 32, 64
FWD_FLOPS = 4 * B * H * S * S * D


def timed(fn, *args, n=20):
  out = fn(*args)
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(n):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n


def report(name, fn, args, flops):
  try:
    s = timed(jax.jit(fn), *args)
    print(f"{name:48s} {s * 1e3:7.3f} ms  {flops / s / 1e12:6.1f} TFLOP/s", flush=True)
  except Exception as e:  # pylint: disable=broad-except
    print(f"{name:48s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


def main():
  print(jax.devices(), jax.__version__)
  key = jax.random.split(jax.random.key(0), 4)
  dt = jnp.float16
  q, k, v = (jax.random.normal(kk, (B, S, H, D), dt) for kk in key[:3])
  bias = jax.random.normal(key[3], (1, H, S, S), dt)

  def cudnn(q, k, v, b=None):
    return jax.nn.dot_product_attention(q, k, v, bias=b, implementation="cudnn")

  def grad_of(f):
    return jax.grad(lambda q, k, v, *r: f(q, k, v, *r).astype(jnp.float32).sum(), argnums=(0, 1, 2))

  report("cudnn fwd, bias", cudnn, (q, k, v, bias), FWD_FLOPS)
  report("cudnn fwd, bias [B, H, S, S]", cudnn, (q, k, v, jnp.broadcast_to(bias, (B, H, S, S)) + 0), FWD_FLOPS)
  report("cudnn fwd, bias [1, 1, S, S]", cudnn, (q, k, v, bias[:, :1]), FWD_FLOPS)
  report("cudnn fwd, bias float32", cudnn, (q, k, v, bias.astype(jnp.float32)), FWD_FLOPS)
  bf = lambda x: x.astype(jnp.bfloat16)
  report("cudnn fwd, bf16, bias", cudnn, (bf(q), bf(k), bf(v), bf(bias)), FWD_FLOPS)
  report("cudnn fwd, bf16, no bias", cudnn, (bf(q), bf(k), bf(v)), FWD_FLOPS)
  report("cudnn fwd, no bias", cudnn, (q, k, v), FWD_FLOPS)
  report("cudnn fwd+bwd, bias (dq dk dv)", grad_of(cudnn), (q, k, v, bias), 3.5 * FWD_FLOPS)
  report("cudnn fwd+bwd, no bias", grad_of(cudnn), (q, k, v), 3.5 * FWD_FLOPS)
  if __import__("os").environ.get("CUDNN_ONLY"):
    return
  try:
    from jax.experimental.pallas.ops.gpu import attention_mgpu as mg
  except Exception as e:  # pylint: disable=broad-except
    print("attention_mgpu import failed:", e)
    return
  for bq, bkv in ((64, 64), (128, 64), (128, 128)):
    cfg = mg.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=2,
                          block_q_dkv=bq, block_kv_dkv=bkv, block_q_dq=bq, block_kv_dq=bkv)
    f = lambda q, k, v, cfg=cfg: mg.attention(q, k, v, cfg)
    report(f"pallas mgpu fwd, no bias, blocks {bq}x{bkv}", f, (q, k, v), FWD_FLOPS)
    report(f"pallas mgpu fwd+bwd, no bias, blocks {bq}x{bkv}", grad_of(f), (q, k, v), 3.5 * FWD_FLOPS)


if __name__ == "__main__":
  main()
