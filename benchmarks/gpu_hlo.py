"""The GPU program of a prompt-tuning step, without a GPU: XLA's GPU compiler, deviceless, for an
H100 (JAX's `topologies.get_topology_desc` with a target config), and the kernels it would launch,
counted by kind. Use it to see fusion and layout decisions (transposes, copies) on a CPU-only
machine before spending GPU time; it times nothing.

Needs JAX's CUDA plugin (`pip install "jax[cuda13]==<the pinned jax>"` in a separate virtual
environment: about 4 GB; no GPU or driver needed) besides the repository's dependencies. Usage:
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python benchmarks/gpu_hlo.py [--method prompt_tuning]
      [--layers 24] [--batch 32] [--attention cudnn] [--hlo FILE]
Caveats: without a device there is no autotuning, and Triton's default GEMM tiling fails on
some products, so Triton GEMM fusions are switched off (cuBLAS calls instead): matmul fusions and
their neighbours differ from the real program, layouts and the other fusions do not (T5 1.1 XL
at batch 32: 148 + 46 transpose kernels here, 148 + 46 in the H100 profile of the same code).
The step is traced on the host, so `fused_attention` is told that the target is a GPU.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import tempfile
import time

H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 28 }
runtime_version { major: 13 minor: 0 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# '%input_transpose_fusion.12 = bf16[...] fusion(' -> 'input_transpose_fusion'
_KERNEL = re.compile(r"^\s*(?:ROOT )?%([A-Za-z_\-$]+?)(?:\.\d+)* = .*? "
                     r"(fusion|custom-call|copy|transpose)\(")


def kernel_counts(hlo: str) -> collections.Counter:
  """Kernels of the entry computation (fusions, library calls, copies) by name stem."""
  entry = hlo[hlo.index("\nENTRY"):]
  return collections.Counter(m.group(1) for line in entry.splitlines()
                             if (m := _KERNEL.match(line)))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="t5_1_1_xl")
  p.add_argument("--layers", type=int, default=None, help="encoder and decoder layers (default: "
                 "the preset's; fewer compile faster and show the same per-layer kernels)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--inputs", type=int, default=512)
  p.add_argument("--targets", type=int, default=8)
  p.add_argument("--prompt", type=int, default=100)
  p.add_argument("--method", default="prompt_tuning", help="as `ptuning bench --method`")
  p.add_argument("--attention", default="cudnn")
  p.add_argument("--param_dtype", default="bfloat16")
  p.add_argument("--hlo", default=None, help="write the compiled HLO here")
  args = p.parse_args(argv)

  os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # set before JAX starts its backends
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_gpu_enable_triton_gemm=false").strip()
  import jax
  from jax.experimental import topologies
  from ptuning.bench_step import train_config
  from ptuning.model.config import get_preset
  from ptuning.plan import abstract_batch
  from ptuning.train.experiment import build_experiment

  topology = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET,
                                          topology="1x1x1")
  jax.default_backend = lambda: "gpu"  # what fused_attention asks while tracing on the host
  cfg = get_preset(args.model).replace(attention_impl=args.attention,
                                       param_dtype=args.param_dtype)
  if args.layers:
    cfg = cfg.replace(num_encoder_layers=args.layers, num_decoder_layers=args.layers)
  spec = dict(model=args.model, method=args.method, prompt=args.prompt, inputs=args.inputs,
              targets=args.targets, batch=args.batch, dtype="bfloat16")
  with tempfile.TemporaryDirectory() as tmp:
    exp = build_experiment(train_config(spec, tmp, model=cfg), devices=topology.devices,
                           abstract=True)
  batch = abstract_batch(exp.config)
  if args.method in ("prompt_bank", "mpt"):
    batch["task_ids"] = jax.ShapeDtypeStruct((args.batch,), jax.numpy.int32)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=exp.replicated)
  start = time.perf_counter()
  compiled = exp.train_step_fn(batch).lower(exp.abstract_state, exp.frozen, batch, rng).compile()
  hlo = compiled.as_text()
  memory = compiled.memory_analysis()
  print(f"{args.method}, {args.model} ({cfg.num_encoder_layers}+{cfg.num_decoder_layers} "
        f"layers), batch "
        f"{args.batch}, inputs {args.inputs}, prompt {args.prompt}, attention {args.attention}, "
        f"params {args.param_dtype}: compiled for {topology.devices[0].device_kind} in "
        f"{time.perf_counter() - start:.0f} s | temp {memory.temp_size_in_bytes / 2**30:.1f} GiB")
  counts = kernel_counts(hlo)
  transposes = sum(n for k, n in counts.items() if "transpose" in k)
  print(f"kernels: {sum(counts.values())}, of which layout transposes: {transposes}")
  for kind, n in counts.most_common():
    print(f"  {kind:45s} {n:5d}")
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(hlo)
  return 0


if __name__ == "__main__":
  sys.exit(main())
