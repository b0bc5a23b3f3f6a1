"""The CPU's matmul peak, the yardstick of `ptuning bench`'s fractions of peak.

A shared CPU's speed moves by 5-15% within seconds (turbo budget, neighbours): the best of a few
`[n, n] @ [n, n]` products timed once before the steps (the peak of record, `MatmulPeak.flops`)
can land in a fast second or a slow one, and the fraction of peak moves with it. `MatmulPeak.
sample` times the same product again inside every timed round (`bench_rounds.time_with_peer`),
so each step can be scored against the matmul rate of its own round: `paired_fraction` is the
median over rounds of (step FLOP/s) / (that round's matmul FLOP/s), the drift-free figure, as
`bench_rounds.paired_ratio` is for the speedups. GPUs take their datasheet peak instead.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Sequence

SIZE = 2048  # n of the [n, n] @ [n, n] products


class MatmulPeak:
  """The fastest jitted `[SIZE, SIZE]` product on this CPU among float32 and `dtype` (float32
  accumulation, cast back: the product the model runs, `mixed_einsum`; bfloat16 on CPU is about
  2x faster so), best of `repeats` calls: `flops` FLOP/s and `source`, its description.
  `sample(i)` times `per_round` more calls and keeps round i's best rate in `rounds`."""

  def __init__(self, dtype: str, repeats: int = 5, per_round: int = 3):
    import jax
    import jax.numpy as jnp
    self._per_round = per_round
    self.rounds: dict[int, float] = {}
    best = {}
    self._products = {}
    for dt in sorted({"float32", dtype}):
      a = jax.random.normal(jax.random.key(0), (SIZE, SIZE), dt)
      dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype))
      self._products[dt] = lambda dot=dot, a=a: dot(a, a).block_until_ready()
      self._products[dt]()
      best[dt] = self._best_seconds(self._products[dt], repeats)
    self.dtype = min(best, key=best.get)
    self.flops = 2 * SIZE**3 / best[self.dtype]
    self.source = f"measured: best {SIZE}^3 {self.dtype} jnp.dot on {os.cpu_count()} cores"

  @staticmethod
  def _best_seconds(product, calls: int) -> float:
    times = []
    for _ in range(calls):
      start = time.perf_counter()
      product()
      times.append(time.perf_counter() - start)
    return min(times)

  def sample(self, index: int) -> None:
    """Round `index`'s matmul rate (best of `per_round` calls), kept in `rounds[index]`."""
    self.rounds[index] = 2 * SIZE**3 / self._best_seconds(self._products[self.dtype],
                                                          self._per_round)


def paired_fraction(flops_per_step: float, step_seconds: Sequence[float],
                    round_peaks: Sequence[float]) -> float:
  """Median over rounds of `(flops_per_step / step_seconds[i]) / round_peaks[i]`."""
  return statistics.median(flops_per_step / s / p
                           for s, p in zip(step_seconds, round_peaks, strict=True))
