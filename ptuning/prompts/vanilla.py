"""Vanilla prompt tuning (Lester et al., 2021): a trainable `[length, embed]` prompt joined to
the frozen input embeddings; the encoder mask covers it, so the decoder sees it as visible
encoder positions.

Placements: 'prefix' (default; prompt before the input) and 'after_bos' (after the first
token, for vocabularies whose inputs start with a BOS). Extend `_PLACEMENTS` for more.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ptuning.prompts import initializers
from ptuning.prompts.method import Params, broadcast_rows

Array = jax.Array


def _prefix(prompt: Array, embeds: Array, mask: Array) -> tuple[Array, Array]:
  prompt_mask = jnp.ones(prompt.shape[:2], mask.dtype)
  return (jnp.concatenate([prompt, embeds], axis=1),
          jnp.concatenate([prompt_mask, mask], axis=1))


def _after_bos(prompt: Array, embeds: Array, mask: Array) -> tuple[Array, Array]:
  prompt_mask = jnp.ones(prompt.shape[:2], mask.dtype)
  return (jnp.concatenate([embeds[:, :1], prompt, embeds[:, 1:]], axis=1),
          jnp.concatenate([mask[:, :1], prompt_mask, mask[:, 1:]], axis=1))


_PLACEMENTS: dict[str, Callable] = {"prefix": _prefix, "after_bos": _after_bos}


@dataclasses.dataclass(frozen=True)
class PromptTuning:
  """One soft prompt `prompt/prompt [length, embed]`, replicated by default."""

  length: int = 100
  initializer: initializers.Initializer = dataclasses.field(
      default_factory=lambda: initializers.random_uniform(0.5))
  placement: str = "prefix"
  name: str = "prompt_tuning"
  trainable_pattern: str = r"^prompt/"

  def __post_init__(self):
    if self.placement not in _PLACEMENTS:
      raise ValueError(f"unknown prompt placement {self.placement!r}; choose from {sorted(_PLACEMENTS)}")
    if self.length <= 0:
      raise ValueError(f"prompt length must be positive, got {self.length}")

  def init(self, rng: jax.Array, backbone_params: Params) -> Params:
    embedding = backbone_params["token_embedder"]["embedding"]
    prompt = self.initializer(rng, embedding, (self.length, embedding.shape[1]))
    return {"prompt": {"prompt": prompt}}

  def logical_axes(self) -> Params:
    return {"prompt": {"prompt": PartitionSpec("prompt_length", "prompt_embed")}}

  def apply(self, params: Params, embeds: Array, mask: Array,
            task_ids: Array | None = None) -> tuple[Array, Array]:
    del task_ids
    prompt = broadcast_rows(params["prompt"]["prompt"], embeds.shape[0], embeds.dtype)
    return _PLACEMENTS[self.placement](prompt, embeds, mask)
