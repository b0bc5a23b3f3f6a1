"""`ptuning bench`: time one prompt-tuning train step, optionally against HF PEFT in PyTorch.

Ours is the experiment's own jitted train step (`bench_step.CompiledStep`: `build_experiment`
with a random backbone from a preset, `PromptTuning(length=P)` or `--method`, Adafactor), lowered
and compiled once and then called on `warmup + steps` different random batches `[B, L]` /
`[B, T]`, blocking on its outputs each step. `--vs peft` first runs
`peft.get_peft_model(T5ForConditionalGeneration, PromptTuningConfig)` with the same sizes and
batches in a subprocess (`ptuning/bench_peft.py`), so the two processes' peak RSS are measured
apart and JAX holds no GPU memory meanwhile. Both are
scored against one analytic FLOP count (`prompt_tuning_step_flops`) and one peak: measured (a
large matmul) on CPU, datasheet on GPU.

`--mode decode|score` (greedy decoding and rank scoring against transformers) is
`ptuning.bench_inference`, and `--vs METHOD` (two of our methods side by side) is
`ptuning.bench_methods`; `run` dispatches there.

This module imports only the standard library at the top (and `bench_step`, which does too), so
the PEFT worker never loads JAX.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from ptuning.bench_step import METHODS, step_flops

# Datasheet dense peaks, FLOP/s, by (device-kind substring, dtype); first match wins.
GPU_PEAKS = (("H100 PCIe", {"bfloat16": 756e12, "float32": 51e12}),
             ("H100", {"bfloat16": 989e12, "float32": 67e12}),
             ("H200", {"bfloat16": 989e12, "float32": 67e12}),
             ("A100", {"bfloat16": 312e12, "float32": 19.5e12}))


def prompt_tuning_step_flops(cfg, batch: int, inputs: int, targets: int, prompt: int) -> dict:
  """Matmul FLOPs (2*m*n*k each) of one frozen-backbone prompt-tuning step.

  Encoder over `S = prompt + inputs` tokens per layer: Q/K/V/O projections `4 * 2*S*d*h`,
  scores and weighted sum `2 * 2*S*S*h`, MLP `(3 if gated else 2) * 2*S*d*f`. Decoder over `T`
  tokens per layer: self-attention as above with `T`, cross-attention Q/O `2 * 2*T*d*h`, K/V of
  the encoder outputs `2 * 2*S*d*h`, scores and weighted sum `2 * 2*T*S*h`, MLP. LM head
  `2*T*d*V`. `d = d_model`, `h = num_heads * d_kv`, `f = d_ff`, all times `batch`.
  Backward = forward: only input gradients flow through the frozen backbone (no weight
  gradients), one matmul per forward matmul. (Attention's activation-by-activation products
  really need two in backward; the convention here ignores that, a few % for long inputs.)
  Returns `{'forward', 'backward', 'total'}` in FLOPs.
  """
  d, h, f, v = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.vocab_size
  s, t = prompt + inputs, targets
  mlp = (3 if cfg.gated else 2) * 2 * d * f  # per token
  proj = 2 * d * h  # one [d, h] projection, per token
  encoder = s * (4 * proj + mlp) + 2 * 2 * s * s * h
  decoder = (t * (4 * proj + mlp) + 2 * 2 * t * t * h  # self-attention and MLP
             + t * 2 * proj + s * 2 * proj + 2 * 2 * t * s * h)  # cross-attention
  forward = batch * (cfg.num_encoder_layers * encoder + cfg.num_decoder_layers * decoder
                     + 2 * t * d * v)
  return {"forward": forward, "backward": forward, "total": 2 * forward}


def cpu_model_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def peak_rss_bytes() -> int:
  """This process's peak resident set size: `VmHWM`, else `ru_maxrss` (which, on Linux, keeps
  the parent's peak across fork + exec, so it would credit the PEFT worker with ours)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
  """Restarts this process's `VmHWM` from its current RSS (Linux `clear_refs` 5), so that a later
  `peak_rss_bytes()` is the peak of what ran in between; False where that is unsupported."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def random_batches(n: int, batch: int, inputs: int, targets: int, vocab: int, seed: int = 0,
                   num_tasks: int = 0) -> list[dict]:
  """`n` full (unpadded) int32 batches: encoder `[B, L]`, decoder in/targets/weights `[B, T]`
  (and `task_ids [B]` drawn from `num_tasks` tasks when it is > 0)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    enc = rng.integers(2, vocab, (batch, inputs), dtype=np.int32)
    tgt = rng.integers(2, vocab, (batch, targets), dtype=np.int32)
    enc[:, -1] = tgt[:, -1] = 1  # EOS
    dec = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    out.append({"encoder_input_tokens": enc, "decoder_input_tokens": dec,
                "decoder_target_tokens": tgt, "decoder_loss_weights": np.ones_like(tgt)})
    if num_tasks:
      out[-1]["task_ids"] = rng.integers(0, num_tasks, (batch,), dtype=np.int32)
  return out


