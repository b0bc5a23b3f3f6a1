"""The pure train and eval steps.

`train_step(state, frozen, batch, rng, *, spec)` differentiates only `state.params` (the
trainable tree); `frozen` (the backbone, or whatever the trainable rule leaves out) is an
ordinary argument: no gradient buffers, no optimizer state, never donated. `make_train_step`
jits it once with explicit in/out shardings and donates only the train state.

Batches are SeqIO EncDecFeatureConverter dicts: `encoder_input_tokens [B, L]`,
`decoder_input_tokens [B, T]`, `decoder_target_tokens [B, T]`, `decoder_loss_weights [B, T]`,
optional `task_ids [B]`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ptuning import param_tree
from ptuning.checkpoints.train_state import TrainState
from ptuning.model.config import T5Config
from ptuning.prompts.method import PromptMethod, prompted_logits
from ptuning.prompts.mode_token import ModeToken
from ptuning.train import losses

Array = jax.Array
Batch = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static about a step (hashable: it is closed over, never traced)."""

  model: T5Config
  method: PromptMethod | None
  optimizer: optax.GradientTransformation
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  loss_normalizing_factor: Any = None  # None | number | 'NUM_REAL_TARGET_TOKENS' | ...
  microbatches: int = 1
  # UL2 mode token ids and position (ptuning/prompts/mode_token.py); the eval, decode and
  # scoring paths of ptuning/train/evaluation.py read it from here too.
  mode_token: ModeToken = ModeToken()


def loss_and_metrics(trainable: Any, frozen: Any, batch: Batch, rng: Array | None,
                     spec: StepSpec, factor: Any, weights: Array) -> tuple[Array, dict]:
  """Normalised loss of `batch` (a microbatch or the whole) and summed metrics."""
  params = param_tree.merge(trainable, frozen)
  logits = prompted_logits(spec.model, spec.method, params, batch["encoder_input_tokens"],
                           batch["decoder_input_tokens"], rng, batch.get("task_ids"),
                           spec.mode_token)
  targets = batch["decoder_target_tokens"]
  loss, z_loss, weight_sum = losses.compute_weighted_cross_entropy(
      logits, targets, weights, spec.label_smoothing, spec.z_loss, factor)
  correct = ((jnp.argmax(logits, -1) == targets) * weights).sum()
  return loss, {"loss": loss, "z_loss": z_loss, "weight_sum": weight_sum, "correct": correct}


def _split_microbatches(tree: Any, n: int) -> Any:
  """`[B, ...]` -> `[n, B // n, ...]`, microbatch i = rows i, i + n, i + 2n, ... (strided).

  A batch sharded over the data axis holds contiguous row blocks per device; strided
  microbatches take B / (n * data) rows from every device's block, so each microbatch stays
  spread over all devices without communication and per-device activation memory drops by n.
  (Contiguous microbatches would each live on a few devices: XLA then reshards or replicates
  them and the memory saving is lost.)
  """
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split into {n} microbatches")
    return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, tree)


def train_step(state: TrainState, frozen: Any, batch: Batch, rng: Array, *,
               spec: StepSpec) -> tuple[TrainState, dict]:
  """One optimizer update; gradients are summed over `spec.microbatches` before it."""
  factor, weights = losses.loss_normalizing_factor_and_weights(spec.loss_normalizing_factor, batch)
  rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.grad(loss_and_metrics, has_aux=True)

  if spec.microbatches == 1:
    grads, metrics = grad_fn(state.params, frozen, batch, rng, spec, factor, weights)
  else:
    micro = _split_microbatches((batch, weights), spec.microbatches)

    def accumulate(carry, inputs):
      (mb, mw), index = inputs
      g, m = grad_fn(state.params, frozen, mb, jax.random.fold_in(rng, index), spec, factor, mw)
      return jax.tree.map(jnp.add, carry, (g, m)), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    zero_metrics = {k: jnp.zeros((), jnp.float32)
                    for k in ("loss", "z_loss", "weight_sum", "correct")}
    (grads, metrics), _ = jax.lax.scan(accumulate, (zeros, zero_metrics),
                                       (micro, jnp.arange(spec.microbatches)))

  updates, opt_state = spec.optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, spec: StepSpec) -> dict:
  """Summed loss / accuracy metrics of a batch, deterministic (no dropout)."""
  factor, weights = losses.loss_normalizing_factor_and_weights(spec.loss_normalizing_factor, batch)
  _, metrics = loss_and_metrics(params, {}, batch, None, spec, factor, weights)
  return metrics


def make_train_step(spec: StepSpec, state_shardings: Any, frozen_shardings: Any,
                    batch_shardings: Any, replicated: Any):
  """`train_step` jitted once: explicit shardings, train state donated, frozen tree not."""
  return jax.jit(functools.partial(train_step, spec=spec),
                 in_shardings=(state_shardings, frozen_shardings, batch_shardings, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def init_train_state(trainable: Any, optimizer: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                    opt_state=optimizer.init(trainable))
