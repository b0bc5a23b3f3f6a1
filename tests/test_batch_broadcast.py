"""`broadcast_batch`: rows shared by the batch whose gradient (the batch sum) is a matmul, so that
XLA's GPU layout assignment keeps the residual stream `[B, S, E]` (module docstring)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ptuning.model.batch_broadcast import SUM_ROWS, broadcast_batch
from ptuning.prompts.method import broadcast_rows


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradient_are_the_broadcast_and_the_batch_sum(dtype):
  rows = jax.random.normal(jax.random.key(0), (7, 16), jnp.float32).astype(dtype)
  cotangent = jax.random.normal(jax.random.key(1), (6, 7, 16), jnp.float32).astype(dtype)
  out, vjp = jax.vjp(lambda r: broadcast_batch(r, 6), rows)
  assert out.shape == (6, 7, 16) and out.dtype == dtype
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.broadcast_to(np.asarray(rows, np.float32), (6, 7, 16)))
  (grad,) = vjp(cotangent)
  assert grad.dtype == dtype
  expected = np.asarray(cotangent, np.float64).sum(axis=0)
  tolerance = 1e-6 if dtype == jnp.float32 else 1e-2  # bfloat16: one rounding of the f32 sum
  np.testing.assert_allclose(np.asarray(grad, np.float64), expected, rtol=tolerance,
                             atol=tolerance * np.abs(expected).max())


def test_prompt_gradient_is_the_rounded_batch_sum_also_sharded():
  """Through `broadcast_rows` (what every prompt method calls), float32 rows in, bfloat16 rows
  out: the gradient is the batch sum of the bfloat16 cotangent accumulated in float32 (rounded
  once), with the batch on one device or split over 8."""
  rows = jax.random.normal(jax.random.key(2), (5, 8), jnp.float32)
  weights = jax.random.normal(jax.random.key(3), (16, 5, 8), jnp.float32)

  def loss(r, w):  # linear in the broadcast rows: their cotangent is `w` in bfloat16
    return jnp.sum(broadcast_rows(r, w.shape[0], jnp.bfloat16).astype(jnp.float32) * w)

  grad = jax.jit(jax.grad(loss))
  exact = np.asarray(weights.astype(jnp.bfloat16), np.float64).sum(axis=0)
  np.testing.assert_allclose(grad(rows, weights), exact, rtol=2 ** -8)  # one bfloat16 rounding
  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.device_put(weights, NamedSharding(mesh, PartitionSpec("data")))
  np.testing.assert_allclose(grad(rows, sharded), grad(rows, weights), rtol=2 ** -8)


def test_the_batch_sum_stays_a_matmul_after_compilation():
  """The point of the module: no reduction over the batch in the compiled gradient (a vector of
  ones would be rewritten into one), a `[SUM_ROWS, B] x [B, P*E]` product instead."""
  def grad_of(broadcast):
    fn = jax.grad(lambda r, g: jnp.sum(broadcast(r) * g))
    return jax.jit(fn).lower(jnp.ones((10, 4)), jnp.ones((12, 10, 4))).compile().as_text()

  ours = grad_of(lambda r: broadcast_batch(r, 12))
  plain = grad_of(lambda r: jnp.broadcast_to(r[None], (12, 10, 4)))
  assert f"f32[{SUM_ROWS},40]" in ours and " dot(" in ours and " reduce(" not in ours
  assert " reduce(" in plain and " dot(" not in plain  # what it replaces
