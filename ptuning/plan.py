"""`ptuning plan`: ahead-of-time memory and FLOPs of a run's train step on a target topology.

The train step of the configured run (gin, as for `train`) is built abstractly (every array a
ShapeDtypeStruct with its sharding: the backbone is never loaded or initialised), lowered and
compiled by XLA for the target's device count, and never run. The command re-executes itself
in a subprocess with `--xla_force_host_platform_device_count=N` (JAX reads it once, at backend
start) so that N fake CPU devices stand in for the target's chips.

Per device it prints parameter bytes (frozen backbone, trainable), optimizer-state bytes and
the compiled executable's memory analysis (arguments, temporaries, outputs not aliased to the
donated train state), their sum as the peak estimate and whether it fits the device's memory;
and FLOPs per step. One row per variant: remat policy x scan_layers x microbatches x
parameter dtype (comma-separated lists on the command line).

Caveats. The figures come from XLA's CPU compiler (memory-minimising scheduler, no loop-invariant
code motion: see XLA_CPU_FLAGS); TPU and GPU compilers fuse and schedule differently, so treat
them as estimates, not guarantees. Remat shows its full effect with `scan_layers` (the CPU
scheduler does not always keep unrolled recomputation late). XLA's cost analysis counts a while loop's body once, so FLOPs
are taken from the unrolled, single-microbatch lowering of the same step (same math, same
remat recomputation), divided evenly over the devices; that count is affine in the layer counts,
so it is computed from three short unrolled programs (`step_flops`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Any

GIB = 2**30
_CHILD_ENV = "PTUNING_PLAN_DEVICES"
# Per-device memory in GiB. TPU names count TensorCores for v2 / v3 (one JAX device per core,
# half a chip's HBM each) and v4 / v5p (two cores per chip, one JAX device per chip: megacore);
# v5e / v6e names count chips (one core each).
_TPU = {  # generation: (devices per unit of the name's number, GiB per device)
    "v2": (1.0, 8), "v3": (1.0, 16), "v4": (0.5, 32), "v5p": (0.5, 95), "v5e": (1.0, 16),
    "v5litepod": (1.0, 16), "v6e": (1.0, 32)}
_GPU = {"h100": 80, "h200": 141, "a100": 80, "a100-40gb": 40, "a100-80gb": 80, "v100": 16,
        "l4": 24}
# The CPU compiler's memory-minimising scheduler (TPU / GPU schedulers are memory-aware), and no
# loop-invariant code motion: the CPU compiler computes bf16 dots in f32 and would hoist f32
# copies of every scanned bf16 weight out of the layer loop, memory a TPU never spends.
XLA_CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false "
                 "--xla_disable_hlo_passes=while-loop-invariant-code-motion")


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  devices: int
  memory_gib: float
  description: str


def parse_topology(name: str) -> Topology:
  """'tpu-v4-128' (64 chips x 32 GiB), 'v5e-256', '8xh100', '4x8xh100' (4 nodes x 8 GPUs)."""
  key = name.lower()
  match = re.fullmatch(r"(?:tpu-)?(v2|v3|v4|v5p|v5e|v5litepod|v6e)-(\d+)", key)
  if match:
    per, memory = _TPU[match[1]]
    devices = int(int(match[2]) * per)
    return Topology(name, devices, memory, f"TPU {match[1]}: {devices} devices x {memory} GiB HBM")
  match = re.fullmatch(r"(?:(\d+)x)?(\d+)x(" + "|".join(map(re.escape, _GPU)) + r")", key)
  if match:
    nodes, per_node, gpu = int(match[1] or 1), int(match[2]), match[3]
    return Topology(name, nodes * per_node, _GPU[gpu],
                    f"{nodes} node(s) x {per_node} {gpu.upper()} ({_GPU[gpu]} GiB each)")
  raise ValueError(f"unknown topology {name!r}: expected e.g. tpu-v4-128, v5e-256, v5p-128, "
                   f"8xh100, 4x8xh100 (GPUs: {', '.join(_GPU)})")


def _csv(kind):
  return lambda text: [kind(part) for part in text.split(",") if part]


def _bool(text: str) -> bool:
  if text.lower() not in ("true", "false", "1", "0"):
    raise ValueError(f"expected true/false, got {text!r}")
  return text.lower() in ("true", "1")


def add_arguments(p) -> None:
  p.add_argument("--topology", default=None, help="e.g. tpu-v4-128, v5e-256, 8xh100, 4x8xh100")
  p.add_argument("--mesh", default=None,
                 help="e.g. data=8,model=8 or replica=2,data=4,model=8 (default: the gin "
                 "partitioning; with no --topology it also gives the device count)")
  p.add_argument("--rules", default=None, help="default | 2d | fsdp (default: the gin MeshConfig)")
  p.add_argument("--device_memory_gib", type=float, default=None,
                 help="per-device memory (default: the topology's)")
  p.add_argument("--remat", type=_csv(str), default=None,
                 help="remat policies to compare, e.g. none,dots,full (default: none,full)")
  p.add_argument("--scan_layers", type=_csv(_bool), default=None,
                 help="e.g. true,false (default: the config's)")
  p.add_argument("--microbatches", type=_csv(int), default=None,
                 help="e.g. 1,4 (default: the config's)")
  p.add_argument("--param_dtype", type=_csv(str), default=None,
                 help="backbone parameter dtypes, e.g. float32,bfloat16 (default: the preset's)")
  p.add_argument("--json", default=None, help="also write the figures to this JSON file")


def _target(args, config_mesh) -> tuple[int, float | None, str]:
  """(device count, GiB per device or None, description) of the target."""
  from ptuning import sharding
  if args.topology:
    try:
      topology = parse_topology(args.topology)
    except ValueError as e:
      raise SystemExit(str(e)) from None
    memory = args.device_memory_gib or topology.memory_gib
    return topology.devices, memory, topology.description
  mesh = sharding.parse_mesh_spec(args.mesh) if args.mesh else config_mesh
  if -1 in (mesh.data, mesh.model):
    raise SystemExit("plan needs --topology, or a --mesh with explicit sizes (data=A,model=B)")
  devices = mesh.replica * mesh.data * mesh.model
  return devices, args.device_memory_gib, f"{devices} devices (explicit mesh)"


def _load_config(args):
  from ptuning import gin_setup
  defaults = ["MODEL_DIR = '/nonexistent/plan'", "MIXTURE_OR_TASK_NAME = 'unused_by_plan'"]
  return gin_setup.load_config(args.gin_files, defaults + list(args.gin_bindings))


def run(args) -> int:
  """Parent: re-executes with the target's fake device count; child: plans and prints."""
  config = _load_config(args)
  devices, _, _ = _target(args, config.mesh)
  if os.environ.get(_CHILD_ENV) != str(devices):
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    # PTUNING_CPU_ATTENTION=0: attention as the target's XLA compiles it, not the CPU kernel.
    env = dict(os.environ, JAX_PLATFORMS="cpu", PTUNING_CPU_ATTENTION="0",
               **{_CHILD_ENV: str(devices)},
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices} "
               f"{XLA_CPU_FLAGS}".strip())
    return subprocess.run([sys.executable, "-m", "ptuning", *args.argv], env=env).returncode
  return _plan(args, config)


