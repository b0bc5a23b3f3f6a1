"""The fused CPU attention kernel (`ptuning/model/cpu_attention.cc`) against XLA's attention:
outputs and gradients, bias broadcasting and masks, its use by the model's default attention,
sharding over batch and heads, the AVX2 build, and the fallback without it."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ptuning import sharding
from ptuning.model import cpu_attention, layers
from ptuning.model.t5 import MASK_VALUE

# (batch, queries, keys, heads, depth, bias shape): below one vector of keys, a depth padded to
# 16, a key mask only, several query blocks, a rank-3 bias, decoder cross-attention.
CASES = [(2, 5, 7, 3, 16, (1, 3, 5, 7)), (2, 9, 11, 4, 8, (2, 4, 9, 11)),
         (2, 37, 19, 2, 32, (2, 1, 1, 19)), (3, 100, 100, 2, 80, (3, 2, 1, 100)),
         (1, 200, 130, 4, 64, (4, 200, 130)), (2, 8, 356, 6, 64, (2, 1, 1, 356))]


def operands(batch, queries, keys, heads, depth, bias_shape, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v, g = (jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32) for shape, scale in (
      ((batch, queries, heads, depth), 0.4), ((batch, keys, heads, depth), 0.4),
      ((batch, keys, heads, depth), 1.0), ((batch, queries, heads, depth), 1.0)))
  bias = rng.standard_normal(bias_shape).astype(np.float32)
  bias[..., keys - 2:] = MASK_VALUE  # masked keys
  if bias_shape[0] == batch and len(bias_shape) == 4:
    bias[0] = MASK_VALUE  # an example with every key masked (a padding row): uniform weights
  return q, k, v, jnp.asarray(bias), g


def value_and_grads(attend, q, k, v, bias, g):
  loss = lambda q, k, v, b: jnp.sum(attend(q, k, v, b) * g)
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3)))(q, k, v, bias), jax.jit(attend)(
      q, k, v, bias)


def test_the_kernel_is_built_on_this_machine():
  """CI and the developers' machines have a C++ compiler: the fast path is what the tests see."""
  assert cpu_attention.available()


@pytest.mark.parametrize("case", CASES, ids=[str(c[:5]) for c in CASES])
def test_matches_xla_attention_and_its_gradients(case):
  q, k, v, bias, g = operands(*case)
  xla = lambda q, k, v, b: layers.dot_product_attention(q, k, v, b)
  (loss, grads), out = value_and_grads(cpu_attention.attention, q, k, v, bias, g)
  (loss_x, grads_x), out_x = value_and_grads(xla, q, k, v, bias, g)
  np.testing.assert_allclose(out, out_x, rtol=2e-5, atol=2e-6)
  assert float(loss) == pytest.approx(float(loss_x), rel=1e-5, abs=1e-4)
  for name, ours, theirs in zip(("query", "key", "value", "bias"), grads, grads_x):
    scale = float(jnp.max(jnp.abs(theirs)))
    assert scale > 0, name
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * scale, err_msg=name)


def test_the_default_attention_runs_the_kernel_without_score_products_or_a_bias_gradient():
  """`recomputed_attention` on CPU compiles to the two custom calls and no batched product; a
  differentiated bias takes the backward that also writes the score gradient (still no XLA
  product), a frozen one the backward that does not."""
  q, k, v, bias, g = operands(2, 24, 24, 2, 16, (1, 2, 24, 24))
  attend = lambda q, k, v, b: layers.recomputed_attention(q, k, v, b, None, 0.0, jnp.float32)
  loss = lambda q, k, v, b: jnp.sum(attend(q, k, v, b) * g)
  hlo = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(q, k, v, bias).compile().as_text()
  assert sorted(re.findall(r'custom_call_target="(ptuning_attention_\w+)"', hlo)) == [
      "ptuning_attention_backward", "ptuning_attention_forward"]
  assert " dot(" not in hlo
  with_bias = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3))).lower(q, k, v, bias).compile(
  ).as_text()
  assert sorted(re.findall(r'custom_call_target="(ptuning_attention_\w+)"', with_bias)) == [
      "ptuning_attention_backward_with_scores", "ptuning_attention_forward"]
  assert " dot(" not in with_bias


def test_dropout_stays_in_xla():
  q, k, v, bias, _ = operands(2, 16, 16, 2, 16, (1, 2, 16, 16))
  rng = jax.random.key(0)
  assert not cpu_attention.supports(q, k, v, bias, rng, jnp.float32)
  hlo = jax.jit(lambda q, k, v: layers.recomputed_attention(q, k, v, bias, rng, 0.1,
                                                           jnp.float32)).lower(
      q, k, v).compile().as_text()
  assert "ptuning_attention" not in hlo and " dot(" in hlo


