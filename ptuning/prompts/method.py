"""The seam every prompt method plugs into, and the prompted forward pass built on it.

The full parameter tree is `{'backbone': <frozen T5 params>, <method's own subtrees>}`; a method's
`trainable` regex picks what the optimizer updates (vanilla: `^prompt/`; full fine-tuning:
`^backbone/`). The trainer never knows which method it runs.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp

from ptuning.model.batch_broadcast import broadcast_batch
from ptuning.model.config import T5Config
from ptuning.model.t5 import EncoderDecoder, encoder_rows
from ptuning.prompts.mode_token import ModeToken, check_method, insert_rows

Array = jax.Array
Params = dict[str, Any]


class PromptMethod(Protocol):
  """A method: its trainable tree, how it changes the encoder inputs, and the trainable rule.

  A method may also set per-layer (deep) prompts: `apply` then returns a third element
  `layer_prompts [N, P, E] | [N, B, P, E]` (or None), and the optional attribute
  `layer_prompt_mode` ('replace', the default, or 'add') says how the encoder applies them to
  rows `[:P]` of every layer's input (see ptuning/model/t5.py).
  """

  name: str
  trainable_pattern: str  # regex over '/'-joined paths of the full tree

  def init(self, rng: jax.Array, backbone_params: Params) -> Params:
    """The method's subtrees (merged beside 'backbone' in the full tree)."""

  def logical_axes(self) -> Params:
    """Logical PartitionSpecs for the method's subtrees (same structure as `init`)."""

  def apply(self, params: Params, embeds: Array, mask: Array,
            task_ids: Array | None = None) -> tuple[Array, ...]:
    """`embeds [B, L, E]`, `mask [B, L]` -> (`[B, L', E]`, `[B, L']`[, layer prompts | None])
    fed to the encoder."""


def prompted_encode(cfg: T5Config, method: PromptMethod | None, params: Params, tokens: Array,
                    rng: jax.Array | None = None, task_ids: Array | None = None,
                    mode_token: ModeToken | None = None) -> tuple[Array, Array]:
  """`tokens [B, L]` -> (encoded `[B, L', E]`, encoder mask `[B, L']`) with the method applied.

  `mode_token` (ptuning/prompts/mode_token.py; None or no ids: none): its k ids are embedded
  with the backbone's token embedding `[B, k, E]` and inserted (mask 1) before the method's P
  prompt rows or between them and the inputs; deep prompts then act on rows `[k:k+P]` or `[:P]`.
  With `attention_impl='cudnn'` an odd L' gets one more, masked, row (`t5.encoder_rows`).
  """
  deterministic = rng is None
  model = EncoderDecoder(cfg, deterministic=deterministic)
  backbone = {"params": params["backbone"]}
  embeds = model.apply(backbone, tokens, method=EncoderDecoder.embed)
  mask = tokens > 0
  layer_prompts = None
  if method is not None:
    embeds, mask, *rest = method.apply(params, embeds, mask, task_ids)
    layer_prompts = rest[0] if rest else None
  offset = 0
  if mode_token is not None and mode_token.ids:
    check_method(method)
    ids = jnp.broadcast_to(jnp.asarray(mode_token.ids, tokens.dtype),
                           (tokens.shape[0], len(mode_token.ids)))
    mode_embeds = model.apply(backbone, ids, method=EncoderDecoder.embed)  # [B, k, E]
    prompt_rows = embeds.shape[1] - tokens.shape[1]
    at = 0 if mode_token.position == "before_prompt" else prompt_rows
    embeds, mask = insert_rows(embeds, mask, mode_embeds, at)
    offset = mode_token.layer_prompt_offset
  embeds, mask = encoder_rows(cfg, embeds, mask)  # 'cudnn': even lengths, once, not per layer
  mode = getattr(method, "layer_prompt_mode", "replace")
  rngs = None if deterministic else {"dropout": rng}
  encoded = model.apply(backbone, embeds, mask, layer_prompts, mode, offset,
                        method=EncoderDecoder.encode_embeddings, rngs=rngs)
  return encoded, mask


def prompted_logits(cfg: T5Config, method: PromptMethod | None, params: Params, tokens: Array,
                    decoder_input_tokens: Array, rng: jax.Array | None = None,
                    task_ids: Array | None = None, mode_token: ModeToken | None = None) -> Array:
  """Teacher-forced logits `[B, T, V]` (float32) of the prompted model (`mode_token`: see
  `prompted_encode`)."""
  deterministic = rng is None
  enc_rng, dec_rng = (None, None) if deterministic else jax.random.split(rng)
  encoded, mask = prompted_encode(cfg, method, params, tokens, enc_rng, task_ids, mode_token)
  model = EncoderDecoder(cfg, deterministic=deterministic)
  rngs = None if deterministic else {"dropout": dec_rng}
  return model.apply({"params": params["backbone"]}, encoded, mask, decoder_input_tokens,
                     method=EncoderDecoder.decode_logits, rngs=rngs)


def broadcast_rows(rows: Array, batch: int, dtype) -> Array:
  """`[P, E]` -> `[batch, P, E]` in `dtype`; the gradient's batch sum is a matmul (see
  `ptuning.model.batch_broadcast`)."""
  return broadcast_batch(rows.astype(dtype), batch)
