"""Deep prompts (P-tuning v2, Liu et al. 2022; prefix-style): a trainable prompt for the input of
every encoder layer, not just the embeddings. The prompts enter as hidden-state rows (as in
VPT-Deep) rather than as per-layer attention key/value prefixes; either way each layer has its own.

`apply` prepends the layer-0 prompt `deep[0] [P, E]` to the input embeddings (mask 1, exactly like
vanilla 'prefix' prompt tuning) and returns the per-layer prompts `[N, P, E]` for the encoder hook
(ptuning/model/t5.py), which acts on rows `[:P]` of layer i's input for every i = 0..N-1:

  mode='replace': layer i reads `deep[i]` in its prompt rows; what layer i-1 wrote there is
      discarded (only the last layer's prompt-row outputs reach the decoder). The hook receives
      `deep` itself, so layer 0's rows are `deep[0]` too (the embedding dropout does not touch them).
  mode='add' (residual deep prompts): layer 0 reads `deep[0]` (through the embedding dropout, as
      vanilla); layer i >= 1 reads `layer i-1's prompt-row output + deep[i]`. The hook receives
      `deep` with row 0 zeroed (`deep[0]` is already in the embeddings). `deep[1:]` starts at zero
      (without reparameterisation), so training starts exactly at vanilla prompt tuning.

Parameters (the whole tree is trainable, rule `^prompt/`), N = encoder layers, E = d_model:
  reparameterize=False: `prompt/deep [N, P, E]`                                 N*P*E
  reparameterize=True:  `prompt/embedding [P, E]` and an MLP (P-tuning v2 / prefix tuning's
      reparameterisation) `deep = tanh(emb @ W0 + b0) @ W1 + b1` reshaped to `[N, P, E]`:
      `prompt/mlp/dense_0/{kernel [E, H], bias [H]}`, `prompt/mlp/dense_1/{kernel [H, N*E],
      bias [N*E]}`                                                    P*E + E*H + H + H*N*E + N*E
  `fold(params)` computes the MLP once and returns `{'prompt': {'deep': [N, P, E]}}` for inference;
  `apply` accepts either tree.

N comes from the backbone in `init` (`encoder/layers_{i}`, or the leading axis of the scanned
`encoder/layers/...`) and from the parameter shapes afterwards, so the dataclass stays hashable.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ptuning.model.t5 import LAYER_PROMPT_MODES
from ptuning.prompts import initializers
from ptuning.prompts.method import Params, broadcast_rows

Array = jax.Array
_UNSCANNED_LAYER = re.compile(r"^layers_(\d+)$")


def num_encoder_layers(backbone_params: Params) -> int:
  """Encoder depth from a backbone tree, unscanned (`layers_{i}`) or scanned (`layers/...`)."""
  encoder = backbone_params["encoder"]
  if "layers" in encoder:
    return int(jax.tree.leaves(encoder["layers"])[0].shape[0])
  count = sum(1 for key in encoder if _UNSCANNED_LAYER.match(str(key)))
  if not count:
    raise ValueError(f"backbone has no encoder layers; encoder keys: {sorted(encoder)}")
  return count


@dataclasses.dataclass(frozen=True)
class DeepPrompt:
  """Per-layer encoder prompts of `length` rows; see the module docstring for the semantics."""

  length: int = 20
  mode: str = "replace"  # 'replace' | 'add'
  reparameterize: bool = False
  mlp_hidden: int = 512
  initializer: initializers.Initializer = dataclasses.field(
      default_factory=lambda: initializers.random_uniform(0.5))
  name: str = "deep_prompt"
  trainable_pattern: str = r"^prompt/"

  def __post_init__(self):
    if self.mode not in LAYER_PROMPT_MODES:
      raise ValueError(f"unknown deep prompt mode {self.mode!r}; choose from {LAYER_PROMPT_MODES}")
    if self.length <= 0:
      raise ValueError(f"prompt length must be positive, got {self.length}")
    if self.reparameterize and self.mlp_hidden <= 0:
      raise ValueError(f"mlp_hidden must be positive, got {self.mlp_hidden}")

  @property
  def layer_prompt_mode(self) -> str:
    """Read by `prompted_encode`: how the encoder applies the per-layer prompts."""
    return self.mode

  def num_params(self, num_layers: int, width: int) -> int:
    """Trainable parameter count for an encoder of `num_layers` x `width`."""
    n, p, e, h = num_layers, self.length, width, self.mlp_hidden
    if not self.reparameterize:
      return n * p * e
    return p * e + e * h + h + h * n * e + n * e

  def init(self, rng: jax.Array, backbone_params: Params) -> Params:
    embedding = backbone_params["token_embedder"]["embedding"]
    layers, width = num_encoder_layers(backbone_params), embedding.shape[1]
    rows = lambda key: self.initializer(key, embedding, (self.length, width))  # [P, E] f32
    if self.reparameterize:
      k_rows, k0, k1 = jax.random.split(rng, 3)
      dense = lambda key, fan_in, fan_out: {
          "kernel": jax.nn.initializers.lecun_normal()(key, (fan_in, fan_out), jnp.float32),
          "bias": jnp.zeros((fan_out,), jnp.float32)}
      return {"prompt": {"embedding": rows(k_rows),
                         "mlp": {"dense_0": dense(k0, width, self.mlp_hidden),
                                 "dense_1": dense(k1, self.mlp_hidden, layers * width)}}}
    if self.mode == "add":  # Layer 0's input prompt; zero deltas: starts as vanilla tuning.
      first = rows(rng)
      deep = jnp.concatenate([first[None], jnp.zeros((layers - 1,) + first.shape, first.dtype)])
    else:
      deep = jnp.stack([rows(jax.random.fold_in(rng, i)) for i in range(layers)])
    return {"prompt": {"deep": deep}}

  def logical_axes(self) -> Params:
    if self.reparameterize:
      dense = lambda: {"kernel": PartitionSpec(None, None), "bias": PartitionSpec(None)}
      return {"prompt": {"embedding": PartitionSpec("prompt_length", "prompt_embed"),
                         "mlp": {"dense_0": dense(), "dense_1": dense()}}}
    return {"prompt": {"deep": PartitionSpec("layers", "prompt_length", "prompt_embed")}}

  def layer_prompts(self, params: Params) -> Array:
    """The per-layer prompts `[N, P, E]` (float32) of a trained or folded tree."""
    prompt = params["prompt"]
    if "deep" in prompt:
      return prompt["deep"]
    embedding, mlp = prompt["embedding"], prompt["mlp"]
    dot = lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)  # tiny: full f32
    hidden = jnp.tanh(dot(embedding, mlp["dense_0"]["kernel"]) + mlp["dense_0"]["bias"])  # [P, H]
    out = dot(hidden, mlp["dense_1"]["kernel"]) + mlp["dense_1"]["bias"]  # [P, N*E]
    length, width = embedding.shape
    return out.reshape(length, out.shape[1] // width, width).transpose(1, 0, 2)

  def fold(self, params: Params) -> Params:
    """Folds the reparameterisation away: `params` with `prompt` = `{'deep': [N, P, E]}` only."""
    return {**params, "prompt": {"deep": self.layer_prompts(params)}}

  def apply(self, params: Params, embeds: Array, mask: Array, task_ids: Array | None = None
            ) -> tuple[Array, Array, Array]:
    """`embeds [B, L, E]`, `mask [B, L]` -> (`[B, P+L, E]`, `[B, P+L]`, layer prompts `[N, P, E]`)."""
    del task_ids
    deep = self.layer_prompts(params)
    first = broadcast_rows(deep[0], embeds.shape[0], embeds.dtype)
    embeds = jnp.concatenate([first, embeds], axis=1)
    mask = jnp.concatenate([jnp.ones(first.shape[:2], mask.dtype), mask], axis=1)
    if self.mode == "add":
      deep = jnp.concatenate([jnp.zeros_like(deep[:1]), deep[1:]])
    return embeds, mask, deep
