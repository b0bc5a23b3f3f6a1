"""T5X loss conventions against an independent numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptuning.train import losses

B, T, V = 3, 5, 11


def _log_softmax(x):
  x = x.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference(logits, targets, weights=None, s=0.0, z=0.0, factor=None):
  """Per-token T5X loss in float64: smoothed CE minus the targets' entropy, plus z * log_z**2."""
  logits = logits.astype(np.float64)
  log_z = np.log(np.exp(logits).sum(-1))
  logp = _log_softmax(logits)
  on, off = 1.0 - s, s / (V - 1)
  soft = np.full(logits.shape, off)
  np.put_along_axis(soft, targets[..., None], on, axis=-1)
  entropy = -(on * np.log(on) + (off * np.log(off) * (V - 1) if s else 0.0))
  per_token = -(soft * logp).sum(-1) - entropy + z * log_z ** 2
  z_term = z * log_z ** 2
  w = np.ones(targets.shape) if weights is None else weights
  div = 1.0 if factor is None else factor
  return (per_token * w).sum() / div, (z_term * w).sum() / div, w.sum()


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  logits = (3 * rng.normal(size=(B, T, V))).astype(np.float32)
  targets = rng.integers(1, V, size=(B, T)).astype(np.int32)
  targets[0, 3:] = 0  # padding
  targets[1, 1:] = 0
  targets[2, :] = 0  # a sequence with no real token
  return logits, targets


def test_cross_entropy_with_logits(data):
  logits, targets = data
  onehot = jax.nn.one_hot(targets, V)
  loss, z = losses.cross_entropy_with_logits(jnp.asarray(logits), onehot, 1e-3)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  logit_at_target = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(z, 1e-3 * log_z ** 2, rtol=1e-5)
  np.testing.assert_allclose(loss, log_z - logit_at_target + 1e-3 * log_z ** 2, rtol=1e-5)
  assert loss.shape == z.shape == (B, T)


def test_custom_gradient_matches_autodiff(data):
  logits, targets = data
  onehot = jax.nn.one_hot(targets, V)
  w = jnp.asarray(np.random.default_rng(1).uniform(size=(B, T)), jnp.float32)

  def custom(x):
    return jnp.sum(losses.cross_entropy_with_logits(x, onehot, 1e-2)[0] * w)

  def plain(x):
    log_z = jax.nn.logsumexp(x, -1)
    return jnp.sum((log_z - jnp.sum(onehot * x, -1) + 1e-2 * log_z ** 2) * w)

  np.testing.assert_allclose(jax.grad(custom)(jnp.asarray(logits)),
                             jax.grad(plain)(jnp.asarray(logits)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.grad(custom)(jnp.asarray(logits)),
                             jax.grad(custom)(jnp.asarray(logits)))
  # Integer z_loss works too.
  assert np.isfinite(jax.grad(lambda x: losses.cross_entropy_with_logits(x, onehot, 0)[0].sum())(
      jnp.asarray(logits))).all()


@pytest.mark.parametrize("s,z", [(0.0, 0.0), (0.0, 1e-4), (0.1, 0.0), (0.2, 1e-3)])
def test_weighted_cross_entropy_matches_reference(data, s, z):
  logits, targets = data
  weights = (targets > 0).astype(np.float32)
  for w, factor in [(None, None), (weights, None), (weights, 7.0)]:
    got = losses.compute_weighted_cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), None if w is None else jnp.asarray(w),
        label_smoothing=s, z_loss=z, loss_normalizing_factor=factor)
    want = _reference(logits, targets, w, s, z, factor)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_label_smoothing_perfect_prediction_has_zero_loss():
  s, targets = 0.1, jnp.array([[1, 2]])
  probs = jnp.full((1, 2, V), s / (V - 1)).at[0, jnp.arange(2), targets[0]].set(1 - s)
  loss, _, _ = losses.compute_weighted_cross_entropy(jnp.log(probs), targets,
                                                     label_smoothing=s, z_loss=0.0)
  assert abs(float(loss)) < 1e-5


