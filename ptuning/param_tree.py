"""Parameter trees as plain nested dicts addressed by '/'-joined paths.

One rule (a regex over paths) chooses the trainable set; `split` and `merge` are the only
places that apply it, so the optimizer, the checkpointer and the tests agree by construction.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import jax

Tree = dict[str, Any]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}. Leaves are anything that is not a Mapping."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, path))
    else:
      flat[path] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> Tree:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: Tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def map_with_path(fn: Callable[[str, Any], Any], tree: Mapping[str, Any]) -> Tree:
  """Applies `fn(path, leaf)` to every leaf of a nested dict."""
  return unflatten({path: fn(path, leaf) for path, leaf in flatten(tree).items()})


class TrainableRule:
  """Selects trainable leaves by a regex matched against '/'-joined paths (re.search)."""

  def __init__(self, pattern: str):
    self.pattern = pattern
    self._regex = re.compile(pattern)

  def __call__(self, path: str) -> bool:
    return bool(self._regex.search(path))

  def __repr__(self) -> str:
    return f"TrainableRule({self.pattern!r})"


def split(tree: Mapping[str, Any], rule: Callable[[str], bool]) -> tuple[Tree, Tree]:
  """Splits into (trainable, frozen) nested dicts by `rule(path)`; raises if nothing is trainable."""
  flat = flatten(tree)
  trainable = {p: v for p, v in flat.items() if rule(p)}
  if not trainable:
    raise ValueError(f"trainable rule {rule!r} selects no parameter; paths look like "
                     f"{sorted(flat)[:4]}")
  frozen = {p: v for p, v in flat.items() if not rule(p)}
  return unflatten(trainable), unflatten(frozen)


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> Tree:
  """Inverse of `split`."""
  flat = flatten(frozen)
  overlap = set(flat) & set(flatten(trainable))
  if overlap:
    raise ValueError(f"paths are both trainable and frozen: {sorted(overlap)[:4]}")
  flat.update(flatten(trainable))
  return unflatten(flat)


def count(tree: Any) -> int:
  """Number of scalars in a tree of arrays or ShapeDtypeStructs."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
