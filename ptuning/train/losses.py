"""Token cross-entropy with T5X's conventions (`t5x/losses.py`): z-loss, label smoothing,
per-token weights, and the loss normalising factor.

With `label_smoothing=0`, `z_loss=0` and `'NUM_REAL_TARGET_TOKENS'` the loss is the mean NLL
over non-padding target tokens, i.e. PyTorch's `CrossEntropyLoss(ignore_index=pad)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LOSS_NORMALIZING_FACTORS = ("NUM_REAL_TARGET_TOKENS", "NUM_TOTAL_TARGET_TOKENS",
                            "AVERAGE_PER_SEQUENCE")

LossNormalizingFactor = float | int | str | None


def cross_entropy_with_logits(logits: jax.Array, targets: jax.Array,
                              z_loss: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Cross entropy against (soft) targets plus T5X's auxiliary z-loss.

  Args:
    logits: [B, T, V] float32.
    targets: [B, T, V] one-hot or soft targets (rows summing to 1).
    z_loss: coefficient of `log_z ** 2`, `log_z = logsumexp(logits)`.

  Returns:
    (loss [B, T], z_loss [B, T]) where `loss = -sum(targets * log_softmax(logits)) +
    z_loss * log_z**2` (equal to `log_z - sum(targets * logits)` + z-term when targets sum to
    1), and the second output is the z-term alone, for logging. The gradient is T5X's custom
    one: `(1 + 2 * z_loss * log_z) * softmax - targets` w.r.t. logits, from the first output
    only.
  """
  return _cross_entropy(logits, targets, jnp.asarray(z_loss, jnp.float32))


