"""`ptuning bench --profile DIR`: where a compiled step's time goes, by kind of XLA operation.

Runs the compiled step a few more times under `jax.profiler.trace(DIR)` (a TensorBoard / XProf
trace is left there), reads the trace back with `jax.profiler.ProfileData`, matches every executed
op to its instruction in the compiled HLO and sums, per step:

  matmul (projections)  dots without batch dimensions: Q/K/V/O, MLP, LM head and their gradients
  matmul (attention)    batched dots: scores `[B, H, Q, K]` and weighted sums, forward and backward
  elementwise / reduce  everything else (softmax, norms, casts, layout transposes), by op name
  collective            all-reduce / all-gather / ... between devices of the mesh

with the FLOPs of the dots inside each op, so each row reads as achieved GFLOP/s. On a GPU the
matmuls are also library calls: cuBLAS gemm custom-calls count as dots (their dimension numbers
come from the backend config) and cuDNN flash attention calls (`--attention cudnn`) form their
own row, `attention (cuDNN fused)`, counted with the products the kernels do (forward
`4*B*N*T*S*H`, backward 2.5 times that: scores recomputed, then four gradient products). GEMM
fusions that XLA's autotuner gave to cuDNN (`--xla_gpu_cudnn_gemm_fusion_level`, a default of
ours) run as cuDNN's `matMul` engines, named by cuDNN and often inside CUDA graphs, so their
kernels cannot be matched to instructions: they form the row `matmul (cuDNN GEMM fusions)`, with
the FLOPs of the entry computation's cuDNN fusions (each runs once per step; inside a loop body
they are not counted). The GPU trace holds kernels (`classify_kernel` maps them back to
instructions by name). Times are
summed over the threads that launch ops; with several CPU threads one op may use them all, or
two ops may run side by side, so the rows can add up to more than the step's wall time; the
occupancy sweep (`occupancy`) splits the step into time with no op, one op and two or more ops
running, and names the ops that run alone.
"""

from __future__ import annotations

import collections
import glob
import math
import os
import re
from typing import Callable

# 'name = f32[2,3]{1,0} op(...)', or a tuple-shaped result '(bf16[...]{...}, s8[...]) op(...)'.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \(?(\w+)\[([\d,]*)\]")
_NUMBERED = re.compile(r"[.]\d+$")  # 'transpose_copy_fusion.219' -> 'transpose_copy_fusion'
_COLLECTIVE = re.compile(r" (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                         r"(-start|-done)?\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_LIBRARY_CALL = re.compile(r'custom-call\(%?([\w.\-]+), %?([\w.\-]+)[,)].*'
                           r'custom_call_target="__(cublas[^"]*|cudnn\$fmha[^"]*)"')
_JSON_DIMS = lambda name, text: re.search(rf'"{name}":\[([^\]]*)\]', text)
_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\(%?([\w.\-]+), %?[\w.\-]+\), (lhs_batch_dims=\{[\d,]*\}, )?"
                  r"lhs_contracting_dims=\{([\d,]*)\}")


def index_hlo(hlo: str) -> tuple[dict, dict, dict]:
  """(shape of every instruction, body text of every computation, instruction line by name)."""
  shapes, bodies, lines = {}, {}, {}
  name, body = None, []
  for line in hlo.splitlines():
    if line.endswith("{") and not line.startswith(" "):
      name, body = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%"), []
      continue
    if line.startswith("}") and name:
      bodies[name] = "\n".join(body)
      name = None
      continue
    body.append(line)
    match = _INSTRUCTION.match(line)
    if match:
      shapes[match.group(1)] = [int(d) for d in match.group(3).split(",") if d]
      lines[match.group(1)] = line
  return shapes, bodies, lines


def library_call(line: str, shapes: dict) -> tuple[str, float] | None:
  """(category, FLOPs) of a cuBLAS gemm or cuDNN flash-attention custom-call; else None."""
  call = _LIBRARY_CALL.search(line)
  if not call:
    return None
  lhs, rhs, target = call.groups()
  if target.startswith("cudnn"):  # query [B, T, N, H], key [B, S, N, H] (BTNH layout)
    (b, t, n, h), s = shapes.get(lhs, [0] * 4), shapes.get(rhs, [0, 0])[1]
    return "attention (cuDNN fused)", (10.0 if "Backward" in target else 4.0) * b * n * t * s * h
  out = re.search(r"= \(?\w+\[([\d,]*)\]", line).group(1)
  contracting, batch = (_JSON_DIMS(k, line) for k in ("lhs_contracting_dimensions",
                                                        "lhs_batch_dimensions"))
  k = math.prod(shapes.get(lhs, [0])[int(i.strip('" '))]
                for i in (contracting.group(1).split(",") if contracting else []) if i.strip())
  batched = bool(batch and batch.group(1).strip())
  flops = 2.0 * math.prod(int(d) for d in out.split(",") if d) * k
  return ("matmul (attention)" if batched else "matmul (projections)"), flops


