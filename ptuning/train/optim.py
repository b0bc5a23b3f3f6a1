"""Learning-rate schedules and optimizers for the trainable tree (optax, plain arguments).

Defaults reproduce google-research/prompt-tuning (`configs/models/t5_1_1_prompt.gin` on top of
T5X's `adafactor.Adafactor`): constant LR 0.3, decay_rate 0.8, no parameter scaling, weight decay
1e-5, update clipping 1.0, no momentum.

Adafactor, optax vs T5X (`t5x/adafactor.py`, read side by side):
* Weight decay: T5X computes `new = (1 - wd) * param - lr * y`, i.e. the decay is *not*
  multiplied by the learning rate (unless `weight_decay_rate_lr_exponent` is set, which
  prompt-tuning does not). optax chains `add_decayed_weights(wd)` after the LR scaling and then
  `scale(-1)`, so `new = param - lr * y - wd * param`: identical. With momentum both average
  `lr * y` (T5X's `beta1`, optax's `ema(debias=False)`) before adding the decay: identical.
* Clipping: both clip the *normalised update* `y = g / sqrt(v)` of each leaf to RMS <= threshold
  (`y / max(1, rms(y) / threshold)`) before the LR, not the raw gradient: identical. T5X's
  optional `global_norm_clip_threshold` is `optax.clip_by_global_norm` on the raw gradients
  (`grad_clip_norm` here).
* Second moment: both use `beta2_t = 1 - (t + 1) ** -decay_rate` with t the 0-based step (so
  the first update uses `v = g**2 + 1e-30`), epsilon1 = 1e-30 inside the square: identical.
* Factoring: T5X in prompt-tuning factors by *logical axis rules*, and
  `prompt_tuning.train.optim.standard_logical_factor_rules` maps the 'prompt' axis to NONE, so
  the prompt is never factored. optax factors by shape (two largest dims >= 128). For a
  [100, d] prompt both are unfactored; for a prompt of length >= 128 optax factors it, so pass
  `factored=False` to match the reference exactly.
* Precision: T5X casts gradients to float32 and keeps float32 statistics; optax keeps the
  statistics in the parameter dtype. Identical for float32 trainable parameters.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "linear_warmup_rsqrt", "cosine", "linear")
OPTIMIZERS = ("adafactor", "adamw", "sgd")

# google-research/prompt-tuning's Adafactor (everything else is T5X's / optax's default).
PROMPT_TUNING_ADAFACTOR = dict(decay_rate=0.8, decay_offset=0, multiply_by_parameter_scale=False,
                               clipping_threshold=1.0, momentum=None, factored=True,
                               min_dim_size_to_factor=128, eps=1e-30)
PROMPT_TUNING_LEARNING_RATE = 0.3
PROMPT_TUNING_WEIGHT_DECAY = 1e-5
ADAMW_WEIGHT_DECAY = 0.01


def make_schedule(name: str = "constant", learning_rate: float = PROMPT_TUNING_LEARNING_RATE,
                  warmup_steps: int = 0, total_steps: int | None = None, *,
                  end_value: float = 0.0, normalized: bool = False) -> optax.Schedule:
  """Returns `step -> learning rate`, where step is the 0-based count of updates already applied.

  * 'constant': `learning_rate`, after an optional linear warmup `lr * step / warmup_steps`.
  * 'linear_warmup_rsqrt': T5X's `'constant * linear_warmup * rsqrt_decay'`,
    `lr * min(1, step / warmup) / sqrt(max(step, warmup))`; note the peak is
    `lr / sqrt(warmup_steps)` as in T5X. `normalized=True` is T5X's `rsqrt_normalized_decay`
    (multiplied by `sqrt(warmup_steps)`, so the peak is `lr`). Needs `warmup_steps >= 1`.
  * 'cosine': linear warmup to `lr`, then cosine decay to `end_value` at `total_steps`.
  * 'linear': linear warmup to `lr`, then linear decay to `end_value` at `total_steps`.
  """
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
  lr, warmup = float(learning_rate), int(warmup_steps)

  def warmup_factor(step: jax.Array) -> jax.Array:
    return jnp.minimum(1.0, step / warmup) if warmup else jnp.ones_like(step)

  if name == "constant":
    return lambda step: lr * warmup_factor(jnp.asarray(step, jnp.float32))

  if name == "linear_warmup_rsqrt":
    if warmup < 1:
      raise ValueError("'linear_warmup_rsqrt' needs warmup_steps >= 1 (T5X divides by it)")
    scale = lr * math.sqrt(warmup) if normalized else lr

    def rsqrt(step):
      step = jnp.asarray(step, jnp.float32)
      return scale * warmup_factor(step) / jnp.sqrt(jnp.maximum(step, warmup))
    return rsqrt

  if total_steps is None or total_steps <= warmup:
    raise ValueError(f"schedule {name!r} needs total_steps > warmup_steps; got "
                     f"total_steps={total_steps}, warmup_steps={warmup}")
  decay_steps = total_steps - warmup

  def decayed(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if name == "cosine":
      value = end_value + (lr - end_value) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    else:
      value = lr + (end_value - lr) * progress
    return jnp.where(step < warmup, lr * warmup_factor(step), value)
  return decayed


def make_optimizer(name: str = "adafactor",
                   learning_rate: float | optax.Schedule = PROMPT_TUNING_LEARNING_RATE, *,
                   weight_decay: float | None = None, grad_clip_norm: float | None = None,
                   momentum: float | None = None, **kwargs: Any) -> optax.GradientTransformation:
  """Builds one optax optimizer; `kwargs` go to the optax constructor and override defaults.

  * 'adafactor': `optax.adafactor` with the prompt-tuning defaults (`PROMPT_TUNING_ADAFACTOR`,
    weight decay 1e-5; see the module docstring for how it matches T5X). `momentum` is beta1.
  * 'adamw': `optax.adamw` (b1 0.9, b2 0.999, eps 1e-8, weight decay 0.01 unless given; decoupled
    decay multiplied by the LR, as optax does). Set betas with `b1=`/`b2=`, not `momentum`.
  * 'sgd': `optax.sgd` with optional `momentum` (and `nesterov=`). A `weight_decay` is L2 added
    to the gradient before momentum and LR (`g + wd * param`).

  `weight_decay=0.0` disables decay. `grad_clip_norm` clips the raw gradients of this
  optimizer's leaves to that global L2 norm first (T5X's `global_norm_clip_threshold`).
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
  if name == "adafactor":
    if "weight_decay_rate" in kwargs:
      raise ValueError("give Adafactor's decay as weight_decay=, not weight_decay_rate=")
    options = {**PROMPT_TUNING_ADAFACTOR, **kwargs}
    if momentum is not None:
      options["momentum"] = momentum
    decay = PROMPT_TUNING_WEIGHT_DECAY if weight_decay is None else weight_decay
    tx = optax.adafactor(learning_rate, weight_decay_rate=decay or None, **options)
  elif name == "adamw":
    if momentum is not None:
      raise ValueError("adamw has no `momentum`; set its first-moment decay with b1=")
    decay = ADAMW_WEIGHT_DECAY if weight_decay is None else weight_decay
    tx = optax.adamw(learning_rate, weight_decay=decay, **kwargs)
  else:
    tx = optax.sgd(learning_rate, momentum=momentum, **kwargs)
    if weight_decay:
      tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
  if grad_clip_norm is not None:
    tx = optax.chain(optax.clip_by_global_norm(grad_clip_norm), tx)
  return tx


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def tree_paths(tree: Any) -> Any:
  """A tree of the same structure whose leaves are their '/'-joined paths (as `param_tree`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "/".join(_key_name(k) for k in path), tree)


def path_labeler(patterns: Sequence[tuple[str, str]] | Mapping[str, str]
                 ) -> Callable[[Any], Any]:
  """Returns `tree -> tree of labels`: the label of the first regex (re.search) matching a
  leaf's '/'-joined path. An unmatched leaf raises a ValueError naming its path."""
  rules = [(re.compile(p), label) for p, label in
           (patterns.items() if isinstance(patterns, Mapping) else patterns)]

  def label(path: str) -> str:
    for regex, name in rules:
      if regex.search(path):
        return name
    raise ValueError(f"parameter {path!r} matches none of the optimizer label patterns "
                     f"{[r.pattern for r, _ in rules]}")

  return lambda tree: jax.tree.map(label, tree_paths(tree))


