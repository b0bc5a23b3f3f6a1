"""Paired timing for the benches: two sides run round by round, in alternating order.

The speed of a shared machine drifts by 10-25% within minutes. Timing one side and then the
other puts that drift into their ratio; running them in rounds (round i: both sides' step i,
A B then B A) puts it on both alike, and the median of the per-round ratios is the figure.

- `interleave` runs steps that live in this process (`ptuning bench --vs METHOD`).
- `PeerProcess` keeps a peer (PEFT, transformers) in its own process, built once and waiting for
  orders, so that one of its steps can be a step of such a round (`ptuning bench --paired`).
  The worker side is `timed_steps`: with `paired` it announces itself and then runs one step per
  `step I` line read from stdin, answering with that step's own seconds (timed in the worker,
  so the pipe's latency is not counted); without, it is `bench.time_steps`.

Standard library only, like `ptuning.bench`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
  from ptuning.bench_peak import MatmulPeak

READY = "@ptuning-bench-peer ready"  # protocol lines on the worker's stdout start with '@'
DONE = "@ptuning-bench-peer done"


def interleave(steps: dict[str, Callable[[Any], Any]], batches: dict[str, Sequence], warmup: int,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
  """Seconds of each side's `step(batch)` per round after the first `warmup` rounds; round i runs
  every side on its i-th batch, the order reversed every other round (each `step` must block
  until its work is done)."""
  names = list(steps)
  rounds = {len(batches[name]) for name in names}
  if len(rounds) != 1:
    raise ValueError(f"every side needs the same number of batches; got "
                     f"{ {name: len(batches[name]) for name in names} }")
  times = {name: [] for name in names}
  for i in range(rounds.pop()):
    for name in names if i % 2 == 0 else reversed(names):
      start = clock()
      steps[name](batches[name][i])
      if i >= warmup:
        times[name].append(clock() - start)
  return times


def time_with_peer(step: Callable[[Any], Any], batches: Sequence, warmup: int,
                   peer: "PeerProcess | None" = None, probe: "MatmulPeak | None" = None
                   ) -> list[float]:
  """Seconds of our `step(batch)` after the first `warmup`: alone (`bench.time_steps`), or, with
  a peer and / or a `bench_peak.MatmulPeak` probe, each batch in a round with the peer's step of
  the same index and the probe's matmul sample (`interleave`; the probe keeps its rates)."""
  from ptuning.bench import time_steps
  if peer is None and probe is None:
    return time_steps(step, batches, warmup)
  steps, indices = {"ours": step}, range(len(batches))
  if peer is not None:
    steps["peer"] = peer.step
  if probe is not None:
    steps["peak"] = probe.sample
  return interleave(steps, {name: batches if name == "ours" else indices for name in steps},
                    warmup)["ours"]


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
  """Median over rounds of `numerator[i] / denominator[i]`."""
  return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def timed_steps(step: Callable[[Any], Any], batches: Sequence, warmup: int,
                paired: bool = False) -> list[float]:
  """The worker side: seconds of each `step(batch)` after the first `warmup`. Paired: prints
  `READY`, then for each `step I` line on stdin runs `step(batches[I])` and prints `DONE
  <seconds>`, until stdin closes (every batch must have been run once, in order)."""
  from ptuning.bench import time_steps
  if not paired:
    return time_steps(step, batches, warmup)
  print(READY, flush=True)
  times, expected = [], 0
  for line in sys.stdin:
    index = int(line.split()[1])
    if index != expected:
      raise RuntimeError(f"paired peer: asked for step {index}, expected step {expected}")
    start = time.perf_counter()
    step(batches[index])
    seconds = time.perf_counter() - start
    if index >= warmup:
      times.append(seconds)
    print(f"{DONE} {seconds!r}", flush=True)
    expected += 1
  if expected != len(batches):
    raise RuntimeError(f"paired peer: stdin closed after {expected} of {len(batches)} steps")
  return times


class PeerProcess:
  """`python -m MODULE FLAG SPEC` (SPEC with `paired: true`) kept running: the constructor
  returns once the peer is built (its `READY` line), `step(i)` runs its step i, `result()` ends
  it and returns its JSON result (its last stdout line). A peer that exits early raises
  `RuntimeError` with the end of its stderr."""

  def __init__(self, module: str, flag: str, spec: dict):
    from ptuning.bench import worker_command
    argv, env = worker_command(module, flag, dict(spec, paired=True))
    self._flag = flag
    self._stderr = tempfile.TemporaryFile(mode="w+")  # a file: a full pipe would block the peer
    self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._stderr, text=True, env=env)
    self._expect(READY)

  def _fail(self, what: str) -> RuntimeError:
    self._proc.kill()
    code = self._proc.wait()
    self._stderr.seek(0)
    return RuntimeError(f"{self._flag} worker failed ({code}) {what}:\n"
                        f"{self._stderr.read()[-4000:]}")

  def _expect(self, prefix: str) -> str:
    for line in self._proc.stdout:
      if line.startswith(prefix):
        return line[len(prefix):].strip()
    raise self._fail(f"before answering {prefix!r}")

  def step(self, index: int) -> float:
    """Runs the peer's step `index`; returns its seconds as the peer timed them."""
    try:
      self._proc.stdin.write(f"step {index}\n")
      self._proc.stdin.flush()
    except BrokenPipeError:
      raise self._fail(f"at step {index}") from None
    return float(self._expect(DONE))

  def result(self) -> dict:
    """Closes the peer's stdin and returns its result."""
    self._proc.stdin.close()
    out = self._proc.stdout.read()
    if self._proc.wait():
      raise self._fail("after its steps")
    return json.loads(out.strip().splitlines()[-1])

  def close(self) -> None:
    """Stops the peer if it is still running (after an error on our side); frees its files."""
    if self._proc.poll() is None:
      self._proc.kill()
      self._proc.wait()
    self._stderr.close()
