"""The GPU program of a prompt-tuning step, without a GPU: XLA's GPU compiler, deviceless, for an
H100 (JAX's `topologies.get_topology_desc` with a target config), and the kernels it would launch,
counted by kind. Use it to see fusion and layout decisions (transposes, copies) on a CPU-only
machine before spending GPU time; it times nothing.

Needs JAX's CUDA plugin (`pip install "jax[cuda13]==<the pinned jax>"` in a separate virtual
environment: about 4 GB; no GPU or driver needed) besides the repository's dependencies. Usage:
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 python benchmarks/gpu_hlo.py [--method prompt_tuning]
      [--layers 24] [--batch 32] [--attention cudnn] [--devices 8 --mesh data=4,model=2]
      [--no-norm_barrier] [--triton_gemm] [--hlo FILE]
It also prints a lower bound on the memory-bound kernels' traffic (the largest by kind; the
cuBLAS calls' separate output conversions, `wrapped_convert`, are fused into Triton GEMMs on a
real device) and, with `--devices N --mesh SPEC`, the collectives of a sharded step.
Caveats: without a device there is no autotuning, and Triton's default GEMM tiling failed on
some products (an earlier JAX), so by default Triton GEMM fusions are switched off (cuBLAS calls
instead): matmul fusions and their neighbours differ from the real program, layouts and the other
fusions do not (T5 1.1 XL at batch 32: 148 + 46 transpose kernels here, 148 + 46 in the H100
profile of the same code). `--triton_gemm` keeps them, with default tilings (this configuration
compiles with jax 0.10.2), and counts the GEMM fusions with work fused in front of the dot, such
as a norm's scaling (`gemm_prologues`): which ones a device fuses is decided before autotuning.
The step is traced on the host, so `fused_attention` is told that the target is a GPU.
"""

from __future__ import annotations

import argparse
import collections
import math
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

H100_BANDWIDTH = 3.35e12  # bytes/s, HBM3

_DEFINITION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)(?:, |$)")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_DOT_OPERANDS = re.compile(r" dot\(%?([\w.\-]+), %?([\w.\-]+)\)")
KERNEL_OPS = ("fusion", "custom-call", "copy", "transpose")  # what launches a kernel
MEMORY_BOUND_OPS = ("fusion", "copy", "transpose")  # kernels that are not library calls
COLLECTIVE_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                  "collective-permute")


def entry_definitions(hlo: str):
  """`(name, shape, op, operands)` of each instruction of the entry computation (not the bodies
  of fused computations)."""
  entry = hlo[hlo.index("\nENTRY"):]
  return [m.groups() for m in map(_DEFINITION.match, entry.splitlines()) if m]


def stem(name: str) -> str:
  """'input_transpose_fusion.12' (or '.7.1') -> 'input_transpose_fusion'."""
  return re.sub(r"(\.\d+)+$", "", name)


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, tuples summed: 'bf16[32,612]{1,0}' -> 39168."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    width = 1 if dtype == "pred" else int(dtype.lstrip("bfsu")) // 8
    total += width * math.prod(int(d) for d in dims.split(",") if d)
  return total


def kernel_counts(hlo: str) -> collections.Counter:
  """Kernels of the entry computation (fusions, library calls, copies) by name stem."""
  return collections.Counter(stem(name) for name, _, op, _ in entry_definitions(hlo)
                             if op in KERNEL_OPS)


def collective_bytes(hlo: str) -> dict[str, tuple[int, int]]:
  """Collectives of the entry computation (async starts counted once): kind -> (count, bytes of
  their results)."""
  found: dict[str, tuple[int, int]] = {}
  for _, shape, op, _ in entry_definitions(hlo):
    kind = op.removesuffix("-start")
    if kind in COLLECTIVE_OPS:
      count, size = found.get(kind, (0, 0))
      found[kind] = (count + 1, size + shape_bytes(shape))
  return found


