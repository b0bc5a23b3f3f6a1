"""Optimizers and schedules: prompt-tuning Adafactor defaults against a hand-written update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ptuning.train import optim


def _adafactor_reference(param, grads, lr=0.3, decay_rate=0.8, clip=1.0, wd=1e-5, eps=1e-30):
  """T5X Adafactor, unfactored, no parameter scale, no momentum, written out in numpy."""
  param = param.astype(np.float64)
  v = np.zeros_like(param)
  for step, g in enumerate(grads):  # step is 0-based, as T5X's state.step
    g = g.astype(np.float64)
    beta2 = 1.0 - (step + 1.0) ** -decay_rate
    v = beta2 * v + (1.0 - beta2) * (g * g + eps)
    y = g / np.sqrt(v)
    y = y / max(1.0, np.sqrt(np.mean(y * y)) / clip)
    param = (1.0 - wd) * param - lr * y
  return param


def _run(tx, param, grads):
  state = tx.init(param)
  for g in grads:
    updates, state = tx.update(g, state, param)
    param = optax.apply_updates(param, updates)
  return param, state


def test_adafactor_defaults_match_reference_update():
  rng = np.random.default_rng(0)
  param = rng.uniform(-0.5, 0.5, (100, 768)).astype(np.float32)
  g1 = rng.normal(size=(100, 768)).astype(np.float32)
  # Second gradient larger and uneven, so that the update RMS exceeds 1 and clipping acts.
  g2 = (g1 * rng.uniform(0.5, 4.0, size=g1.shape)).astype(np.float32)
  tx = optim.make_optimizer()

  one, state = _run(tx, jnp.asarray(param), [jnp.asarray(g1)])
  np.testing.assert_allclose(one, _adafactor_reference(param, [g1]), rtol=1e-6, atol=1e-6)
  # The prompt is not factored: a full second-moment accumulator of the prompt's shape.
  assert state[0].v.shape == (100, 768)
  # Step 1 moves every entry by ~lr (sign update) plus the 1e-5 decay.
  np.testing.assert_allclose(np.abs(np.asarray(one) - param * (1 - 1e-5)), 0.3, rtol=1e-5)

  two, _ = _run(tx, jnp.asarray(param), [jnp.asarray(g1), jnp.asarray(g2)])
  beta2 = 1 - 2.0 ** -0.8
  y2 = g2 / np.sqrt(beta2 * g1 ** 2 + (1 - beta2) * g2 ** 2)
  assert np.sqrt(np.mean(y2 ** 2)) > 1.1  # clipping is active on step 2
  np.testing.assert_allclose(two, _adafactor_reference(param, [g1, g2]), rtol=1e-5, atol=1e-5)
  # Without clipping or decay the result differs: both are really exercised.
  unclipped = _adafactor_reference(param, [g1, g2], clip=np.inf)
  assert np.abs(np.asarray(two) - unclipped).max() > 1e-2
  no_decay, _ = _run(optim.make_optimizer(weight_decay=0.0), jnp.asarray(param),
                     [jnp.asarray(g1)])
  np.testing.assert_allclose(np.asarray(one) - no_decay, -1e-5 * param, atol=1e-7)


def test_adafactor_factors_large_matrices_and_takes_overrides():
  params = {"big": jnp.zeros((256, 512)), "prompt": jnp.zeros((100, 768))}
  state = optim.make_optimizer().init(params)
  assert state[0].v_row["big"].shape == (256,) and state[0].v_col["big"].shape == (512,)
  assert state[0].v["prompt"].shape == (100, 768)
  state = optim.make_optimizer(factored=False).init(params)
  assert state[0].v["big"].shape == (256, 512)
  with pytest.raises(ValueError, match="weight_decay="):
    optim.make_optimizer(weight_decay_rate=0.1)


def test_schedule_as_learning_rate_and_global_norm_clip():
  schedule = optim.make_schedule("linear", 1.0, warmup_steps=2, total_steps=6)
  tx = optim.make_optimizer("sgd", schedule, grad_clip_norm=0.5)
  param = jnp.zeros((4,))
  state = tx.init(param)
  grad = jnp.full((4,), 10.0)  # norm 20, clipped to 0.5
  steps = []
  for _ in range(3):
    updates, state = tx.update(grad, state, param)
    steps.append(float(jnp.linalg.norm(updates)))
  np.testing.assert_allclose(steps, [0.0, 0.25, 0.5], atol=1e-6)


def test_adamw_and_sgd():
  param = jnp.ones((3,))
  grad = jnp.array([1.0, -2.0, 0.5])
  updates, _ = optim.make_optimizer("adamw", 0.1).update(
      grad, optim.make_optimizer("adamw", 0.1).init(param), param)
  # First Adam step is lr * sign(g) (bias-corrected), plus decoupled decay lr * 0.01 * param.
  np.testing.assert_allclose(updates, -0.1 * (np.sign(grad) + 0.01 * param), rtol=1e-5)
  tx = optim.make_optimizer("sgd", 0.1, momentum=0.9)
  _, state = _run(tx, param, [grad])
  updates, _ = tx.update(grad, state, param)
  np.testing.assert_allclose(updates, -0.1 * 1.9 * grad, rtol=1e-6)
  with pytest.raises(ValueError, match="b1"):
    optim.make_optimizer("adamw", momentum=0.9)


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(ValueError, match="adafactor.*adamw.*sgd"):
    optim.make_optimizer("lamb")
  with pytest.raises(ValueError, match="constant.*linear_warmup_rsqrt.*cosine"):
    optim.make_schedule("step")
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule("cosine", 0.1, warmup_steps=10)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_schedule("linear_warmup_rsqrt", 1.0)


def test_schedules():
  steps = jnp.array([0, 5, 10, 40, 100])
  np.testing.assert_allclose(optim.make_schedule()(steps), 0.3)
  np.testing.assert_allclose(optim.make_schedule("constant", 1.0, 10)(steps), [0, .5, 1, 1, 1])
  rsqrt = optim.make_schedule("linear_warmup_rsqrt", 1.0, warmup_steps=10)
  t5x = [min(1.0, s / 10) / np.sqrt(max(s, 10)) for s in [0, 5, 10, 40, 100]]
  np.testing.assert_allclose(rsqrt(steps), t5x, rtol=1e-6)
  normalized = optim.make_schedule("linear_warmup_rsqrt", 1.0, 10, normalized=True)
  np.testing.assert_allclose(normalized(steps), np.array(t5x) * np.sqrt(10), rtol=1e-6)
  cosine = optim.make_schedule("cosine", 1.0, warmup_steps=10, total_steps=100, end_value=0.1)
  expected = [0, .5, 1, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 30 / 90)), 0.1]
  np.testing.assert_allclose(cosine(steps), expected, rtol=1e-5, atol=1e-7)
  linear = optim.make_schedule("linear", 1.0, warmup_steps=0, total_steps=100)
  np.testing.assert_allclose(linear(steps), [1, .95, .9, .6, 0], atol=1e-6)


def test_multi_rate_labels_by_regex_and_applies_each_rate():
  params = {"prompt": {"prompt": jnp.ones((4, 8))},
            "lora": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 8))},
            "other": {"prompt_scale": jnp.ones((3,))}}
  labels = {r"^prompt/": "prompt", r"^lora/": "lowrank", r"prompt": "prompt"}
  tx = optim.multi_rate_optimizer(
      {"prompt": ("sgd", 0.3), "lowrank": ("sgd", 1e-3, {"momentum": 0.5})}, labels)
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(updates["prompt"]["prompt"], -0.3)
  np.testing.assert_allclose(updates["other"]["prompt_scale"], -0.3)  # third rule
  np.testing.assert_allclose(updates["lora"]["a"], -1e-3)
  np.testing.assert_allclose(updates["lora"]["b"], -1e-3)
  assert optim.path_labeler(labels)(params) == {
      "prompt": {"prompt": "prompt"}, "lora": {"a": "lowrank", "b": "lowrank"},
      "other": {"prompt_scale": "prompt"}}

  # First match wins: the catch-all listed first takes everything.
  first = optim.multi_rate_optimizer(
      {"slow": ("sgd", 0.01), "fast": ("sgd", 1.0)}, [(".*", "slow"), ("^prompt/", "fast")])
  updates, _ = first.update(grads, first.init(params), params)
  np.testing.assert_allclose(updates["prompt"]["prompt"], -0.01)


def test_multi_rate_errors_name_the_problem():
  params = {"prompt": {"prompt": jnp.ones((2, 2))}, "decoder": {"w": jnp.ones((2,))}}
  tx = optim.multi_rate_optimizer({"p": ("sgd", 0.1)}, {"^prompt/": "p"})
  with pytest.raises(ValueError, match="decoder/w"):
    tx.init(params)
  tx = optim.multi_rate_optimizer({"p": ("sgd", 0.1)}, {"^prompt/": "p", "w$": "frozen"})
  with pytest.raises(ValueError, match="frozen"):
    tx.init(params)
