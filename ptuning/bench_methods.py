"""`ptuning bench --method A --vs B`, B a method: two methods' train steps side by side.

Both experiments are built in this process on the same preset, batch and lengths (each method
with its own prefix: DePT's m=60 against prompt tuning's P=100, say), both steps compiled once,
and then timed round by round (`bench_rounds.interleave`): round i runs A and B on their i-th
batch, in alternating order, so the machine's drift falls on both alike. The figure of record is
the median of the per-round ratios `time_A / time_B`; the ratio of the two medians is printed
beside it.

Peak RSS is not split between the two (one process holds both); compiled memory is per step.
"""

from __future__ import annotations

import json
import os

from ptuning.bench import _gib, _summary, hardware_info, print_hardware
from ptuning.bench_rounds import interleave, paired_ratio
from ptuning.bench_step import CompiledStep, step_flops


def _row(name: str, r: dict, peak: float | None) -> str:
  fraction = f"{100 * r['flops_per_s'] / peak:.1f}%" if peak else "n/a"
  memory = r["compiled_memory"]
  return (f"{name:<16}{r['trainable_parameters']:>13,}{r['step_s_median']:>12.4f}"
          f"{r['step_s_min']:>10.4f}{r['tokens_per_s']:>11,.0f}{r['flops_per_s'] / 1e9:>10.2f}"
          f"{fraction:>9}{(memory.get('argument', 0) + memory.get('temp', 0)) / 2**30:>18.2f}")


def run(spec: dict, vs: str, json_path: str | None) -> int:
  """Builds `spec['method']` and `vs`, times them in alternating rounds, prints and writes
  (`json_path`) both summaries and their step-time ratio."""
  from ptuning.model.config import get_preset
  method = spec["method"]
  if vs == method:
    raise SystemExit(f"--vs {vs} compares two methods; --method is {method} too")
  specs = {method: spec, vs: dict(spec, method=vs)}
  flops = {name: step_flops(get_preset(s["model"]), s) for name, s in specs.items()}
  print("config: " + " ".join(f"{k}={v}" for k, v in spec.items()) + f" vs={vs}", flush=True)
  hardware = dict(hardware_info(spec["dtype"]), load_average=os.getloadavg()[0])
  steps = {name: CompiledStep(s) for name, s in specs.items()}
  times = interleave(steps, {name: step.batches for name, step in steps.items()},
                     spec["warmup"])
  results = {name: dict(_summary(times[name], flops[name], specs[name]), **steps[name].stats())
             for name in specs}
  ratio = paired_ratio(times[method], times[vs])
  ratio_of_medians = results[method]["step_s_median"] / results[vs]["step_s_median"]

  peak = hardware["peak_flops"]
  print_hardware(hardware)
  for name in specs:
    print(f"{name}: analytic {flops[name]['total'] / 1e9:.4g} GFLOP/step | mesh "
          f"{results[name]['mesh']} | compile {results[name]['compile_s']:.1f} s | compiled "
          f"memory: " + ", ".join(f"{k} {_gib(v)}"
                                  for k, v in results[name]["compiled_memory"].items()))
  print(f"{len(times[method])} timed rounds after {spec['warmup']} warm-up, each running both "
        f"steps, in alternating order")
  print(f"\n{'method':<16}{'trainable':>13}{'step med s':>12}{'min s':>10}{'tokens/s':>11}"
        f"{'GFLOP/s':>10}{'of peak':>9}{'args+temp GiB':>18}")
  for name in specs:
    print(_row(name, results[name], peak))
  print(f"step time {method} / {vs}: {ratio:.3f} (median of per-round ratios; ratio of medians "
        f"{ratio_of_medians:.3f})")
  if json_path:
    with open(json_path, "w") as f:
      json.dump({"config": dict(spec, vs=vs), "hardware": hardware, "flops": flops,
                 "results": results, "step_time_ratio": ratio,
                 "step_time_ratio_of_medians": ratio_of_medians}, f, indent=2)
  return 0
