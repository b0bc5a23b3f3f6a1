"""Scoring and cached autoregressive decoding over an encoded input.

All functions are pure and jit-friendly; the key/value cache is the Flax 'cache' collection of
`EncoderDecoder(cfg, decode=True, max_decode_length=N)`:
  `encoder_decoder_attention/cross_key|cross_value [B, L, heads, d_kv]` (projected once),
  `self_attention/cached_key|cached_value [B, N, heads, d_kv]`, `decoder/position` (scalar).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from ptuning.model.config import T5Config
from ptuning.model.t5 import EncoderDecoder

Array = jax.Array
EOS_ID = 1
DECODER_START_ID = 0


def shift_right(targets: Array, start_id: int = DECODER_START_ID) -> Array:
  """`[B, T]` targets -> decoder inputs `[B, T]`: start token, then targets without the last."""
  return jnp.concatenate([jnp.full_like(targets[:, :1], start_id), targets[:, :-1]], axis=1)


def token_log_likelihood(logits: Array, targets: Array) -> Array:
  """`logits [B, T, V]` f32, `targets [B, T]` -> log p(target_t) `[B, T]`; pad (0) targets -> 0."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  return jnp.where(targets > 0, picked, 0.0)


def sequence_log_likelihood(logits: Array, targets: Array) -> Array:
  """Summed log-probability of each target sequence `[B]` (the `score` of rank classification)."""
  return token_log_likelihood(logits, targets).sum(axis=-1)


def init_cache(cfg: T5Config, params: Any, encoded: Array, encoder_mask: Array,
               max_decode_length: int) -> Any:
  """Builds the decoding cache: zeroed self-attention caches, projected cross keys/values."""
  model = EncoderDecoder(cfg, decode=True, max_decode_length=max_decode_length)
  start = jnp.full((encoded.shape[0], 1), DECODER_START_ID, jnp.int32)
  _, variables = model.apply({"params": params}, encoded, encoder_mask, start,
                             method=EncoderDecoder.decode_logits, mutable=["cache"])
  return variables["cache"]


def decode_step(cfg: T5Config, params: Any, cache: Any, encoded: Array, encoder_mask: Array,
                tokens: Array, max_decode_length: int) -> tuple[Array, Any]:
  """One cached step: `tokens [B]` -> (next-token logits `[B, V]` f32, updated cache)."""
  model = EncoderDecoder(cfg, decode=True, max_decode_length=max_decode_length)
  logits, variables = model.apply({"params": params, "cache": cache}, encoded, encoder_mask,
                                  tokens[:, None], method=EncoderDecoder.decode_logits,
                                  mutable=["cache"])
  return logits[:, -1], variables["cache"]


def decode_loop(cfg: T5Config, params: Any, encoded: Array, encoder_mask: Array,
                max_decode_length: int, choose: Callable[[Array, Array], Array],
                eos_id: int = EOS_ID) -> Array:
  """Token-by-token decoding with the cache -> `[B, max_decode_length]` ids, 0 after each EOS.

  `choose(step, logits [B, V]) -> next ids [B]` picks each token (argmax, a sample, ...).
  Stops early once every sequence has produced EOS (a `lax.while_loop`).
  """
  batch = encoded.shape[0]
  cache = init_cache(cfg, params, encoded, encoder_mask, max_decode_length)
  output = jnp.zeros((batch, max_decode_length), jnp.int32)
  state = (jnp.int32(0), jnp.full((batch,), DECODER_START_ID, jnp.int32), cache, output,
           jnp.zeros((batch,), bool))

  def cond(state):
    step, _, _, _, done = state
    return (step < max_decode_length) & ~jnp.all(done)

  def body(state):
    step, tokens, cache, output, done = state
    logits, cache = decode_step(cfg, params, cache, encoded, encoder_mask, tokens, max_decode_length)
    next_tokens = jnp.where(done, 0, choose(step, logits).astype(jnp.int32))
    output = output.at[:, step].set(next_tokens)
    return step + 1, next_tokens, cache, output, done | (next_tokens == eos_id)

  return jax.lax.while_loop(cond, body, state)[3]


def greedy_decode(cfg: T5Config, params: Any, encoded: Array, encoder_mask: Array,
                  max_decode_length: int, eos_id: int = EOS_ID) -> Array:
  """Greedy decoding with the cache -> `[B, max_decode_length]` ids, 0 after each EOS."""
  return decode_loop(cfg, params, encoded, encoder_mask, max_decode_length,
                     lambda step, logits: jnp.argmax(logits, axis=-1), eos_id)