def classify(op: str, shapes: dict, bodies: dict, lines: dict) -> tuple[str, float]:
  """(category, FLOPs) of the executed op named `op` (a fusion or a bare instruction)."""
  line = lines.get(op, "")
  library = library_call(line, shapes)
  if library:
    return library
  calls = _CALLS.search(line)
  text = bodies.get(calls.group(1), "") if calls else line
  flops, batched = 0.0, False
  for dims, lhs, batch, contracting in _DOT.findall(text):
    out = math.prod(int(d) for d in dims.split(",") if d)
    k = math.prod(shapes.get(lhs, [0])[int(i)] for i in contracting.split(",") if i)
    flops, batched = flops + 2.0 * out * k, batched or bool(batch)
  if flops:
    return ("matmul (attention)" if batched else "matmul (projections)"), flops
  if _COLLECTIVE.search(line):
    return f"collective: {_NUMBERED.sub('', op)}", 0.0
  kind = "reduce" if ("reduce(" in text or "reduce-window(" in text) else "elementwise"
  return f"{kind}: {_NUMBERED.sub('', op)}", 0.0


CUDNN_GEMMS = "matmul (cuDNN GEMM fusions)"


def cudnn_gemm_flops(hlo: str, shapes: dict, bodies: dict, lines: dict) -> float:
  """FLOPs of the entry computation's GEMM fusions that XLA gave to cuDNN (`"kind":"__cudnn$fusion"`
  in their backend config): what one step's `CUDNN_GEMMS` kernels compute."""
  entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M)
  total = 0.0
  for line in bodies.get(entry.group(1), "").splitlines() if entry else ():
    match = _INSTRUCTION.match(line)
    if match and '"kind":"__cudnn$fusion"' in line:
      total += classify(match.group(1), shapes, bodies, lines)[1]
  return total


def classify_kernel(kernel: str, shapes: dict, bodies: dict, lines: dict) -> tuple[str, float]:
  """(category, FLOPs) of a GPU kernel: XLA names a fusion's kernel after its instruction
  ('gemm_fusion_dot_25' for 'gemm_fusion_dot.25'); library kernels keep their own names (cuBLAS
  'nvjet...' / '...gemm...', cuDNN '...sdpa...', 'cudnn::...'; their FLOPs are not counted)."""
  for op in (kernel, re.sub(r"_(\d+)$", r".\1", kernel)):
    if op in lines:
      return classify(op, shapes, bodies, lines)
  if "matMul" in kernel:  # cuDNN's GEMM engines ('..._sm90_matMul_pointwise_knob_3_...')
    return CUDNN_GEMMS, 0.0
  if "sdpa" in kernel or "fmha" in kernel or "cudnn" in kernel:
    return "attention (cuDNN fused)", 0.0
  if "nvjet" in kernel or "gemm" in kernel or "cutlass" in kernel:
    return "matmul (cuBLAS)", 0.0
  if kernel.startswith(("memcpy", "memset")):
    return f"copy: {kernel}", 0.0
  return f"kernel: {kernel[:60]}", 0.0


def profile_step(run_step: Callable[[], None], hlo: str, trace_dir: str, steps: int = 2) -> dict:
  """Traces `steps` calls of `run_step` (which blocks) into `trace_dir` (the compiled HLO beside
  it, `step.hlo.txt`) and returns `read_trace` of it."""
  import jax
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      run_step()
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                 key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
  with open(os.path.join(trace_dir, "step.hlo.txt"), "w") as f:
    f.write(hlo)
  return read_trace(files[-1], hlo, steps)