def time_steps(step: Callable[[Any], None], batches: list, warmup: int) -> list[float]:
  """Seconds of each `step(batch)` after the first `warmup` (`step` must block until done)."""
  times = []
  for i, batch in enumerate(batches):
    start = time.perf_counter()
    step(batch)
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return times


def _summary(times: list[float], flops: dict, spec: dict) -> dict:
  median = statistics.median(times)
  tokens = spec["batch"] * (spec["inputs"] + spec["targets"])
  return {"step_s_median": median, "step_s_min": min(times), "step_s_max": max(times),
          "step_s_all": times, "tokens_per_s": tokens / median,
          "tokens_per_s_with_prompt": (tokens + spec["batch"] * spec["prompt"]) / median,
          "flops_per_s": flops["total"] / median}


def _peak_flops(jax, dtype: str, probe=None) -> tuple[float | None, str]:
  """(FLOP/s, how it was found): datasheet for known GPUs, a timed matmul elsewhere (`probe`, a
  `bench_peak.MatmulPeak`, or a new one)."""
  device = jax.devices()[0]
  if device.platform == "gpu":
    for name, peaks in GPU_PEAKS:
      if name in device.device_kind:
        return peaks[dtype], f"datasheet {name} {dtype} dense"
    return None, f"unknown peak for {device.device_kind}"
  if probe is None:
    from ptuning.bench_peak import MatmulPeak
    probe = MatmulPeak(dtype)
  return probe.flops, probe.source


def hardware_info(dtype: str, probe=None) -> dict:
  """JAX version and backend, device kind and count, CPU model and cores, the XLA flags set in
  the environment, and the peak FLOP/s the fractions are taken of (`_peak_flops`, from `probe`
  where given) with where it comes from."""
  import jax
  device = jax.devices()[0]
  peak, peak_source = _peak_flops(jax, dtype, probe)
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "device_kind": device.device_kind, "devices": jax.device_count(),
          "cpu": cpu_model_name(), "cores": os.cpu_count(), "platform": platform.platform(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "peak_flops": peak,
          "peak_source": peak_source, "cpu_attention_kernel": _cpu_attention_kernel(jax)}


def _cpu_attention_kernel(jax) -> bool | None:
  """Whether float32 attention runs the fused CPU kernel (`ptuning/model/cpu_attention.py`);
  None off CPU."""
  if jax.default_backend() != "cpu":
    return None
  from ptuning.model import cpu_attention
  return cpu_attention.available()


