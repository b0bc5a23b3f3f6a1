"""DePT: Decomposed Prompt Tuning (Shi & Lipani, ICLR 2024; github.com/ZhengxiangShi/DePT).

A `[l, d]` soft prompt is decomposed into a shorter prompt `P_s [m, d]` and a low-rank pair
`A [s, r]`, `B [r, d]` whose product updates the frozen input embeddings position-wise:

    E' = E + (alpha / sqrt(r)) * A[:L] @ B        E: the input embeddings `[L, d]`, L <= s
    X  = [P_s ; E']                                (prefix, as vanilla prompt tuning)

Rows of `A` beyond the input length are unused for that batch (the reference pads every input
to s = max_length, so there all rows are used); inputs longer than s are an error at trace time.
As in the reference: `A` is kaiming-uniform with a = sqrt(5) (torch's default on a `[s, r]`
tensor, i.e. U(-1/sqrt(r), 1/sqrt(r))), `B` is zeros (so E' = E at init), alpha = 8, and the
update is added at padded positions too (they are masked out of attention, so it is invisible).

Parameter count: m*d + s*r + r*d. Defaults m=60, r=30, s=256 on T5-base (d=768):
46,080 + 7,680 + 23,040 = 76,800, the size of a 100-token prompt.

Rank 0 leaves `A` and `B` out of the tree: DePT is then exactly vanilla prompt tuning of length
m (same tree, same initial prompt for the same rng, same forward pass).

The paper trains the two parts with two learning rates (prompt 3e-1, low-rank 1e-4 by
default; gin_configs/methods/dept.gin binds them through `TrainConfig.group_learning_rates`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ptuning.prompts import initializers
from ptuning.prompts.method import Params, broadcast_rows
from ptuning.prompts.vanilla import PromptTuning

Array = jax.Array


def kaiming_uniform_a(rng: jax.Array, shape: tuple[int, int]) -> Array:
  """torch's `kaiming_uniform_(a=sqrt(5))` of an `[s, r]` tensor (fan_in = r):
  U(-1/sqrt(r), 1/sqrt(r))."""
  bound = 1.0 / math.sqrt(shape[1])
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def lowrank_scale(alpha: float, rank: int) -> float:
  """DePT's `alpha / sqrt(r)` (0 at rank 0, as in the reference)."""
  return alpha / math.sqrt(rank) if rank else 0.0


def init_lowrank(rng: jax.Array, max_length: int, rank: int, embed: int) -> Params:
  """`{'lowrank_a': [s, r] kaiming-uniform, 'lowrank_b': [r, d] zeros}`; empty at rank 0."""
  if rank == 0:
    return {}
  return {"lowrank_a": kaiming_uniform_a(rng, (max_length, rank)),
          "lowrank_b": jnp.zeros((rank, embed), jnp.float32)}


def lowrank_axes(rank: int) -> Params:
  """Logical axes of `init_lowrank`'s leaves (replicated under the default rules)."""
  if rank == 0:
    return {}
  return {"lowrank_a": PartitionSpec("length", "rank"),
          "lowrank_b": PartitionSpec("rank", "prompt_embed")}


def lowrank_rows(prompt_params: Params, alpha: float, rank: int) -> Array:
  """The position-wise update `(alpha / sqrt(r)) * A @ B`: `[s, d]` float32 (rank > 0)."""
  a = prompt_params["lowrank_a"].astype(jnp.float32)
  b = prompt_params["lowrank_b"].astype(jnp.float32)
  return lowrank_scale(alpha, rank) * (a @ b)


def add_lowrank_rows(embeds: Array, rows: Array, method_name: str) -> Array:
  """`embeds [B, L, E] + rows[:L]` (rows `[s, E]`); L > s fails at trace time naming both."""
  length, max_length = embeds.shape[1], rows.shape[0]
  if length > max_length:
    raise ValueError(f"{method_name}: encoder inputs of length {length} are longer than the "
                     f"low-rank update's max_length s={max_length}; set max_length >= {length} "
                     "(gin: LOWRANK_MAX_LENGTH) or shorten TASK_FEATURE_LENGTHS['inputs']")
  rows = broadcast_rows(rows[:length], embeds.shape[0], jnp.float32)
  return (embeds.astype(jnp.float32) + rows).astype(embeds.dtype)


def check_lowrank_config(rank: int, max_length: int, alpha: float) -> None:
  if rank < 0:
    raise ValueError(f"low-rank rank must be >= 0, got {rank}")
  if rank > 0 and max_length <= 0:
    raise ValueError(f"low-rank max_length must be positive, got {max_length}")
  if not math.isfinite(alpha):
    raise ValueError(f"low-rank alpha must be finite, got {alpha}")


@dataclasses.dataclass(frozen=True)
class DePT:
  """Short prompt `prompt/prompt [m, d]` + low-rank pair `prompt/lowrank_a [s, r]`,
  `prompt/lowrank_b [r, d]` added to the input embeddings."""

  length: int = 60  # m
  rank: int = 30  # r
  max_length: int = 256  # s: the longest encoder input the update covers
  alpha: float = 8.0
  initializer: initializers.Initializer = dataclasses.field(
      default_factory=lambda: initializers.random_uniform(0.5))
  placement: str = "prefix"
  name: str = "dept"
  trainable_pattern: str = r"^prompt/"

  def __post_init__(self):
    check_lowrank_config(self.rank, self.max_length, self.alpha)
    _ = self.prompt_method  # validates length and placement

  @property
  def prompt_method(self) -> PromptTuning:
    """The short prompt's vanilla method (init and placement are vanilla's)."""
    return PromptTuning(length=self.length, initializer=self.initializer, placement=self.placement)

  def num_trainable(self, embed: int) -> int:
    """m*d + s*r + r*d (r = 0: m*d)."""
    lowrank = self.max_length * self.rank + self.rank * embed if self.rank else 0
    return self.length * embed + lowrank

  def init(self, rng: jax.Array, backbone_params: Params) -> Params:
    tree = self.prompt_method.init(rng, backbone_params)  # same prompt as vanilla for this rng
    embed = backbone_params["token_embedder"]["embedding"].shape[1]
    tree["prompt"].update(
        init_lowrank(jax.random.fold_in(rng, 1), self.max_length, self.rank, embed))
    return tree

  def logical_axes(self) -> Params:
    axes = self.prompt_method.logical_axes()
    axes["prompt"].update(lowrank_axes(self.rank))
    return axes

  def apply(self, params: Params, embeds: Array, mask: Array,
            task_ids: Array | None = None) -> tuple[Array, Array]:
    """`embeds [B, L, E]`, `mask [B, L]` -> `[B, m + L, E]`, `[B, m + L]`."""
    if self.rank:
      rows = lowrank_rows(params["prompt"], self.alpha, self.rank)
      embeds = add_lowrank_rows(embeds, rows, self.name)
    return self.prompt_method.apply(params, embeds, mask, task_ids)