def test_normalizing_factors(data):
  logits, targets = data
  batch = {"decoder_target_tokens": targets}
  real = (targets > 0).astype(np.float32)

  factor, w = losses.loss_normalizing_factor_and_weights(None, batch)
  assert factor is None
  np.testing.assert_array_equal(w, real)
  factor, w = losses.loss_normalizing_factor_and_weights(2.5, batch)
  assert factor == 2.5
  factor, w = losses.loss_normalizing_factor_and_weights("NUM_REAL_TARGET_TOKENS", batch)
  assert float(factor) == real.sum() == 4
  factor, w = losses.loss_normalizing_factor_and_weights("num_total_target_tokens", batch)
  assert factor == B * T
  np.testing.assert_array_equal(w, real)

  factor, w = losses.loss_normalizing_factor_and_weights("AVERAGE_PER_SEQUENCE", batch)
  assert float(factor) == 2  # the third sequence has no real token
  np.testing.assert_allclose(np.asarray(w).sum(-1), [1, 1, 0])
  np.testing.assert_allclose(w[0], [1 / 3] * 3 + [0, 0])
  total, _, _ = losses.compute_weighted_cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), w, z_loss=0.0, loss_normalizing_factor=factor)
  nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
  per_seq = [(nll[i] * real[i]).sum() / real[i].sum() for i in range(2)]
  np.testing.assert_allclose(total, np.mean(per_seq), rtol=1e-5)

  # Given weights are used; packed rows normalise each segment.
  packed = {"decoder_target_tokens": np.array([[5, 6, 7, 8, 0]]),
            "decoder_loss_weights": np.array([[1, 1, 1, 0, 0]]),
            "decoder_segment_ids": np.array([[1, 1, 2, 2, 0]])}
  factor, w = losses.loss_normalizing_factor_and_weights("AVERAGE_PER_SEQUENCE", packed)
  np.testing.assert_allclose(w, [[0.5, 0.5, 1.0, 0.0, 0.0]])
  assert float(factor) == 2

  with pytest.raises(ValueError, match="NUM_REAL_TARGET_TOKENS.*AVERAGE_PER_SEQUENCE"):
    losses.loss_normalizing_factor_and_weights("PER_TOKEN", batch)
  with pytest.raises(ValueError, match="resolve"):
    losses.compute_weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                          loss_normalizing_factor="NUM_REAL_TARGET_TOKENS")


def test_plain_setting_is_mean_nll_over_real_tokens(data):
  """What PyTorch's CrossEntropyLoss(ignore_index=0) computes."""
  logits, targets = data
  factor, w = losses.loss_normalizing_factor_and_weights(
      "NUM_REAL_TARGET_TOKENS", {"decoder_target_tokens": targets})
  loss, z, weight_sum = losses.compute_weighted_cross_entropy(
      jnp.asarray(logits), jnp.asarray(targets), w, label_smoothing=0.0, z_loss=0.0,
      loss_normalizing_factor=factor)
  nll = -np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
  mask = targets != 0
  np.testing.assert_allclose(loss, nll[mask].mean(), rtol=1e-6)
  assert float(z) == 0.0 and float(weight_sum) == mask.sum()


def test_gradients_are_finite_and_skip_padding(data):
  logits, targets = data
  factor, w = losses.loss_normalizing_factor_and_weights(
      "NUM_REAL_TARGET_TOKENS", {"decoder_target_tokens": targets})

  def loss_fn(x):
    return losses.compute_weighted_cross_entropy(x, jnp.asarray(targets), w, 0.1, 1e-4,
                                                 factor)[0]

  grad = jax.jit(jax.grad(loss_fn))(jnp.asarray(100 * logits))
  assert np.isfinite(grad).all()
  np.testing.assert_array_equal(np.asarray(grad)[targets == 0], 0.0)