def bench_ours(spec: dict, flops: dict, peer=None) -> dict:
  """Builds the experiment and times its compiled train step; hardware and peak included. With a
  `bench_rounds.PeerProcess`, each of our steps pairs with one of the peer's, in alternating
  order (`bench_rounds.interleave`)."""
  import jax
  from ptuning.bench_rounds import time_with_peer
  from ptuning.bench_step import CompiledStep

  probe = None
  if jax.devices()[0].platform != "gpu":  # the matmul rate, before the steps and in each round
    from ptuning.bench_peak import MatmulPeak
    probe = MatmulPeak(spec["dtype"])
  hardware = hardware_info(spec["dtype"], probe)
  rss_before = peak_rss_bytes()
  start = time.perf_counter()
  step = CompiledStep(spec)  # the one compiled executable, every step; the state is donated
  # Printed as it happens, so that a run stopped by a time limit still says where time went.
  print(f"ours: built and compiled in {time.perf_counter() - start:.1f} s (compile "
        f"{step.compile_s:.1f} s); timing {spec['warmup']} + {spec['steps']} steps", flush=True)
  build_rss = peak_rss_bytes()
  steps_rss = reset_peak_rss()  # from here: the training steps' peak, after build and compile
  out = _summary(time_with_peer(step, step.batches, spec["warmup"], peer, probe), flops, spec)
  if probe is not None:
    from ptuning.bench_peak import paired_fraction
    out["round_peak_flops"] = [probe.rounds[i] for i in range(spec["warmup"], len(step.batches))]
    out["fraction_of_peak_paired"] = paired_fraction(flops["total"], out["step_s_all"],
                                                     out["round_peak_flops"])
  if spec.get("profile"):
    from ptuning import bench_profile
    out["profile"] = bench_profile.profile_step(lambda: step(step.batches[-1]),
                                                step.compiled.as_text(), spec["profile"])
  stats = jax.devices()[0].memory_stats() or {}
  out.update(step.stats(), rss_before_build=rss_before,
             peak_rss=max(build_rss, peak_rss_bytes()),
             steps_peak_rss=peak_rss_bytes() if steps_rss else None,
             device_peak_bytes=stats.get("peak_bytes_in_use"))
  return {"hardware": hardware, "ours": out}


