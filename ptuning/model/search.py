"""Beam search and sampling over the KV cache of `ptuning.model.decoding`, plus a dispatcher.

All searches are pure, run one `lax.while_loop` over decoding steps, and are jitted with the
config, `max_decode_length`, `num_beams`, `length_penalty_style` and `eos_id` static.

Beam search reproduces transformers' `generate(num_beams=k, length_penalty=a,
early_stopping=False, do_sample=False)` (v5.24, `GenerationMixin._beam_search`), step for step:
  * each step takes the top `2k` of the `k * vocab` continuations of the running beams;
  * a candidate that ends in EOS (or reaches `max_decode_length`) is finished only if it ranks in
    the top `k` of those `2k`; its score is `sum_logprobs / penalty(len)` with `len` the number
    of generated tokens *including* the EOS and excluding the decoder start token
    (HF: `topk_log_probs / ((cur_len + 1 - decoder_prompt_len) ** length_penalty)`);
  * the best `k` unfinished candidates keep running (finished ones are pushed down by -1e9);
  * a batch row stops accepting hypotheses once all `k` finished slots are full and the best
    running beam, normalised at the *current* length, cannot beat the worst finished one
    (HF's `_check_early_stop_heuristic` for `early_stopping=False`); the loop ends when no row can
    improve or at `max_decode_length`, where every top-`k` running beam is finalised.
`length_penalty_style='t5x'` swaps `len ** alpha` for T5X's `((5 + len) / 6) ** alpha` (GNMT's
brevity penalty, `t5x.decoding.brevity_penalty`) in both places; the search rule stays HF's.

Cache layout: every cache leaf has the batch (here `batch * beams`, batch-major) on axis 0 except
the decoder's scalar `position`, so tiling and reordering beams is a `take` along axis 0.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ptuning.model.config import T5Config
from ptuning.model.decoding import (DECODER_START_ID, EOS_ID, decode_loop, decode_step, greedy_decode,
                                    init_cache)

Array = jax.Array
NEG_INF = -1.0e9  # HF's "very large negative" score for excluded beams (exact in float32)
LENGTH_PENALTY_STYLES = ("hf", "t5x")


def length_penalty_factor(length: Array, alpha: Array | float, style: str = "hf") -> Array:
  """Divisor of a finished hypothesis' summed log-prob: `len ** a` ('hf') or `((5+len)/6) ** a`."""
  length = jnp.asarray(length, jnp.float32)
  if style == "hf":
    return length ** alpha
  if style == "t5x":
    return ((5.0 + length) / 6.0) ** alpha
  raise ValueError(f"length_penalty_style={style!r}; expected one of {LENGTH_PENALTY_STYLES}")


def gather_beams(x: Array, indices: Array) -> Array:
  """`x [batch, beams, ...]`, `indices [batch, k]` -> `x[b, indices[b, j], ...]` `[batch, k, ...]`."""
  indices = indices.reshape(indices.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, indices, axis=1)


def reorder_cache(cache: Any, flat_indices: Array) -> Any:
  """Selects rows `flat_indices [batch * beams]` on axis 0 of every non-scalar cache leaf."""
  return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.take(x, flat_indices, axis=0), cache)


def tile_beams(tree: Any, num_beams: int) -> Any:
  """Repeats every non-scalar leaf `num_beams` times on axis 0: `[B, ...] -> [B * beams, ...]`."""
  return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, num_beams, axis=0), tree)


class BeamState(NamedTuple):
  """Loop carry; `k` = beams, `N` = max_decode_length, scores float32."""
  step: Array             # scalar int32: tokens generated so far
  running_tokens: Array   # [batch, k, N] open hypotheses (0 beyond `step`)
  running_scores: Array   # [batch, k] summed log-probs, best first
  finished_tokens: Array  # [batch, k, N] best finished hypotheses (0 after EOS)
  finished_scores: Array  # [batch, k] length-normalised, best first; NEG_INF when empty
  finished_flags: Array   # [batch, k] bool: slot holds a finished hypothesis
  improvable: Array       # [batch] bool: the row still accepts new finished hypotheses
  cache: Any              # decoding cache with `batch * k` rows


