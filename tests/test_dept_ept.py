"""DePT and EPT: parameter counts by formula, rank 0 == vanilla, an SGD step moves every
`prompt/` leaf by exactly -lr_group * grad (two learning rates) and never the backbone, and 30
steps lower the loss. The gin train -> resume -> infer round trips are in test_dept_ept_gin.py."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptuning import param_tree
from ptuning.prompts.dept import DePT
from ptuning.prompts.ept import EPT
from ptuning.prompts.vanilla import PromptTuning
from ptuning.sharding import to_global_batch
from ptuning.train import losses
from ptuning.train.experiment import build_experiment
from ptuning.train.step import loss_and_metrics
from test_train import LENGTHS, batches, tiny_config

T5_BASE_EMBED = 768


def _count(method, embed: int) -> tuple[int, dict]:
  backbone = {"token_embedder": {"embedding": jax.ShapeDtypeStruct((32128, embed), jnp.float32)}}
  shapes = param_tree.flatten(jax.eval_shape(method.init, jax.random.key(0), backbone))
  total = sum(int(np.prod(s.shape)) for s in shapes.values())
  return total, {k: s.shape for k, s in shapes.items()}


def test_trainable_parameter_counts_match_formulas():
  d = T5_BASE_EMBED
  total, shapes = _count(DePT(), d)
  m, r, s = 60, 30, 256
  print(f"DePT T5-base trainable: {total:,} = {m}*{d} + {s}*{r} + {r}*{d}; shapes {shapes}")
  assert total == m * d + s * r + r * d == 100 * d == 76_800 == DePT().num_trainable(d)
  assert _count(DePT(rank=0), d)[0] == 60 * d

  for method in (EPT(), EPT(fusion=False), EPT(num_spaces=3, space_width=8, length=7),
                 EPT(rank=0), EPT(num_spaces=0)):
    m, r, s = method.length, method.rank, method.max_length
    k, w = method.num_spaces, method.space_width
    formula = m * d + (s * r + r * d if r else 0) + 2 * k * d * w + d * k
    total, shapes = _count(method, d)
    print(f"EPT(m={m}, r={r}, s={s}, K={k}, k={w}, fusion={method.fusion}) trainable: {total:,} "
          f"= m*d + s*r + r*d + 2*K*d*k + d*K; shapes {shapes}")
    assert total == formula == method.num_trainable(d)
  assert _count(EPT(), d)[0] == 76_800  # the defaults keep the 100-token-prompt budget


def test_inputs_longer_than_the_lowrank_update_fail_naming_both_lengths():
  backbone = {"token_embedder": {"embedding": jnp.ones((50, 8))}}
  embeds, mask = jnp.ones((2, 12, 8)), jnp.ones((2, 12), bool)
  for method in (DePT(length=2, rank=2, max_length=10), EPT(length=2, rank=2, max_length=10)):
    params = method.init(jax.random.key(0), backbone)
    with pytest.raises(ValueError, match=r"length 12 .*max_length s=10"):
      jax.jit(method.apply)(params, embeds, mask)
  with pytest.raises(ValueError, match="rank must be >= 0"):
    DePT(rank=-1)


def _grads(exp, trainable, batch):
  """d loss / d trainable at `trainable` (deterministic: the tests use dropout 0)."""
  def grad(t, frozen, b):
    factor, weights = losses.loss_normalizing_factor_and_weights(
        exp.spec.loss_normalizing_factor, b)
    return jax.grad(loss_and_metrics, has_aux=True)(t, frozen, b, None, exp.spec, factor, weights)
  return jax.jit(grad)(trainable, exp.frozen, batch)


def test_dept_rank_zero_is_vanilla_prompt_tuning(tmp_path, shared_data):
  vanilla, rank0 = (build_experiment(tiny_config(tmp_path, shared_data, method=m, dropout_rate=0.0))
                    for m in (PromptTuning(length=5), DePT(length=5, rank=0)))
  assert set(param_tree.flatten(rank0.trainable_init)) == {"prompt/prompt"}
  np.testing.assert_array_equal(rank0.trainable_init["prompt"]["prompt"],
                                vanilla.trainable_init["prompt"]["prompt"])
  batch = to_global_batch(batches(vanilla.config, 1)[0], vanilla.mesh)
  (g_vanilla, m_vanilla), (g_rank0, m_rank0) = (_grads(e, e.trainable_init, batch)
                                                for e in (vanilla, rank0))
  print(f"rank-0 DePT loss {float(m_rank0['loss']):.6f}, vanilla {float(m_vanilla['loss']):.6f}")
  assert float(m_rank0["loss"]) == float(m_vanilla["loss"])
  np.testing.assert_array_equal(g_rank0["prompt"]["prompt"], g_vanilla["prompt"]["prompt"])


def test_dept_and_ept_start_as_vanilla_with_the_same_prompt():
  """B = 0 (and EPT's W_up = W_g = 0) at init: E' = E and P = P_s, bit for bit."""
  backbone = {"token_embedder": {"embedding": jax.random.normal(jax.random.key(1), (50, 8))}}
  embeds = jax.random.normal(jax.random.key(2), (2, 12, 8))
  mask = jnp.arange(12)[None, :] < jnp.array([[12], [7]])
  vanilla = PromptTuning(length=3)
  expected = vanilla.apply(vanilla.init(jax.random.key(0), backbone), embeds, mask)
  for method in (DePT(length=3, rank=4, max_length=16), EPT(length=3, rank=4, max_length=16),
                 EPT(length=3, rank=0, num_spaces=2)):
    params = method.init(jax.random.key(0), backbone)
    for got, want in zip(method.apply(params, embeds, mask), expected):
      np.testing.assert_array_equal(got, want, err_msg=str(method))


METHODS = {
    "dept": (DePT(length=5, rank=4, max_length=24),
             {"^prompt/lowrank_": 0.05}),
    "ept": (EPT(length=5, rank=4, max_length=24, num_spaces=3, space_width=4),
            {"^prompt/lowrank_": 0.05, "^prompt/(proj_|gate)": 0.02}),
}
PROMPT_LR = 0.3


def _lr(path: str, groups: dict) -> float:
  return next((lr for pattern, lr in groups.items() if re.search(pattern, path)), PROMPT_LR)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_sgd_steps_move_exactly_the_prompt_subtrees_at_their_own_rates(name, tmp_path, shared_data):
  method, groups = METHODS[name]
  config = tiny_config(tmp_path, shared_data, method=method, optimizer="sgd",
                       learning_rate=PROMPT_LR, group_learning_rates=groups, dropout_rate=0.0)
  exp = build_experiment(config)
  state = exp.init_state()
  local = batches(config, 4)
  batch = to_global_batch(local[0], exp.mesh)
  before = jax.tree.map(np.array, param_tree.flatten(state.params))
  backbone = jax.tree.map(np.array, param_tree.flatten(exp.frozen))  # host copies
  grads = param_tree.flatten(_grads(exp, state.params, batch)[0])
  step = exp.train_step_fn(batch)
  state, metrics = step(state, exp.frozen, batch, jax.random.key(0))
  run = [float(metrics["loss"])]
  after_one = jax.tree.map(np.array, param_tree.flatten(state.params))
  # SGD: each leaf moved by -lr * grad with its own group's learning rate.
  for path, value in after_one.items():
    lr = _lr(path, groups)
    np.testing.assert_allclose(value - before[path], -lr * np.asarray(grads[path]), rtol=1e-4,
                               atol=1e-7, err_msg=f"{path} (lr {lr})")
    print(f"{name} {path}: lr {lr}, |update| {np.abs(value - before[path]).max():.3g}")
  assert np.abs(after_one["prompt/lowrank_b"] - before["prompt/lowrank_b"]).max() > 0
  batch = to_global_batch(local[1], exp.mesh)
  state, metrics = step(state, exp.frozen, batch, jax.random.key(0))
  run.append(float(metrics["loss"]))
  after = param_tree.flatten(state.params)
  assert set(after) == set(before) and all(p.startswith("prompt/") for p in after)
  for path, value in after.items():  # two steps: even leaves whose first gradient is 0 moved
    assert not np.array_equal(np.asarray(value), before[path]), path
  if name == "dept":  # rows of A beyond the input length (16 of s = 24) are never used
    np.testing.assert_array_equal(np.asarray(after["prompt/lowrank_a"])[LENGTHS["inputs"]:],
                                  before["prompt/lowrank_a"][LENGTHS["inputs"]:])
  # A short run (30 steps in all) on the learnable yes/no task lowers the loss.
  for i in range(2, 30):
    batch = to_global_batch(local[i % len(local)], exp.mesh)
    state, metrics = step(state, exp.frozen, batch, jax.random.key(0))
    run.append(float(metrics["loss"]))
  first, last = np.mean(run[:4]), np.mean(run[-4:])  # the same four batches
  print(f"{name}: mean loss of steps 1-4 {first:.2f} -> steps 27-30 {last:.2f}")
  assert last < 0.9 * first
  assert step._cache_size() == 1
  # The backbone (the frozen tree, every leaf outside prompt/) is bit-identical after 30 steps.
  full = param_tree.flatten(exp.full_params(state))
  assert {p for p in full if not p.startswith("prompt/")} == set(backbone)
  assert all(p.startswith("backbone/") for p in backbone)
  for path, array in backbone.items():
    np.testing.assert_array_equal(np.asarray(full[path]), array, err_msg=path)
