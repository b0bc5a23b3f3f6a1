"""Compare a run's `metrics.jsonl` with a reference one (reproducing a committed run).

`python -m ptuning.train.compare_metrics REFERENCE RUN` prints, for every step the reference
logged, the reference and new values of the train loss and of each eval metric, and exits 1
when one differs by more than its tolerance (relative for losses, absolute for eval scores)
or the run lacks a step the reference has. Timing metrics (`perf/*`) are never compared.
`--strip SRC DST` writes SRC without timing metrics (how a reference is committed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping

COMPARED_PREFIXES = ("train/loss", "eval/")


def read_metrics(path: str) -> dict[int, dict[str, float]]:
  """`{step: {name: value}}`, lines of one step merged; a bad line fails with `path:line`."""
  steps: dict[int, dict[str, float]] = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        step = int(record.pop("step"))
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{lineno}: not a metrics line with a 'step' ({e})") from None
      steps.setdefault(step, {}).update(record)
  return steps


def compare(reference: Mapping[int, Mapping[str, float]], run: Mapping[int, Mapping[str, float]],
            loss_rtol: float, eval_atol: float) -> list[str]:
  """Printable rows, each ending in 'ok' or 'DIFFERS' / 'MISSING'."""
  rows = []
  for step in sorted(reference):
    for name, want in sorted(reference[step].items()):
      if not name.startswith(COMPARED_PREFIXES) or name.endswith("/examples"):
        continue
      got = run.get(step, {}).get(name)
      if got is None:
        rows.append(f"step {step:>6d}  {name:<24s} {want:>10.4f}  {'-':>10s}  MISSING")
        continue
      if name.startswith("eval/"):
        ok = abs(got - want) <= eval_atol
      else:
        ok = abs(got - want) <= loss_rtol * abs(want)
      rows.append(f"step {step:>6d}  {name:<24s} {want:>10.4f}  {got:>10.4f}  "
                  f"{'ok' if ok else 'DIFFERS'}")
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("reference")
  parser.add_argument("run")
  parser.add_argument("--strip", action="store_true",
                      help="write REFERENCE (a run's metrics) to RUN without perf/* metrics")
  parser.add_argument("--loss_rtol", type=float, default=0.02)
  parser.add_argument("--eval_atol", type=float, default=0.03)
  args = parser.parse_args(argv)
  if args.strip:
    with open(args.reference, encoding="utf-8") as src, open(args.run, "w", encoding="utf-8") as dst:
      for line in src:
        if line.strip():
          record = {k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
          dst.write(json.dumps(record) + "\n")
    return 0
  for path in (args.reference, args.run):
    if not os.path.isfile(path):
      print(f"compare_metrics: {path} does not exist; nothing to compare", file=sys.stderr)
      return 1
  rows = compare(read_metrics(args.reference), read_metrics(args.run), args.loss_rtol,
                 args.eval_atol)
  print(f"{'':12s}  {'metric':<24s} {'reference':>10s}  {'this run':>10s}")
  print("\n".join(rows))
  failed = [r for r in rows if not r.endswith("ok")]
  print(f"{len(rows) - len(failed)} of {len(rows)} metrics within tolerance "
        f"(loss rtol {args.loss_rtol}, eval atol {args.eval_atol}): "
        f"{'REPRODUCED' if rows and not failed else 'NOT REPRODUCED'}")
  return 0 if rows and not failed else 1


if __name__ == "__main__":
  sys.exit(main())