def read_trace(trace_file: str, hlo: str, steps: int) -> dict:
  """`{'steps', 'rows': [(category, ms_per_step, gflop_per_step, ops_per_step)], 'trace',
  'occupancy'}` of an `*.xplane.pb` trace of `steps` steps of the program whose HLO is `hlo`."""
  import jax
  shapes, bodies, lines = index_hlo(hlo)
  time_ns, flops, count = collections.Counter(), collections.Counter(), collections.Counter()
  spans = []
  planes = list(jax.profiler.ProfileData.from_file(trace_file).planes)
  on_gpu = any(p.name.startswith("/device:GPU") for p in planes)
  for plane in planes:
    if on_gpu != plane.name.startswith("/device:GPU"):
      continue  # on a GPU: its kernels only (host threads only launch them)
    for line in plane.lines:
      for event in line.events:
        if on_gpu:
          category, f = classify_kernel(event.name, shapes, bodies, lines)
        elif event.name in lines:  # else executor / thread-pool bookkeeping, python frames
          category, f = classify(event.name, shapes, bodies, lines)
        else:
          continue
        time_ns[category] += event.duration_ns
        flops[category] += f
        count[category] += 1
        spans.append((event.start_ns, event.start_ns + event.duration_ns, category))
  if CUDNN_GEMMS in time_ns:
    flops[CUDNN_GEMMS] = steps * cudnn_gemm_flops(hlo, shapes, bodies, lines)
  rows = [(c, time_ns[c] / 1e6 / steps, flops[c] / 1e9 / steps, count[c] / steps)
          for c in sorted(time_ns, key=time_ns.get, reverse=True)]
  return {"steps": steps, "rows": rows, "trace": trace_file, "occupancy": occupancy(spans, steps)}


def occupancy(spans: list[tuple[float, float, str]], steps: int) -> dict:
  """How many ops run at once: ms per step with none running (between the first and the last op:
  launch gaps, host work), exactly one, two or more; and, of the one-op time, ms per category.

  `spans` are `(start_ns, end_ns, category)` of every executed op on every thread. One running op
  may still use every thread (a large dot is split over the intra-op pool); the one-op rows are
  where that split decides the speed."""
  edges = sorted([(start, 1, cat) for start, _, cat in spans] +
                 [(end, -1, cat) for _, end, cat in spans], key=lambda e: (e[0], e[1]))
  by_count, alone = collections.Counter(), collections.Counter()
  running: collections.Counter = collections.Counter()
  for (t, delta, cat), (t_next, _, _) in zip(edges, edges[1:]):
    running[cat] += delta
    if running[cat] == 0:
      del running[cat]
    n = sum(running.values())
    by_count[min(n, 2)] += t_next - t
    if n == 1:
      alone[next(iter(running))] += t_next - t
  ms = lambda ns: ns / 1e6 / steps
  return {"none_ms": ms(by_count[0]), "one_ms": ms(by_count[1]), "two_or_more_ms": ms(by_count[2]),
          "one_by_category_ms": {c: ms(v) for c, v in alone.most_common()}}


def print_profile(result: dict, wall_s: float, top: int = 12) -> None:
  """The per-category table: matmul rows first, then the `top` costliest other ops."""
  rows = result["rows"]
  matmul = [r for r in rows if r[0].startswith(("matmul", "attention"))]
  other = [r for r in rows if not r[0].startswith(("matmul", "attention"))]
  print(f"\nprofile ({result['steps']} traced steps, median step {wall_s:.3f} s; ms summed over "
        f"launching threads): {result['trace']}")
  print(f"{'op kind':44s} {'ms/step':>9s} {'GFLOP':>8s} {'GFLOP/s':>9s} {'ops':>6s}")
  for name, ms, gflop, n in matmul + other[:top]:
    rate = f"{gflop / ms * 1e3:9.1f}" if gflop else f"{'':9s}"
    print(f"{name[:44]:44s} {ms:9.1f} {gflop:8.1f} {rate} {n:6.0f}")
  rest = other[top:]
  if rest:
    print(f"{'(%d more kinds)' % len(rest):44s} {sum(r[1] for r in rest):9.1f}")
  print(f"{'total':44s} {sum(r[1] for r in rows):9.1f} {sum(r[2] for r in rows):8.1f}")
  occ = result.get("occupancy")
  if occ:
    print(f"ops running at once, ms/step: none {occ['none_ms']:.1f}, one {occ['one_ms']:.1f}, "
          f"two or more {occ['two_or_more_ms']:.1f}; running alone: " + ", ".join(
              f"{c} {v:.1f}" for c, v in list(occ["one_by_category_ms"].items())[:4]))
