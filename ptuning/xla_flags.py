"""XLA flags that ptuning's commands add to `XLA_FLAGS` before JAX starts its backends.

Each default was timed on the run it is for, and a flag the user already set (any value) is left
as the user set it: `XLA_FLAGS=--xla_gpu_cudnn_gemm_fusion_level=0 ptuning bench ...` runs
without the default. The flags are parsed by every jaxlib (CPU-only builds too) and read only by
the backend they name, so adding them on a CPU or TPU host changes nothing there.

Standard library only: the CLI calls `add_defaults()` before anything imports JAX.
"""

from __future__ import annotations

import os
import re
from typing import MutableMapping

# --xla_gpu_cudnn_gemm_fusion_level=2: XLA's GPU autotuner may also pick cuDNN for each GEMM
# fusion (beside Triton and cuBLAS) and keeps whichever is fastest for it. T5 1.1 XL prompt
# tuning, bf16, batch 32, inputs 512, one H100 (2026-11-27, `STEPS=flags bash
# benchmarks/gpu.sh`, alternating on one machine): 0.2687 / 0.2700 / 0.2693 s/step without it,
# 0.2646 / 0.2664 / 0.2653 with it (42.3% -> 42.9% MFU).
DEFAULT_FLAGS = ("--xla_gpu_cudnn_gemm_fusion_level=2",)

_NAME = re.compile(r"--([A-Za-z0-9_]+)")


def flag_names(flags: str) -> set[str]:
  """The names of the `--name[=value]` flags in an `XLA_FLAGS` string."""
  return {match.group(1) for match in _NAME.finditer(flags)}


def with_defaults(flags: str, defaults: tuple[str, ...] = DEFAULT_FLAGS) -> str:
  """`flags` plus each default whose name `flags` does not already set."""
  present = flag_names(flags)
  missing = [flag for flag in defaults if not flag_names(flag) & present]
  return " ".join([flags.strip()] + missing).strip()


def add_defaults(environ: MutableMapping[str, str] | None = None) -> str:
  """Writes `with_defaults` of `environ['XLA_FLAGS']` back (default `os.environ`); returns it.

  Has an effect only before JAX initialises its backends (the first device query or computation).
  """
  env = os.environ if environ is None else environ
  env["XLA_FLAGS"] = with_defaults(env.get("XLA_FLAGS", ""))
  return env["XLA_FLAGS"]