def gemm_prologues(hlo: str) -> tuple[int, collections.Counter]:
  """(GEMM fusions of the entry computation, and of those the ones whose dot reads an operand
  computed inside the fusion, by that operand's op): work fused in front of the matmul, such as
  a norm's scaling, which slows the Triton GEMM down (README, GPU)."""
  from ptuning.bench_profile import index_hlo
  _, bodies, lines = index_hlo(hlo)
  fusions, found = 0, collections.Counter()
  for name, _, op, _ in entry_definitions(hlo):
    called = re.search(r"calls=%?([\w.\-]+)", lines.get(name, ""))
    if op != "fusion" or not stem(name).startswith("gemm_fusion") or not called:
      continue
    fusions += 1
    for dot in _DOT_OPERANDS.finditer(bodies.get(called.group(1), "")):
      ops = {m.group(3) for m in (_DEFINITION.match(lines.get(o, "")) for o in dot.groups()) if m}
      for computed in sorted(ops - {"parameter", "bitcast"}):
        found[computed] += 1
  return fusions, found


def memory_bound_bytes(hlo: str) -> collections.Counter:
  """Bytes each kind of memory-bound kernel of the entry computation reads and writes (its
  operands' and results' sizes; fusions, copies and transposes, not library calls) by name stem:
  a lower bound on their traffic, to weigh against the device's bandwidth."""
  shapes, moved = {}, collections.Counter()
  for name, shape, op, operands in entry_definitions(hlo):
    shapes[name] = shape
    if op in MEMORY_BOUND_OPS:
      moved[stem(name)] += shape_bytes(shape) + sum(
          shape_bytes(shapes.get(o, "")) for o in re.findall(r"%([\w.\-]+)", operands))
  return moved


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
  p.add_argument("--norm_barrier", action=argparse.BooleanOptionalAction, default=True,
                 help="as `ptuning bench --[no-]norm_barrier`")
  p.add_argument("--triton_gemm", action="store_true",
                 help="keep XLA's Triton GEMM fusions, with their default tilings (no autotuning "
                 "without a device), to see what is fused into them; default: cuBLAS calls")
  p.add_argument("--devices", type=int, default=1, help="H100s in the topology (one host)")
  p.add_argument("--mesh", default=None, help="as `ptuning bench --mesh`, e.g. 'data=4,model=2'")
  p.add_argument("--hlo", default=None, help="write the compiled HLO here")
  args = p.parse_args(argv)

  os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # set before JAX starts its backends
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + (
      " --xla_gpu_autotune_level=0" if args.triton_gemm else
      " --xla_gpu_enable_triton_gemm=false")).strip()
  import jax
  from jax.experimental import topologies
  from ptuning.bench_step import train_config
  from ptuning.model.config import get_preset
  from ptuning.plan import abstract_batch
  from ptuning.train.experiment import build_experiment

  topology = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET,
                                          topology=f"1x1x{args.devices}")
  jax.default_backend = lambda: "gpu"  # what fused_attention asks while tracing on the host
  cfg = get_preset(args.model).replace(attention_impl=args.attention,
                                       param_dtype=args.param_dtype,
                                       norm_barrier=args.norm_barrier)
  if args.layers:
    cfg = cfg.replace(num_encoder_layers=args.layers, num_decoder_layers=args.layers)
  spec = dict(model=args.model, method=args.method, prompt=args.prompt, inputs=args.inputs,
              targets=args.targets, batch=args.batch, dtype="bfloat16", mesh=args.mesh)
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
  gemms, prologues = gemm_prologues(hlo)
  if gemms:
    print(f"GEMM fusions: {gemms}, of which with work fused in front of the dot: "
          f"{sum(prologues.values())}" + "".join(f", {op} {n}" for op, n in prologues.items()))
  moved = memory_bound_bytes(hlo)
  print(f"memory-bound kernels move at least {sum(moved.values()) / 1e9:.1f} GB per step "
        f"({sum(moved.values()) / H100_BANDWIDTH * 1e3:.1f} ms at 3.35 TB/s); the most:")
  for kind, n in moved.most_common(6):
    print(f"  {kind:45s} {n / 1e9:6.1f} GB")
  for kind, (n, size) in sorted(collective_bytes(hlo).items()):
    print(f"collective {kind}: {n} per step, {size / 2**30:.2f} GiB of results per device")
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(hlo)
  return 0


if __name__ == "__main__":
  sys.exit(main())