@jax.custom_vjp
def _cross_entropy(logits: jax.Array, targets: jax.Array,
                   z_loss: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy_with_logits` with a float32 array `z_loss` (its cotangent is zero)."""
  log_z = jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
  loss = -jnp.sum(targets * (logits - log_z), axis=-1)
  log_z = jnp.squeeze(log_z, axis=-1)
  total_z_loss = z_loss * jax.lax.square(log_z)
  return loss + total_z_loss, total_z_loss


def _cross_entropy_fwd(logits, targets, z_loss):
  max_logit = jnp.max(logits, axis=-1, keepdims=True)
  shifted = logits - max_logit
  exp_shifted = jnp.exp(shifted)
  sum_exp = jnp.sum(exp_shifted, axis=-1, keepdims=True)
  log_softmax = shifted - jnp.log(sum_exp)
  loss = -jnp.sum(targets * log_softmax, axis=-1)
  log_z = jnp.squeeze(jnp.log(sum_exp) + max_logit, axis=-1)
  total_z_loss = z_loss * jax.lax.square(log_z)
  residuals = (targets, z_loss, exp_shifted / sum_exp, log_softmax, log_z)
  return (loss + total_z_loss, total_z_loss), residuals


def _cross_entropy_bwd(residuals, g):
  targets, z_loss, softmax, log_softmax, log_z = residuals
  g = g[0]  # the z-loss output is for logging only (as in T5X)
  deriv = jnp.expand_dims(1.0 + 2.0 * z_loss * log_z, -1) * softmax - targets
  g_logits = jnp.expand_dims(g, -1) * deriv
  g_targets = -jnp.expand_dims(g, -1) * log_softmax
  return (g_logits.astype(softmax.dtype), g_targets.astype(targets.dtype),
          jnp.zeros_like(z_loss))


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def compute_weighted_cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None,
    label_smoothing: float = 0.0, z_loss: float = 1e-4,
    loss_normalizing_factor: float | jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """T5X's `compute_weighted_cross_entropy`.

  Args:
    logits: [B, T, V] float (computed in float32).
    targets: [B, T] int token ids.
    weights: [B, T] per-token weights, or None for all ones.
    label_smoothing: s; targets become `1 - s` on the label and `s / (V - 1)` elsewhere, and the
      smoothed targets' entropy is subtracted so that a perfect prediction has loss 0.
    z_loss: coefficient of the auxiliary `log_z ** 2` term (included in the total loss).
    loss_normalizing_factor: a number (or scalar array) to divide the summed losses by, or
      None for the plain sum; resolve T5X's special strings first with
      `loss_normalizing_factor_and_weights`.

  Returns:
    (total_loss, total_z_loss, weight_sum): scalars; the first two are weighted sums (divided
    by the factor), `weight_sum` is `sum(weights)` (`B * T` without weights).
  """
  if logits.ndim != targets.ndim + 1:
    raise ValueError(f"logits {logits.shape} must have one more axis than targets "
                     f"{targets.shape}")
  if isinstance(loss_normalizing_factor, str):
    raise ValueError(f"loss_normalizing_factor={loss_normalizing_factor!r}: resolve it with "
                     "loss_normalizing_factor_and_weights first")
  vocab_size = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low_confidence = (1.0 - confidence) / (vocab_size - 1)
  normalizing_constant = -(confidence * np.log(confidence) + (vocab_size - 1) * low_confidence
                           * np.log(low_confidence + 1e-20))
  soft_targets = jax.nn.one_hot(targets, vocab_size, dtype=jnp.float32)
  soft_targets = soft_targets * (confidence - low_confidence) + low_confidence
  total_loss, total_z_loss = cross_entropy_with_logits(
      logits.astype(jnp.float32), soft_targets, z_loss)
  total_loss = total_loss - normalizing_constant

  weight_sum = jnp.asarray(np.prod(targets.shape), jnp.float32)
  if weights is not None:
    total_loss = total_loss * weights
    total_z_loss = total_z_loss * weights
    weight_sum = jnp.sum(weights)
  if loss_normalizing_factor is not None:
    total_loss = total_loss / loss_normalizing_factor
    total_z_loss = total_z_loss / loss_normalizing_factor
  return jnp.sum(total_loss), jnp.sum(total_z_loss), weight_sum


def _sum_weights_per_segment(segment_ids: jax.Array, weights: jax.Array) -> jax.Array:
  """[B, T] sum of `weights` over each token's packed segment (same row, same segment id)."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, T]
  return jnp.einsum("bts,bs->bt", same.astype(weights.dtype), weights)


def loss_normalizing_factor_and_weights(
    factor: LossNormalizingFactor, batch: Mapping[str, Any]
) -> tuple[float | jax.Array | None, jax.Array]:
  """T5X's `get_loss_normalizing_factor_and_weights`: resolves `factor` and the token weights.

  Args:
    factor: None (sum of losses), a number (divide by it), or one of
      `LOSS_NORMALIZING_FACTORS` (case-insensitive):
      'NUM_REAL_TARGET_TOKENS' -> sum of the weights;
      'NUM_TOTAL_TARGET_TOKENS' -> B * T;
      'AVERAGE_PER_SEQUENCE' -> weights rescaled so that each sequence's (each packed segment's,
      with `decoder_segment_ids`) weights sum to 1, factor = their sum = number of sequences
      with any weight; every sequence then counts equally whatever its length.
    batch: `decoder_target_tokens` [B, T] int; optional `decoder_loss_weights` [B, T]
      (default `decoder_target_tokens > 0`) and `decoder_segment_ids` [B, T].

  Returns:
    (factor for `compute_weighted_cross_entropy`, weights [B, T] float32).

  Unlike T5X, which returns `batch.get('decoder_loss_weights')` (possibly None, i.e. padding
  counted) for a None or numeric factor, the weights here always default to non-padding.
  """
  targets = batch["decoder_target_tokens"]
  weights = batch.get("decoder_loss_weights")
  weights = jnp.asarray(targets > 0 if weights is None else weights, jnp.float32)
  if not isinstance(factor, str):  # None or a number: used as given
    return factor, weights
  if factor.upper() not in LOSS_NORMALIZING_FACTORS:
    raise ValueError(f"loss_normalizing_factor={factor!r}; expected None, a number or one of "
                     f"{LOSS_NORMALIZING_FACTORS}")
  factor = factor.upper()
  if factor == "NUM_REAL_TARGET_TOKENS":
    return jnp.sum(weights), weights
  if factor == "NUM_TOTAL_TARGET_TOKENS":
    return float(np.prod(targets.shape)), weights
  if "decoder_segment_ids" in batch:
    norm = _sum_weights_per_segment(jnp.asarray(batch["decoder_segment_ids"]), weights)
  else:
    norm = jnp.sum(weights, axis=-1, keepdims=True)
  weights = jnp.where(norm > 0, weights / jnp.where(norm > 0, norm, 1.0), 0.0)
  return jnp.sum(weights), weights