def _previous_tokens(state: BeamState) -> Array:
  """Decoder input of this step, `[batch * k]`: the start token, then each beam's last token."""
  last = jax.lax.dynamic_index_in_dim(state.running_tokens, jnp.maximum(state.step - 1, 0), axis=2,
                                      keepdims=False)
  return jnp.where(state.step > 0, last, DECODER_START_ID).reshape(-1)


def _update_finished(state: BeamState, cand_tokens: Array, cand_scores: Array, just_finished: Array,
                     penalty: Array, num_beams: int) -> tuple[Array, Array, Array]:
  """Merges the `[batch, 2k]` candidates that just finished into the best-`k` finished set."""
  scores = cand_scores / penalty
  scores = scores + (~state.improvable[:, None]).astype(jnp.float32) * NEG_INF
  scores = scores + (~just_finished).astype(jnp.float32) * NEG_INF
  merged_scores = jnp.concatenate([state.finished_scores, scores], axis=1)
  _, best = jax.lax.top_k(merged_scores, num_beams)
  tokens = gather_beams(jnp.concatenate([state.finished_tokens, cand_tokens], axis=1), best)
  flags = gather_beams(jnp.concatenate([state.finished_flags, just_finished], axis=1), best)
  return tokens, gather_beams(merged_scores, best), flags


def _beam_step(cfg: T5Config, params: Any, encoded: Array, encoder_mask: Array, num_beams: int,
               max_decode_length: int, alpha: Array, style: str, eos_id: int,
               state: BeamState) -> BeamState:
  """One step of HF-style beam search; `encoded`/`encoder_mask` already tiled to `batch * k`."""
  batch, step = state.running_scores.shape[0], state.step
  logits, cache = decode_step(cfg, params, state.cache, encoded, encoder_mask,
                              _previous_tokens(state), max_decode_length)
  vocab = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, num_beams, vocab)
  log_probs = (log_probs + state.running_scores[..., None]).reshape(batch, num_beams * vocab)
  cand_scores, cand_index = jax.lax.top_k(log_probs, 2 * num_beams)   # [batch, 2k]
  cand_parent, cand_token = cand_index // vocab, (cand_index % vocab).astype(jnp.int32)
  cand_tokens = gather_beams(state.running_tokens, cand_parent).at[:, :, step].set(cand_token)
  hits = (cand_token == eos_id) | (step + 1 >= max_decode_length)

  running_scores, keep = jax.lax.top_k(cand_scores + hits.astype(jnp.float32) * NEG_INF, num_beams)
  parent = gather_beams(cand_parent, keep)                            # [batch, k]
  cache = reorder_cache(cache, (jnp.arange(batch)[:, None] * num_beams + parent).reshape(-1))

  penalty = length_penalty_factor(step + 1, alpha, style)
  just_finished = hits & (jnp.arange(2 * num_beams) < num_beams)[None, :]
  finished_tokens, finished_scores, finished_flags = _update_finished(
      state, cand_tokens, cand_scores, just_finished, penalty, num_beams)

  best_running = running_scores[:, :1] / penalty
  worst_finished = jnp.where(finished_flags, finished_scores.min(axis=1, keepdims=True), NEG_INF)
  improvable = state.improvable & jnp.any(best_running > worst_finished, axis=1)
  return BeamState(step + 1, gather_beams(cand_tokens, keep), running_scores, finished_tokens,
                   finished_scores, finished_flags, improvable, cache)


@functools.partial(jax.jit, static_argnames=("cfg", "max_decode_length", "num_beams",
                                             "length_penalty_style", "eos_id"))