def worker_command(module: str, flag: str, spec: dict) -> tuple[list[str], dict]:
  """(argv, environment) of `python -m MODULE FLAG SPEC` with this checkout importable."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH")) if p))
  return [sys.executable, "-m", module, flag, json.dumps(spec)], env


def run_worker(module: str, flag: str, spec: dict) -> dict:
  """`python -m MODULE FLAG SPEC` in a fresh Python process; its last stdout line is the JSON
  result (used for every peer and helper process of the benches)."""
  argv, env = worker_command(module, flag, spec)
  proc = subprocess.run(argv, capture_output=True, text=True, env=env)
  if proc.returncode:
    raise RuntimeError(f"{flag} worker failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_peft(spec: dict) -> dict:
  """`bench_peft.peft_worker(spec)` in a fresh Python process."""
  return run_worker("ptuning.bench_peft", "--_peft_worker", spec)


def _gib(n: int | None) -> str:
  return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def print_hardware(hw: dict) -> None:
  """The hardware and peak lines of a train-mode report (`hardware_info` + `load_average`)."""
  peak = hw["peak_flops"]
  print(f"hardware: jax {hw['jax']} {hw['backend']} backend, {hw['devices']} x {hw['device_kind']}"
        f" | CPU: {hw['cpu']} | {hw['cores']} cores | load average {hw['load_average']:.2f}")
  print(f"peak: {f'{peak / 1e9:,.1f} GFLOP/s' if peak else 'unknown'} ({hw['peak_source']})")
  if hw.get("xla_flags"):
    print(f"XLA_FLAGS: {hw['xla_flags']}")
  if hw.get("cpu_attention_kernel") is not None:
    print(f"fused CPU attention kernel (float32): {'on' if hw['cpu_attention_kernel'] else 'off'}")


def _row(name: str, r: dict, peak: float | None) -> str:
  fraction = f"{100 * r['flops_per_s'] / peak:.1f}%" if peak else "n/a"
  return (f"{name:<6}{r['step_s_median']:>12.4f}{r['step_s_min']:>10.4f}{r['tokens_per_s']:>12,.0f}"
          f"{r['tokens_per_s_with_prompt']:>14,.0f}{r['flops_per_s'] / 1e9:>11.2f}{fraction:>9}"
          f"{r['peak_rss'] / 2**30:>13.2f}"
          f"{r['steps_peak_rss'] / 2**30 if r.get('steps_peak_rss') else float('nan'):>14.2f}")


def _print_paired_fractions(flops: float, ours: dict, peer: dict | None) -> None:
  """The fractions of peak against each round's own matmul rate (`bench_peak`); `peer` (PEFT in
  rounds with ours) gets its `fraction_of_peak_paired` here."""
  from ptuning.bench_peak import SIZE, paired_fraction
  rates = ours["round_peak_flops"]
  line = f"ours {100 * ours['fraction_of_peak_paired']:.1f}%"
  if peer is not None:
    peer["fraction_of_peak_paired"] = paired_fraction(flops, peer["step_s_all"], rates)
    line += f", peft {100 * peer['fraction_of_peak_paired']:.1f}%"
  print(f"of peak, paired (median over {len(rates)} rounds of each step's FLOP/s over the "
        f"{SIZE}^3 matmul timed in its round, {min(rates) / 1e9:,.0f}-{max(rates) / 1e9:,.0f} "
        f"GFLOP/s): {line}")


def run(args) -> int:
  """The `bench` command: prints the report, writes `--json`. `--mode decode|score` is
  `ptuning.bench_inference` (inference against transformers)."""
  if args.mode != "train":
    from ptuning import bench_inference
    return bench_inference.run(args)
  if args.prompt is None:
    raise SystemExit("--mode train needs --prompt (the prompt length P)")
  if args.paired and args.vs != "peft":
    raise SystemExit("--paired pairs our steps with a peer's: add --vs peft (--vs METHOD always "
                     "alternates)")
  if args.vs == "peft" and args.method != "prompt_tuning":
    raise SystemExit("--vs peft compares prompt tuning: use --method prompt_tuning")
  from ptuning.model.config import get_preset
  spec = {k: getattr(args, k) for k in ("model", "batch", "inputs", "targets", "prompt", "steps",
                                        "warmup", "dtype", "method", "mesh", "remat",
                                        "scan_layers", "attention", "param_dtype", "norm_barrier",
                                        "paired")}
  if args.vs in METHODS:  # two of our methods, side by side in this process
    if args.profile:
      raise SystemExit("--profile traces one method: leave out --vs, or use --vs peft")
    from ptuning import bench_methods
    return bench_methods.run(spec, args.vs, args.json)
  flops = step_flops(get_preset(args.model), spec)
  if args.profile:
    spec["profile"] = args.profile
  print("config: " + " ".join(f"{k}={v}" for k, v in spec.items()), flush=True)
  load_average = os.getloadavg()[0]
  # PEFT first, in its own process, while this one holds no JAX memory (GPU preallocation); or,
  # --paired, built first and then stepping in rounds with ours (both models held at once).
  # A peer that fails to build (out of memory, say) is reported, and ours is still measured.
  peft_result, peft_error, peer = None, None, None
  if args.vs == "peft":
    try:
      if args.paired:
        from ptuning.bench_rounds import PeerProcess
        peer = PeerProcess("ptuning.bench_peft", "--_peft_worker", spec)
      else:
        peft_result = run_peft(spec)
    except RuntimeError as e:
      peft_error = str(e)
      print(f"peft: FAILED, measuring ours alone; its error ends:\n{peft_error[-1500:]}",
            flush=True)
  try:
    result = bench_ours(spec, flops, peer)
    if peer is not None:
      peft_result = peer.result()
  finally:
    if peer is not None:
      peer.close()
  hw, ours = result["hardware"], result["ours"]
  hw["load_average"], peak = load_average, hw["peak_flops"]
  print_hardware(hw)
  print(f"analytic FLOPs/step: forward {flops['forward'] / 1e9:.4g} G + backward "
        f"{flops['backward'] / 1e9:.4g} G = {flops['total'] / 1e9:.4g} GFLOP")
  mem = ours["compiled_memory"]
  print(f"method: {spec['method']} | trainable parameters {ours['trainable_parameters']:,}")
  print(f"ours: mesh {ours['mesh']} | compile {ours['compile_s']:.1f} s | compiled step memory: " +
        ", ".join(f"{k} {_gib(v)}" for k, v in mem.items()) +
        f" | peak RSS {_gib(ours['peak_rss'])} ({_gib(ours['rss_before_build'])} after imports)"
        + (f" | device peak {_gib(ours['device_peak_bytes'])}"
           if ours["device_peak_bytes"] else ""))
  if peft_result:
    print(f"peft: torch {peft_result['torch']} ({peft_result['threads']} threads, "
          f"{peft_result['device']}), transformers {peft_result['transformers']}, peft "
          f"{peft_result['peft']} | peak RSS {_gib(peft_result['peak_rss'])} "
          f"({_gib(peft_result['rss_before_build'])} after imports)" +
          (f" | device peak {_gib(peft_result['device_peak_bytes'])}"
           if peft_result["device_peak_bytes"] else ""))
  print(f"\n{'impl':<6}{'step med s':>12}{'min s':>10}{'tokens/s':>12}{'+prompt tok/s':>14}"
        f"{'GFLOP/s':>11}{'of peak':>9}{'peak RSS GiB':>13}{'steps RSS GiB':>14}")
  print(_row("ours", ours, peak))
  speedup = paired = None
  if peft_result:
    print(_row("peft", peft_result, peak))
    speedup = peft_result["step_s_median"] / ours["step_s_median"]
    print(f"speedup vs peft: {speedup:.2f}")
    if peer is not None:
      from ptuning.bench_rounds import paired_ratio
      paired = paired_ratio(peft_result["step_s_all"], ours["step_s_all"])
      print(f"speedup vs peft, median of {len(ours['step_s_all'])} paired rounds (alternating "
            f"order): {paired:.3f}")
  if "fraction_of_peak_paired" in ours:
    _print_paired_fractions(flops["total"], ours, peft_result if peer is not None else None)
  if "profile" in ours:
    from ptuning import bench_profile
    bench_profile.print_profile(ours["profile"], ours["step_s_median"])
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": spec, "hardware": hw, "flops": flops, "ours": ours, "peft": peft_result,
                 "peft_error": peft_error, "speedup_vs_peft": speedup,
                 "speedup_vs_peft_paired": paired}, f, indent=2)
  return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
  from ptuning import bench_inference  # stdlib-only at import, like this module
  p.add_argument("--mode", default="train", choices=("train",) + bench_inference.MODES,
                 help="train: one train step (vs PEFT with --vs peft); decode: greedy decoding, "
                 "score: rank classification, both vs transformers (ptuning/bench_inference.py)")
  p.add_argument("--model", required=True, help="preset name, e.g. t5_1_1_small")
  p.add_argument("--batch", type=int, required=True)
  p.add_argument("--inputs", type=int, required=True, help="encoder input length L")
  p.add_argument("--targets", type=int, required=True,
                 help="decoder length T (decode: new tokens; score: candidate length)")
  p.add_argument("--prompt", type=int, default=None, help="prompt length P (train mode)")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="activation dtype (PEFT: torch.autocast to bfloat16)")
  p.add_argument("--param_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="dtype of our frozen backbone parameters (the prompt stays float32; PEFT "
                 "keeps float32 weights under autocast)")
  p.add_argument("--method", default="prompt_tuning", choices=METHODS)
  p.add_argument("--remat", default="none", help="remat policy of each layer (train mode)")
  p.add_argument("--scan_layers", action="store_true", help="nn.scan over layers (train mode)")
  p.add_argument("--attention", default="recompute", choices=("recompute", "plain", "cudnn"),
                 help="attention backward: recompute probabilities (default) or keep them; "
                 "cudnn: flash attention (jax.nn.dot_product_attention) on a GPU in bfloat16")
  p.add_argument("--norm_barrier", action=argparse.BooleanOptionalAction, default=True,
                 help="each norm's output behind an optimization barrier (T5Config.norm_barrier, "
                 "default on; --no-norm_barrier: the GEMMs may fuse the norm's scaling)")
  p.add_argument("--vs", default=None, choices=("peft",) + METHODS,
                 help="peft: also time HF PEFT prompt tuning (PyTorch); a method: time it and "
                 "--method side by side, in alternating rounds (ptuning/bench_methods.py)")
  p.add_argument("--paired", action="store_true",
                 help="--vs peft / decode / score: keep the peer in a running process and time "
                 "its steps in rounds with ours, alternating order (ptuning/bench_rounds.py); "
                 "both models are held at once")
  p.add_argument("--mesh", default=None, help="e.g. data=2,model=4 (default: all devices on data)")
  p.add_argument("--json", default=None, help="write every figure here")
  p.add_argument("--profile", default=None, metavar="DIR",
                 help="also trace 2 steps into DIR and print time and GFLOP/s per kind of op "
                 "(ptuning/bench_profile.py)")
  bench_inference.add_arguments(p)


if __name__ == "__main__":  # `ptuning bench` without the gin-aware CLI (e.g. on a bare GPU image)
  from ptuning import xla_flags
  xla_flags.add_defaults()  # as the CLI does, before JAX starts
  parser = argparse.ArgumentParser(prog="python -m ptuning.bench")
  add_arguments(parser)
  sys.exit(run(parser.parse_args()))
