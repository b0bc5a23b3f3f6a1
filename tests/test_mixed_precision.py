"""bfloat16 activations: `mixed_einsum` keeps both passes bfloat16 x bfloat16 -> float32, float32
runs are untouched, and sharded bfloat16 prompt tuning / full fine-tuning steps train and agree
with float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import ad_checkpoint
from jax.extend import core as jax_core

from ptuning import param_tree, sharding
from ptuning.model import mixed_einsum
from ptuning.prompts.vanilla import PromptTuning
from ptuning.sharding import to_global_batch
from ptuning.train.experiment import TrainConfig, build_experiment
from test_train import LENGTHS, batches, tiny_config

BF16 = ("bfloat16", "bfloat16")
SPECS = {"abi,io->abo": ((2, 5, 8), (8, 6)), "bte,ve->btv": ((2, 3, 8), (11, 8)),
         "bqhd,bkhd->bhqk": ((2, 5, 3, 4), (2, 7, 3, 4))}


def _dot_operand_dtypes(jaxpr) -> list[tuple]:
  """(lhs dtype, rhs dtype, has batch dims) of every dot_general in `jaxpr`, nested ones included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (_, (lhs_batch, _)) = eqn.params["dimension_numbers"]
      found.append((str(eqn.invars[0].aval.dtype), str(eqn.invars[1].aval.dtype), bool(lhs_batch)))
    for sub in jax_core.jaxprs_in_params(eqn.params):
      found += _dot_operand_dtypes(sub)
  return found


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_float32_is_plain_einsum_bit_for_bit(spec):
  a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate(SPECS[spec]))
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
  ours = jax.value_and_grad(loss(lambda a, b: mixed_einsum.einsum(spec, a, b)), (0, 1))(a, b)
  plain = jax.value_and_grad(loss(lambda a, b: jnp.einsum(spec, a, b)), (0, 1))(a, b)
  for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_bfloat16_backward_is_bfloat16_products_close_to_float32(spec):
  a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate(SPECS[spec]))
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  loss = lambda a, b: jnp.sum(jnp.sin(mixed_einsum.einsum(spec, a, b, jnp.float32, a.dtype)))
  grads = jax.grad(loss, (0, 1))(a16, b16)
  reference = jax.grad(loss, (0, 1))(a16.astype(jnp.float32), b16.astype(jnp.float32))
  for g, r in zip(grads, reference):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), rtol=0.05, atol=0.05)
  # Forward and both backward products: bfloat16 operands, none float32 (autodiff of a plain
  # einsum with preferred_element_type=float32 gives float32 x bfloat16 products here).
  dtypes = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss, (0, 1)))(a16, b16).jaxpr)
  assert len(dtypes) == 3 and {d[:2] for d in dtypes} == {BF16}
  plain = lambda a, b: jnp.sum(jnp.sin(jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)))
  plain_dtypes = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(plain, (0, 1)))(a16, b16).jaxpr)
  assert any("float32" in d[:2] for d in plain_dtypes)  # what the module exists to avoid


def test_an_index_summed_on_its_own_is_refused():
  a = jnp.ones((2, 3), jnp.bfloat16)
  with pytest.raises(ValueError, match="summed on its own"):
    jax.grad(lambda a: jnp.sum(mixed_einsum.einsum("ij,jk->k", a, a.T)))(a)