def test_bfloat16_attention_runs_the_kernel_in_float32():
  """bfloat16 operands are read by the kernel and computed in float32: the output is bfloat16,
  the gradients come back in each operand's dtype, both as close to float32 attention as
  bfloat16 rounding allows (closer than XLA's bfloat16 attention, whose probabilities are
  bfloat16); no float32 copy of them is made in XLA."""
  q, k, v, bias, g = operands(2, 40, 40, 2, 16, (2, 2, 40, 40))
  bf16 = jnp.bfloat16
  low = [x.astype(bf16) for x in (q, k, v)]
  attend = lambda dtype: lambda q, k, v, b: layers.recomputed_attention(q, k, v, b, None, 0.0,
                                                                        dtype)
  assert cpu_attention.supports(*low, bias, None, bf16)
  loss = lambda dtype: lambda q, k, v, b: jnp.sum(attend(dtype)(q, k, v, b).astype(jnp.float32) * g)
  step = jax.jit(jax.value_and_grad(loss(bf16), (0, 1, 2, 3)))
  hlo = step.lower(*low, bias).compile().as_text()
  assert "ptuning_attention_forward" in hlo and " dot(" not in hlo
  forward = next(line for line in hlo.splitlines() if "ptuning_attention_forward" in line)
  assert forward.count("bf16[2,40,2,16]") == 4, forward  # q, k, v in, out out: no float32 copy
  out = jax.jit(attend(bf16))(*low, bias)
  assert out.dtype == bf16
  # The kernel reads bfloat16 and rounds its results to bfloat16 itself: bit for bit what the
  # float32 kernel on the widened operands gives once XLA rounds it (output and gradients).
  widened = lambda q, k, v, b: cpu_attention.attention(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), b).astype(bf16)
  native_loss = lambda f: lambda q, k, v, b: jnp.sum(f(q, k, v, b).astype(jnp.float32) * g)
  np.testing.assert_array_equal(np.asarray(cpu_attention.attention(*low, bias), np.float32),
                                np.asarray(widened(*low, bias), np.float32))
  for ours, theirs in zip(
      jax.grad(native_loss(cpu_attention.attention), (0, 1, 2, 3))(*low, bias),
      jax.grad(native_loss(widened), (0, 1, 2, 3))(*low, bias)):
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))
  # the reference: float32 attention of the same (bfloat16-rounded) operands
  exact_low = [x.astype(jnp.float32) for x in low]
  reference = layers.dot_product_attention(*exact_low, bias)
  np.testing.assert_allclose(np.asarray(out, np.float32), reference, rtol=1e-2, atol=1e-2)
  _, grads = step(*low, bias)
  _, grads_ref = jax.value_and_grad(loss(jnp.float32), (0, 1, 2, 3))(*exact_low, bias)
  for name, ours, theirs in zip(("query", "key", "value", "bias"), grads, grads_ref):
    assert ours.dtype == (jnp.float32 if name == "bias" else bf16), name
    scale = float(jnp.max(jnp.abs(theirs)))
    np.testing.assert_allclose(np.asarray(ours, np.float32), theirs, rtol=0, atol=1e-2 * scale,
                               err_msg=name)


def test_a_bias_broadcast_over_the_keys_stays_in_xla():
  q, k, v, _, _ = operands(2, 16, 16, 2, 16, (1, 2, 16, 16))
  bias = jnp.zeros((2, 1, 16, 1), jnp.float32)
  assert not cpu_attention.supports(q, k, v, bias, None, jnp.float32)
  assert cpu_attention.supports(q, k, v, jnp.zeros((2, 1, 1, 16)), None, jnp.float32)
  out = layers.recomputed_attention(q, k, v, bias, None, 0.0, jnp.float32)
  np.testing.assert_allclose(out, layers.dot_product_attention(q, k, v, bias), rtol=1e-6)


def test_programs_for_other_platforms_never_see_the_custom_call():
  q, k, v, bias, _ = operands(2, 16, 16, 2, 16, (1, 2, 16, 16))
  attend = jax.jit(lambda q, k, v: layers.recomputed_attention(q, k, v, bias, None, 0.0,
                                                                jnp.float32))
  cuda = jax.export.export(attend, platforms=["cuda"])(q, k, v).mlir_module()
  cpu = attend.lower(q, k, v).as_text()
  assert "ptuning_attention_forward" in cpu and "ptuning_attention" not in cuda