def beam_search(cfg: T5Config, params: Any, encoded: Array, encoder_mask: Array,
                max_decode_length: int, num_beams: int = 4, length_penalty: float = 1.0,
                eos_id: int = EOS_ID, length_penalty_style: str = "hf") -> tuple[Array, Array]:
  """Beam search as HF `generate(num_beams, length_penalty, early_stopping=False)`.

  `encoded [B, L, E]`, `encoder_mask [B, L]` -> (tokens `[B, num_beams, max_decode_length]`
  int32, 0 after EOS; scores `[B, num_beams]` = summed log-prob / length penalty), best first.
  `length_penalty` (alpha) may be traced; > 0 favours longer outputs.
  """
  length_penalty_factor(1, 1.0, length_penalty_style)  # validates the style
  batch, k, n = encoded.shape[0], num_beams, max_decode_length
  cache = tile_beams(init_cache(cfg, params, encoded, encoder_mask, n), k)
  encoded, encoder_mask = tile_beams((encoded, encoder_mask), k)
  state = BeamState(
      step=jnp.int32(0), running_tokens=jnp.zeros((batch, k, n), jnp.int32),
      running_scores=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF), (batch, 1)),
      finished_tokens=jnp.zeros((batch, k, n), jnp.int32),
      finished_scores=jnp.full((batch, k), NEG_INF, jnp.float32),
      finished_flags=jnp.zeros((batch, k), bool), improvable=jnp.ones((batch,), bool), cache=cache)
  alpha = jnp.asarray(length_penalty, jnp.float32)
  body = functools.partial(_beam_step, cfg, params, encoded, encoder_mask, k, n, alpha,
                           length_penalty_style, eos_id)
  cond = lambda s: (s.step < n) & jnp.any(s.improvable)
  state = jax.lax.while_loop(cond, body, state)
  return state.finished_tokens, state.finished_scores


def top_k_filter(logits: Array, top_k: int) -> Array:
  """`logits [..., V]` with all but the `top_k` largest set to -inf (ties with the k-th kept).

  `top_k <= 0` (or >= V) keeps everything.
  """
  if top_k <= 0 or top_k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits: Array, top_p: Array | float) -> Array:
  """Nucleus filter on `logits [..., V]`: keeps the smallest set of most likely tokens whose total
  probability is >= `top_p`, plus every token tied with the least likely one kept; others -> -inf.

  A token (in descending order) is kept iff the mass strictly before it is < `top_p`, so at
  least one token always survives; `top_p >= 1` keeps everything.
  """
  sorted_logits = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  num_kept = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
  return jnp.where((logits >= threshold) | (top_p >= 1.0), logits, -jnp.inf)


def sample_logits(rng: Array, logits: Array, temperature: Array | float = 1.0, top_k: int = 0,
                  top_p: Array | float = 1.0) -> Array:
  """Draws one token per row from `logits [B, V]` -> `[B]` int32 (temperature, top-k, top-p as in
  HF's warpers, in that order). `temperature <= 0` means greedy (argmax)."""
  safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
  filtered = top_p_filter(top_k_filter(logits / safe_temperature, top_k), top_p)
  sampled = jax.random.categorical(rng, filtered, axis=-1)
  return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_decode_length", "top_k", "eos_id"))
def sample(cfg: T5Config, params: Any, encoded: Array, encoder_mask: Array, max_decode_length: int,
           rng: Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           eos_id: int = EOS_ID) -> Array:
  """Ancestral sampling with the cache -> `[B, max_decode_length]` int32, 0 after each EOS.

  Step `t` draws with `fold_in(rng, t)`; the loop stops once every row has produced EOS.
  """
  choose = lambda step, logits: sample_logits(jax.random.fold_in(rng, step), logits, temperature,
                                             top_k, top_p)
  return decode_loop(cfg, params, encoded, encoder_mask, max_decode_length, choose, eos_id)


_greedy = jax.jit(greedy_decode, static_argnames=("cfg", "max_decode_length", "eos_id"))
DECODE_METHODS = ("greedy", "beam", "sample")


def decode(cfg: T5Config, params: Any, encoded: Array, encoder_mask: Array, max_decode_length: int,
           method: str = "greedy", **kwargs) -> Array:
  """Best decoded ids `[B, max_decode_length]` (0 after EOS) by 'greedy', 'beam' or 'sample'.

  `kwargs` go to the method: `eos_id`; beam: `num_beams`, `length_penalty`,
  `length_penalty_style`; sample: `rng` (required), `temperature`, `top_k`, `top_p`.
  """
  if method == "greedy":
    return _greedy(cfg, params, encoded, encoder_mask, max_decode_length, **kwargs)
  if method == "beam":
    return beam_search(cfg, params, encoded, encoder_mask, max_decode_length, **kwargs)[0][:, 0]
  if method == "sample":
    if "rng" not in kwargs:
      raise ValueError("method='sample' needs rng=jax.random.key(...)")
    return sample(cfg, params, encoded, encoder_mask, max_decode_length, **kwargs)
  raise ValueError(f"method={method!r}; expected one of {DECODE_METHODS}")