@pytest.mark.parametrize("method", [PromptTuning(length=5), None], ids=["prompt", "full"])
def test_bfloat16_sharded_steps_train_like_float32(tmp_path, shared_data, method):
  """Three sharded steps in bfloat16 and in float32 from the same start: the first loss agrees to
  bfloat16 precision, the first update points the same way (cosine > 0.9), every loss is
  finite, and every projection (dot without batch dims) in the bfloat16 step,
  forward and backward, multiplies bfloat16 by bfloat16."""
  losses, jaxprs, first_update = {}, {}, {}
  for dtype in ("float32", "bfloat16"):
    (tmp_path / dtype).mkdir()
    config = tiny_config(tmp_path / dtype, shared_data, dtype=dtype, dropout_rate=0.0,
                         method=method, trainable_pattern=None if method else r"^backbone/",
                         mesh=sharding.MeshConfig(data=4, model=2))
    exp = build_experiment(config)
    state = exp.init_state()
    trainable_before = jax.tree.map(np.asarray, state.params)
    steps = [to_global_batch(b, exp.mesh) for b in batches(config, 3)]
    step = exp.train_step_fn(steps[0])
    jaxprs[dtype] = jax.make_jaxpr(step)(state, exp.frozen, steps[0], jax.random.key(0)).jaxpr
    losses[dtype] = []
    for i, batch in enumerate(steps):
      state, metrics = step(state, exp.frozen, batch, jax.random.key(0))
      losses[dtype].append(float(metrics["loss"]) / float(metrics["weight_sum"]))
      if i == 0:
        first_update[dtype] = np.concatenate([
            (np.asarray(a) - b).ravel() for a, b in
            zip(jax.tree.leaves(state.params), jax.tree.leaves(trainable_before))])
    moved = [not np.array_equal(np.asarray(a), b) for a, b in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(trainable_before))]
    assert any(moved) and all(np.isfinite(losses[dtype]))
    assert {str(x.dtype) for x in jax.tree.leaves(state.params)} == {"float32"}
  np.testing.assert_allclose(losses["bfloat16"][0], losses["float32"][0], rtol=0.02)
  a, b = first_update["bfloat16"], first_update["float32"]
  assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.9
  projections = [d for d in _dot_operand_dtypes(jaxprs["bfloat16"]) if not d[2]]
  assert projections and all(d[:2] == BF16 for d in projections), projections
  assert all(d[:2] == ("float32", "float32") for d in _dot_operand_dtypes(jaxprs["float32"]))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bfloat16_recomputed_attention_gradients_match_autodiff(dropout, monkeypatch):
  """The written-out bfloat16 backward of `recomputed_attention` (query, key, value and the
  broadcast bias, dropout mask included) against autodiff of the plain attention: XLA's path,
  which GPUs and TPUs run (on CPU the fused kernel takes bfloat16 too, in float32)."""
  from ptuning.model import cpu_attention
  from ptuning.model.layers import dot_product_attention, recomputed_attention
  monkeypatch.setattr(cpu_attention, "supports", lambda *args: False)
  keys = jax.random.split(jax.random.key(0), 6)
  q, k, v = (jax.random.normal(keys[i], (2, n, 3, 8)).astype(jnp.bfloat16)
             for i, n in enumerate((5, 7, 7)))
  bias = jax.random.normal(keys[3], (1, 3, 5, 7)) + jnp.where(
      jax.random.bernoulli(keys[4], 0.8, (2, 1, 1, 7)), 0.0, -1e9)
  rng = keys[5] if dropout else None
  cot = jax.random.normal(jax.random.key(9), (2, 5, 3, 8))
  loss = lambda f: lambda q, k, v, b: jnp.sum(f(q, k, v, b, rng, dropout, jnp.bfloat16) * cot)
  ours = jax.grad(loss(recomputed_attention), (0, 1, 2, 3))(q, k, v, bias)
  reference = jax.grad(loss(dot_product_attention), (0, 1, 2, 3))(q, k, v, bias)
  for name, g, r in zip("qkvb", ours, reference):
    assert g.dtype == r.dtype and g.shape == r.shape, name
    scale = float(jnp.max(jnp.abs(r.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                               atol=0.03 * scale, err_msg=name)
  jaxpr = jax.make_jaxpr(jax.grad(loss(recomputed_attention), (0, 1, 2)))(q, k, v, bias).jaxpr
  assert {d[:2] for d in _dot_operand_dtypes(jaxpr)} == {BF16}


def test_float32_operands_are_kept_for_the_backward_pass_not_their_bfloat16_casts(capsys):
  """A float32 (frozen) kernel used in bfloat16: the backward pass keeps the kernel itself
  (alive anyway) instead of a bfloat16 copy, and its gradient comes back float32."""
  x = jnp.ones((4, 8), jnp.bfloat16)
  w = jnp.ones((8, 16), jnp.float32)
  f = lambda x, w: jnp.sum(mixed_einsum.einsum("ab,bc->ac", x, w, jnp.float32, jnp.bfloat16))
  ad_checkpoint.print_saved_residuals(f, x, w)
  saved = capsys.readouterr().out
  assert "f32[8,16] from the argument w" in saved and "bf16[8,16]" not in saved, saved
  plain = lambda x, w: jnp.sum(jnp.einsum("ab,bc->ac", x, w.astype(jnp.bfloat16),
                                          preferred_element_type=jnp.float32))
  ad_checkpoint.print_saved_residuals(plain, x, w)
  assert "bf16[8,16]" in capsys.readouterr().out  # what a cast outside would keep
  grad_x, grad_w = jax.grad(f, (0, 1))(x, w)
  assert grad_x.dtype == jnp.bfloat16 and grad_w.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(grad_w), np.full((8, 16), 4.0, np.float32))