RuleSpec = (optax.GradientTransformation | tuple[str, Any] | tuple[str, Any, Mapping[str, Any]])


def multi_rate_optimizer(rules: Mapping[str, RuleSpec],
                         label_fn: Callable[[Any], Any] | Sequence[tuple[str, str]]
                         | Mapping[str, str]) -> optax.GradientTransformation:
  """One optimizer per label, e.g. DePT's prompt and low-rank pair at different rates.

  Args:
    rules: label -> `(optimizer_name, learning_rate)`, `(optimizer_name, learning_rate,
      kwargs_for_make_optimizer)`, or a ready `optax.GradientTransformation`.
    label_fn: `tree -> tree of labels`, or regex -> label pairs (a dict keeps its order; the
      first regex that matches a leaf's '/'-joined path wins; see `path_labeler`).

  Each label's optimizer sees only its leaves (its own clipping and step count).
  """
  transforms = {}
  for label, spec in rules.items():
    if isinstance(spec, optax.GradientTransformation):
      transforms[label] = spec
    else:
      opt_name, lr, *rest = spec
      transforms[label] = make_optimizer(opt_name, lr, **(dict(rest[0]) if rest else {}))
  labeler = label_fn if callable(label_fn) else path_labeler(label_fn)

  def checked_labels(tree: Any) -> Any:
    labels = labeler(tree)
    unknown = sorted(set(jax.tree.leaves(labels)) - set(transforms))
    if unknown:
      raise ValueError(f"labels {unknown} have no optimizer rule; rules exist for "
                       f"{sorted(transforms)}")
    return labels

  return optax.multi_transform(transforms, checked_labels)