def _mesh_config(args, config):
  from ptuning import sharding
  mesh = sharding.parse_mesh_spec(args.mesh) if args.mesh else config.mesh
  return dataclasses.replace(mesh, rules=args.rules or (config.mesh.rules if not args.mesh
                                                         else mesh.rules))


def _shard_bytes(tree: Any, shardings: Any = None) -> int:
  """Bytes one device holds of `tree` (ShapeDtypeStructs), laid out by `shardings` (a matching
  tree; default each leaf's own `.sharding`)."""
  import jax
  import numpy as np
  leaves = jax.tree.leaves(tree)
  specs = jax.tree.leaves(shardings) if shardings is not None else [x.sharding for x in leaves]
  return sum(int(np.prod(s.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x, s in zip(leaves, specs))


def abstract_batch(config) -> dict:
  """ShapeDtypeStructs of one global batch `[BATCH_SIZE, L]` (EncDecFeatureConverter keys)."""
  import jax
  import jax.numpy as jnp
  lengths = config.task_feature_lengths
  shape = lambda key: (config.batch_size, lengths["inputs" if key.startswith("encoder") else "targets"])
  keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
          "decoder_loss_weights")
  return {key: jax.ShapeDtypeStruct(shape(key), jnp.int32) for key in keys}


def _lower(config):
  """(abstract experiment, lowered train step) of `config`; nothing is materialised."""
  import jax
  from ptuning.train.experiment import build_experiment
  exp = build_experiment(config, abstract=True)
  batch = abstract_batch(config)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  return exp, exp.train_step_fn(batch).lower(exp.abstract_state, exp.frozen, batch, rng)


def _unrolled_flops(config, encoder_layers: int, decoder_layers: int) -> float:
  """XLA's FLOP count of the unrolled, single-microbatch step with these layer counts."""
  model = config.model.replace(num_encoder_layers=encoder_layers,
                               num_decoder_layers=decoder_layers)
  flat = dataclasses.replace(config, scan_layers=False, microbatches=1, model=model)
  cost = _lower(flat)[1].cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float((cost or {}).get("flops", 0.0))


def step_flops(config) -> float:
  """Global FLOPs of one train step, loops counted in full (XLA's cost analysis counts a scan's
  body once): the count of the unrolled program. Every encoder layer after the first costs the
  same, and so does every decoder layer (the first computes the shared position bias), so the
  count is affine in the two layer counts and three short unrolled programs (2+2, 3+2 and 2+3
  layers) give it exactly: tracing the unrolled 32+32 layers of UL2 20B took half a minute."""
  model = config.model
  encoder, decoder = model.num_encoder_layers, model.num_decoder_layers
  if encoder <= 3 and decoder <= 3:
    return _unrolled_flops(config, encoder, decoder)
  base = _unrolled_flops(config, 2, 2)
  per_encoder_layer = _unrolled_flops(config, 3, 2) - base
  per_decoder_layer = _unrolled_flops(config, 2, 3) - base
  return base + (encoder - 2) * per_encoder_layer + (decoder - 2) * per_decoder_layer


def plan_variant(config, memory_gib: float | None, flops_cache: dict) -> dict[str, Any]:
  """Per-device figures of `config`'s train step (bytes, FLOPs, fit)."""
  start = time.perf_counter()
  exp, lowered = _lower(config)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  mem = {k: int(getattr(analysis, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  peak = mem["argument"] + mem["temp"] + max(mem["output"] - mem["alias"], 0) + mem["generated_code"]
  key = (config.remat_policy, str(config.model))
  if key not in flops_cache:
    flops_cache[key] = step_flops(config)
  devices = exp.mesh.devices.size
  compiled_cost = compiled.cost_analysis()
  compiled_cost = compiled_cost[0] if isinstance(compiled_cost, list) else compiled_cost
  state, shardings = exp.abstract_state, exp.state_shardings
  row = {
      "remat": config.remat_policy, "scan_layers": config.scan_layers,
      "microbatches": config.microbatches, "param_dtype": exp.model.param_dtype,
      "frozen_params": _shard_bytes(exp.frozen),
      "trainable_params": _shard_bytes(state.params, shardings.params),
      "optimizer_state": _shard_bytes(state.opt_state, shardings.opt_state),
      **{f"compiled_{k}": v for k, v in mem.items()},
      "peak": peak, "flops_per_step_global": flops_cache[key],
      "flops_per_step_per_device": flops_cache[key] / devices,
      # XLA's count for the compiled (per-device) program itself: loop bodies counted once.
      "compiled_flops_per_device_loops_once": float((compiled_cost or {}).get("flops", 0.0)),
      "compile_seconds": seconds}
  if memory_gib:
    row["fits"] = peak <= memory_gib * GIB
  return row


def _plan(args, config) -> int:
  import jax
  from ptuning.model.config import get_preset
  devices, memory_gib, description = _target(args, config.mesh)
  assert jax.device_count() == devices, (jax.device_count(), devices)
  mesh_config = _mesh_config(args, config)
  model = get_preset(config.model) if isinstance(config.model, str) else config.model
  if model is None:
    raise SystemExit("plan needs a model preset: --gin_file=models/NAME.gin or --gin.MODEL=NAME")
  base = dataclasses.replace(config, mesh=mesh_config, model=model)
  variants = [dataclasses.replace(base, remat_policy=remat, scan_layers=scan,
                                  microbatches=micro, model=model.replace(param_dtype=dtype))
              for dtype in args.param_dtype or [model.param_dtype]
              for scan in args.scan_layers or [config.scan_layers]
              for micro in args.microbatches or [config.microbatches]
              for remat in args.remat or ["none", "full"]]
  sizes = mesh_config.axis_sizes(devices)
  data_shards = sizes["data"] * sizes.get("replica", 1)
  header = {
      "model": config.model if isinstance(config.model, str) else str(model),
      "target": description, "mesh": sizes, "rules": mesh_config.rules,
      "device_memory_gib": memory_gib, "batch": config.batch_size,
      "examples_per_data_shard": config.batch_size / data_shards,
      "task_feature_lengths": dict(config.task_feature_lengths),
      "method": getattr(config.method, "name", "full_finetuning"),
      "prompt_length": getattr(config.method, "length", None),
      "activation_dtype": config.dtype, "optimizer": config.optimizer}
  print(format_header(header), flush=True)
  rows, flops_cache = [], {}
  for variant in variants:
    rows.append(plan_variant(variant, memory_gib, flops_cache))
    print(format_row(rows[-1]), flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({**header, "variants": rows}, f, indent=1)
  return 0


_COLUMNS = ("remat", "scan", "micro", "dtype", "frozen", "train+opt", "temp", "peak", "fits",
            "TFLOP/dev", "compile")


def format_header(h: dict) -> str:
  mesh = " x ".join(f"{k}={v}" for k, v in h["mesh"].items())
  memory = f"{h['device_memory_gib']:g} GiB per device" if h["device_memory_gib"] else "no memory limit given"
  lines = [
      f"plan: {h['model']}  {h['method']} (prompt {h['prompt_length']})  optimizer {h['optimizer']}",
      f"target: {h['target']}; {memory}",
      f"mesh: {mesh}  rules={h['rules']}  batch {h['batch']} "
      f"({h['examples_per_data_shard']:g} per data shard)  lengths {h['task_feature_lengths']}  "
      f"activations {h['activation_dtype']}",
      "per-device GiB: frozen = backbone parameters, train+opt = trainable parameters + optimizer "
      "state, temp = compiled temporaries, peak = arguments + temp + non-donated outputs",
      "  ".join(f"{c:>9}" for c in _COLUMNS)]
  return "\n".join(lines)


def format_row(r: dict) -> str:
  gib = lambda b: f"{b / GIB:9.3f}"
  fits = {True: "yes", False: "NO"}.get(r.get("fits"), "-")
  cells = [f"{r['remat']:>9}", f"{str(r['scan_layers']).lower():>9}", f"{r['microbatches']:>9}",
           f"{r['param_dtype']:>9}", gib(r["frozen_params"]),
           gib(r["trainable_params"] + r["optimizer_state"]), gib(r["compiled_temp"]),
           gib(r["peak"]), f"{fits:>9}", f"{r['flops_per_step_per_device'] / 1e12:9.2f}",
           f"{r['compile_seconds']:8.1f}s"]
  return "  ".join(cells)