def test_sharded_over_batch_and_heads_equals_one_device_with_no_gather():
  """On a (data 4, model 2) mesh with the default logical-axis rules each device runs its own
  (batch, head) pairs: same numbers as one device, no all-gather of query, key or value. A batch
  the data axis does not divide (2 rows over 4 devices) is replicated for the call instead."""
  q, k, v, bias, g = operands(8, 40, 40, 4, 16, (1, 4, 40, 40))
  attend = lambda q, k, v, b: layers.recomputed_attention(q, k, v, b, None, 0.0, jnp.float32)
  loss = lambda q, k, v, g, b=bias: jnp.sum(attend(q, k, v, b) * g)
  step = jax.jit(jax.grad(loss, (0, 1, 2)))
  single = step(q, k, v, g)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, model=2))
  with sharding.activate(mesh):
    spec = NamedSharding(mesh, P("data", None, "model", None))
    sharded = [jax.device_put(x, spec) for x in (q, k, v, g)]
    for ours, theirs in zip(step(*sharded), single):
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    hlo = step.lower(*sharded).compile().as_text()
    assert "f32[2,40,2,16]" in hlo and "ptuning_attention_backward" in hlo
    assert "all-gather" not in hlo
    # The shared bias's gradient: each device's score gradients, summed over the mesh.
    with_bias = jax.jit(jax.grad(loss, (0, 1, 2, 4)))
    for ours, theirs in zip(with_bias(*sharded, bias), jax.jit(jax.grad(loss, (0, 1, 2, 4)))(
        q, k, v, g, bias)):
      np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)
    small = [x[:2] for x in (q, k, v, g)]
    for ours, theirs in zip(step(*small), jax.jit(jax.grad(loss, (0, 1, 2)))(*small)):
      np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-6, atol=1e-7)


def test_vmapped_attention_equals_a_loop():
  """`vmap` of the kernel (sampling several sequences per input does): each slice as alone."""
  q, k, v, bias, g = operands(2, 12, 12, 2, 16, (2, 2, 12, 12))
  attend = lambda q, k, v, b: layers.recomputed_attention(q, k, v, b, None, 0.0, jnp.float32)
  stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v, bias)]
  ours = jax.jit(jax.vmap(attend))(*stacked)
  for i in range(2):
    np.testing.assert_allclose(ours[i], attend(*(x[i] for x in stacked)), rtol=1e-6, atol=1e-6)


_SUBPROCESS = """
import jax, jax.numpy as jnp, numpy as np
from ptuning import sharding
from ptuning.model import cpu_attention, layers
print("available", cpu_attention.available())
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 3, 32)), jnp.float32) for _ in range(3))
bias = jnp.asarray(rng.standard_normal((1, 3, 37, 37)), jnp.float32)
ours = layers.recomputed_attention(q, k, v, bias, None, 0.0, jnp.float32)
print("error", float(jnp.max(jnp.abs(ours - layers.dot_product_attention(q, k, v, bias)))))
low = [x.astype(jnp.bfloat16) for x in (q, k, v)]  # bfloat16 read by the kernel (or XLA)
ours = layers.recomputed_attention(*low, bias, None, 0.0, jnp.bfloat16).astype(jnp.float32)
exact = layers.dot_product_attention(*(x.astype(jnp.float32) for x in low), bias)
print("bf16error", float(jnp.max(jnp.abs(ours - exact))))
"""


@pytest.mark.parametrize("env,built", [({"PTUNING_KERNEL_FLAGS": "-mno-avx512f"}, True),
                                       ({"PTUNING_CPU_ATTENTION": "0"}, False)])
def test_avx2_build_and_switched_off_kernel(tmp_path, env, built):
  """The AVX2 build (as on CPUs without AVX-512) is as exact; switched off, XLA computes."""
  result = subprocess.run([sys.executable, "-c", _SUBPROCESS], capture_output=True, text=True,
                          env={**os.environ, "PTUNING_KERNEL_CACHE": str(tmp_path), **env},
                          check=True)
  assert f"available {built}" in result.stdout, result.stdout + result.stderr
  errors = dict(line.split() for line in result.stdout.splitlines() if "error" in line)
  assert float(errors["error"]) < 1e-5
  assert float(errors["bf16error"]) < 2e-2  # the output rounded to bfloat16
  assert bool(list(tmp_path.glob("cpu_attention-*.so"))) == built


def test_a_build_failure_names_the_compiler_and_the_source(tmp_path, monkeypatch):
  monkeypatch.setenv("PTUNING_KERNEL_CACHE", str(tmp_path))
  monkeypatch.setenv("PTUNING_KERNEL_FLAGS", "-DPTUNING_NO_SUCH_FLAG -fno-such-option")
  with pytest.raises(RuntimeError, match=r"compiling .*cpu_attention\.cc with .* failed"):
    cpu_attention.build("g++")
  assert not list(tmp_path.iterdir())  # nothing half-written left behind
