"""Small task files the tests make themselves (no downloads)."""

import json
from pathlib import Path

import numpy as np


def write_task(path: Path, n: int = 64, seed: int = 0) -> Path:
  """`n` jsonl lines 'is {digit} even?' -> 'yes' / 'no' (a task a prompt can learn)."""
  rng = np.random.default_rng(seed)
  with open(path, "w") as f:
    for _ in range(n):
      a = int(rng.integers(0, 10))
      f.write(json.dumps({"inputs": f"is {a} even?", "targets": "yes" if a % 2 == 0 else "no"}) + "\n")
  return path
