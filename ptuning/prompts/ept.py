"""EPT: Efficient Prompt Tuning by multi-space projection and prompt fusion (Lan et al., AAAI 2025).

No public code exists; this is the formulation implemented here, in the paper's terms
(decomposition as DePT, ptuning/prompts/dept.py; fusion and projection are our concrete choice):

  Decomposition. Short prompt `P_s [m, d]`, low-rank pair `A [s, r]`, `B [r, d]`:
      Delta = (alpha / sqrt(r)) * A @ B                       [s, d]  the low-rank update rows
      E'    = E + Delta[:L]                                   [L, d]  frozen input embeddings E

  Prompt fusion (`fusion=True`). The short prompt attends over the update rows, which carry the
  knowledge the decomposition moved out of the prompt; the result enriches the prompt residually:
      P_f = P_s + softmax(P_s Delta^T / sqrt(d)) Delta         [m, d]  (P_f = P_s when off)
  Parameter-free. All s rows take part (not only the first L), so the prompt depends on the
  parameters only, never on the batch's padded length. At init B = 0, so Delta = 0 and P_f = P_s.

  Multi-space projection with a gating network (`num_spaces=K > 0`, `space_width=k`). K linear
  bottleneck projections `W_down^i [d, k]`, `W_up^i [k, d]` map the prompt into K subspaces; a
  row-wise gate `W_g [d, K]` mixes them, added residually:
      G = softmax(P_f W_g)                                     [m, K]  (per prompt token)
      P = P_f + sum_i G[:, i] * (P_f W_down^i W_up^i)          [m, d]
  `W_down` ~ U(-1/sqrt(d), 1/sqrt(d)) (torch's Linear default), `W_up` = 0, `W_g` = 0 (uniform
  gates), so P = P_s at init: EPT starts exactly where DePT starts.

  Input to the encoder: X = [P ; E'] (vanilla placement, prefix by default).

Trainable tree (all under `prompt/`): `prompt [m, d]`, `lowrank_a [s, r]`, `lowrank_b [r, d]`,
`proj_down [K, d, k]`, `proj_up [K, k, d]`, `gate [d, K]`. Count:
    m*d + s*r + r*d + 2*K*d*k + d*K
(r = 0 drops the low-rank pair and fusion; K = 0 drops projections and gate). Defaults m=40,
r=30, s=256, K=4, k=2 on T5-base (d=768): 30,720 + 7,680 + 23,040 + 12,288 + 3,072 = 76,800,
the budget of a 100-token prompt (and of DePT's defaults).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ptuning.prompts import initializers
from ptuning.prompts.dept import (add_lowrank_rows, check_lowrank_config, init_lowrank,
                                  lowrank_axes, lowrank_rows)
from ptuning.prompts.method import Params
from ptuning.prompts.vanilla import PromptTuning

Array = jax.Array


def fuse(prompt: Array, rows: Array) -> Array:
  """`P_s [m, d]`, `Delta [s, d]` -> `P_s + softmax(P_s Delta^T / sqrt(d)) Delta` `[m, d]`."""
  scores = prompt @ rows.T / math.sqrt(prompt.shape[-1])  # [m, s]
  return prompt + jax.nn.softmax(scores, axis=-1) @ rows


def project(prompt: Array, down: Array, up: Array, gate: Array) -> Array:
  """`P_f [m, d]`, `down [K, d, k]`, `up [K, k, d]`, `gate [d, K]` -> gated sum `[m, d]`."""
  spaces = jnp.einsum("md,kdw,kwe->kme", prompt, down, up)  # [K, m, d]
  weights = jax.nn.softmax(prompt @ gate, axis=-1)  # [m, K]
  return prompt + jnp.einsum("mk,kme->me", weights, spaces)


@dataclasses.dataclass(frozen=True)
class EPT:
  """DePT decomposition + prompt fusion + K-space projection with a gating network."""

  length: int = 40  # m
  rank: int = 30  # r
  max_length: int = 256  # s
  alpha: float = 8.0
  num_spaces: int = 4  # K (0: no projection)
  space_width: int = 2  # k
  fusion: bool = True
  initializer: initializers.Initializer = dataclasses.field(
      default_factory=lambda: initializers.random_uniform(0.5))
  placement: str = "prefix"
  name: str = "ept"
  trainable_pattern: str = r"^prompt/"

  def __post_init__(self):
    check_lowrank_config(self.rank, self.max_length, self.alpha)
    if self.num_spaces < 0 or (self.num_spaces > 0 and self.space_width <= 0):
      raise ValueError(f"EPT needs num_spaces >= 0 and, with spaces, space_width > 0; got "
                       f"num_spaces={self.num_spaces}, space_width={self.space_width}")
    _ = self.prompt_method  # validates length and placement

  @property
  def prompt_method(self) -> PromptTuning:
    return PromptTuning(length=self.length, initializer=self.initializer, placement=self.placement)

  def num_trainable(self, embed: int) -> int:
    """m*d + s*r + r*d + 2*K*d*k + d*K (terms dropped at r = 0 / K = 0)."""
    lowrank = self.max_length * self.rank + self.rank * embed if self.rank else 0
    spaces = 2 * self.num_spaces * embed * self.space_width + embed * self.num_spaces
    return self.length * embed + lowrank + spaces

  def init(self, rng: jax.Array, backbone_params: Params) -> Params:
    tree = self.prompt_method.init(rng, backbone_params)
    embed = backbone_params["token_embedder"]["embedding"].shape[1]
    tree["prompt"].update(
        init_lowrank(jax.random.fold_in(rng, 1), self.max_length, self.rank, embed))
    if self.num_spaces:
      k, w, bound = self.num_spaces, self.space_width, 1.0 / math.sqrt(embed)
      tree["prompt"].update(
          proj_down=jax.random.uniform(jax.random.fold_in(rng, 2), (k, embed, w), jnp.float32,
                                       -bound, bound),
          proj_up=jnp.zeros((k, w, embed), jnp.float32),
          gate=jnp.zeros((embed, k), jnp.float32))
    return tree

  def logical_axes(self) -> Params:
    axes = self.prompt_method.logical_axes()
    axes["prompt"].update(lowrank_axes(self.rank))
    if self.num_spaces:
      axes["prompt"].update(proj_down=PartitionSpec(None, "prompt_embed", "rank"),
                            proj_up=PartitionSpec(None, "rank", "prompt_embed"),
                            gate=PartitionSpec("prompt_embed", None))
    return axes

  def prompt_rows(self, prompt_params: Params, rows: Array | None = None) -> Array:
    """The prompt fed to the encoder, `P [m, d]` float32; `rows` = Delta `[s, d]` if known."""
    prompt = prompt_params["prompt"].astype(jnp.float32)
    if self.fusion and self.rank:
      if rows is None:
        rows = lowrank_rows(prompt_params, self.alpha, self.rank)
      prompt = fuse(prompt, rows)
    if self.num_spaces:
      prompt = project(prompt, *(prompt_params[k].astype(jnp.float32)
                                 for k in ("proj_down", "proj_up", "gate")))
    return prompt

  def apply(self, params: Params, embeds: Array, mask: Array,
            task_ids: Array | None = None) -> tuple[Array, Array]:
    """`embeds [B, L, E]`, `mask [B, L]` -> `[B, m + L, E]`, `[B, m + L]`."""
    rows = None
    if self.rank:
      rows = lowrank_rows(params["prompt"], self.alpha, self.rank)
      embeds = add_lowrank_rows(embeds, rows, self.name)
    prompt = self.prompt_rows(params["prompt"], rows)
    return self.prompt_method.apply({"prompt": {"prompt": prompt}}, embeds, mask, task_ids)
