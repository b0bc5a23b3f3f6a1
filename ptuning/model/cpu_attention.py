"""T5 attention as one fused kernel on XLA:CPU (float32), forward and backward.

XLA:CPU runs T5's attention core as separate batched products around `[B, H, Q, K]` float32
scores and probabilities written to memory, with layout transposes around them: on a 2-core
machine about 45% of a T5 1.1 small prompt-tuning step, at a quarter of the matmul rate
(README, Performance). `cpu_attention.cc` computes, per (batch, head) and block of query rows,
scores, bias, softmax and the weighted sum in the core's caches with register-blocked products,
and the backward (probabilities recomputed, as `recomputed_attention` does) the same way.

The source is compiled once per machine with the host's C++ compiler (`-march=native`) into
`~/.cache/ptuning/kernels/` (or `$PTUNING_KERNEL_CACHE`), keyed by the source, flags, compiler,
jaxlib version and CPU (`$PTUNING_KERNEL_FLAGS` adds compiler flags, e.g. `-mno-avx512f` for the
AVX2 build), and its handlers are registered as XLA FFI targets. Where there is
no compiler, or `PTUNING_CPU_ATTENTION=0`, `available()` is False (with one warning naming the
reason) and attention stays in XLA. `layers.recomputed_attention` calls `attention` on CPU
(through `jax.lax.platform_dependent`, so GPU/TPU programs never see the custom call) when
`supports` holds: no dropout. bfloat16 activations run it too, converted to float32 as the
kernel reads them: XLA:CPU runs bfloat16 attention as separate batched products at about 110
GFLOP/s, the kernel in float32 at about 200.

The bias gradient (full fine-tuning trains the relative-position table): `attention` is a
`custom_vjp` with symbolic zeros, so its forward learns whether the bias is differentiated; if
it is, the backward runs the kernel's variant that also writes the score gradient dS
`[B, H, Q, K]` (the bias gradient before the sum over the bias's broadcast dimensions, which
XLA then takes), and otherwise the variant that writes none (prompt tuning: the table is frozen).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import pathlib
import shutil
import subprocess
import tempfile
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

Array = jax.Array

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
COMPILE_FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-ffp-contract=fast", "-fno-math-errno",
                 "-fPIC", "-shared", "-w")
_FORWARD, _BACKWARD = "ptuning_attention_forward", "ptuning_attention_backward"
_BACKWARD_SCORES = "ptuning_attention_backward_with_scores"
_SYMBOLS = {_FORWARD: "PtuningAttentionForward", _BACKWARD: "PtuningAttentionBackward",
            _BACKWARD_SCORES: "PtuningAttentionBackwardWithScores"}
DEPTH_MULTIPLE = 16  # head depth the kernel takes (whole vector registers, AVX-512 or AVX2)


def cache_dir() -> pathlib.Path:
  default = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
  return pathlib.Path(os.environ.get("PTUNING_KERNEL_CACHE", default / "ptuning" / "kernels"))


def _cpu_signature() -> str:
  """The host CPU's model and feature flags (what `-march=native` compiles for)."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    import platform
    return platform.processor() + platform.machine()
  return "\n".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))


def build(compiler: str) -> pathlib.Path:
  """Compiles `cpu_attention.cc` (if not cached) and returns the shared library's path."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                           check=True).stdout
  flags = (*COMPILE_FLAGS, *os.environ.get("PTUNING_KERNEL_FLAGS", "").split())
  key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version,
                                  jax.__version__, _cpu_signature()]).encode()).hexdigest()[:16]
  target = cache_dir() / f"cpu_attention-{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # then renamed: never half-written
    built = pathlib.Path(tmp) / target.name
    result = subprocess.run([compiler, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE),
                             "-o", str(built)], capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"compiling {SOURCE} with {compiler} failed:\n{result.stderr[-4000:]}")
    os.replace(built, target)
  return target


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered (built on first call; False, with one warning
  naming the reason, without a compiler or with `PTUNING_CPU_ATTENTION=0`)."""
  if os.environ.get("PTUNING_CPU_ATTENTION", "1") == "0":
    return False
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not compiler:
    warnings.warn("ptuning: no C++ compiler (g++, c++ or $CXX) found; CPU attention stays in XLA "
                  "(slower; see README, Performance)")
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(build(compiler)))
  except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
    warnings.warn(f"ptuning: the fused CPU attention kernel is not available ({error}); CPU "
                  "attention stays in XLA")
    return False
  for name, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform="cpu")
  return True


def supports(query: Array, key: Array, value: Array, bias: Array, dropout_rng, dtype) -> bool:
  """Whether `attention` computes this call: no dropout, floating `[B, *, H, D]`
  operands and a bias broadcastable to `[B, H, Q, K]` with all K keys (a bias broadcast over
  the keys, `[..., 1]`, stays in XLA), on a CPU backend where the kernel is available."""
  arrays = (query, key, value, bias)
  if not (query.ndim == key.ndim == value.ndim == 4 and bias.ndim <= 4):
    return False
  full = (query.shape[0], query.shape[2], query.shape[1], key.shape[1])  # [B, H, Q, K]
  bias_shape = (1,) * (4 - bias.ndim) + tuple(bias.shape)
  broadcastable = bias_shape[3] == full[3] and all(b in (1, n) for b, n in zip(bias_shape, full))
  return (dropout_rng is None and broadcastable and jnp.issubdtype(dtype, jnp.floating)
          and all(jnp.issubdtype(a.dtype, jnp.floating) for a in arrays)
          and jax.default_backend() == "cpu" and available())  # GPU/TPU hosts: no build


def _bias4(bias: Array) -> Array:
  return bias.reshape((1,) * (4 - bias.ndim) + bias.shape)


def _forward_call(query, key, value, bias):
  return jax.ffi.ffi_call(_FORWARD, jax.ShapeDtypeStruct(query.shape, query.dtype),
                          vmap_method="sequential")(query, key, value, bias)


def _backward_call(query, key, value, bias, grad):
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value)]
  return tuple(jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="sequential")(
      query, key, value, bias, grad))


def _backward_with_scores_call(query, key, value, bias, grad):
  """`_backward_call`'s dq, dk, dv and the score gradient dS `[B, H, Q, K]`."""
  batch, queries, heads, _ = query.shape
  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (query, key, value)]
  shapes.append(jax.ShapeDtypeStruct((batch, heads, queries, key.shape[1]), jnp.float32))
  return tuple(jax.ffi.ffi_call(_BACKWARD_SCORES, shapes, vmap_method="sequential")(
      query, key, value, bias, grad))


def _mesh_axes(logical: str, size: int, mesh) -> str | tuple[str, ...] | None:
  """The mesh axes the active logical-axis rules give `logical`, if they divide `size` (else None:
  that dimension is replicated for the kernel call)."""
  axes = nn.logical_to_mesh_axes((logical,))[0]
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return axes if names and size % math.prod(mesh.shape[n] for n in names) == 0 else None


def _per_shard(call, *args):
  """`call(query, key, value, bias, ...)` on each device's share of batch and heads (`shard_map`
  over the active mesh, axes from the logical-axis rules of 'batch' and 'heads'): attention is
  independent across both, so no collective runs. Without a mesh of several devices: `call`."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return call(*args)
  query, bias = args[0], args[3]
  batch = _mesh_axes("batch", query.shape[0], mesh)
  heads = _mesh_axes("heads", query.shape[2], mesh)
  qkv = PartitionSpec(batch, None, heads, None)
  bias_spec = PartitionSpec(batch if bias.shape[0] == query.shape[0] else None,
                            heads if bias.shape[1] == query.shape[2] else None, None, None)
  out_specs = {_forward_call: qkv, _backward_call: (qkv, qkv, qkv),
               _backward_with_scores_call: (qkv, qkv, qkv, PartitionSpec(batch, heads))}[call]
  return jax.shard_map(call, mesh=mesh, in_specs=(qkv, qkv, qkv, bias_spec) + (qkv,) * (
      len(args) - 4), out_specs=out_specs, check_vma=False)(*args)


def _pad_depth(x: Array) -> Array:
  """`[B, *, H, D]` -> `[B, *, H, D']`, D' = D rounded up to 16, zeros appended (scores and
  outputs of the real depths are unchanged)."""
  extra = -x.shape[-1] % DEPTH_MULTIPLE
  return jnp.pad(x, ((0, 0),) * 3 + ((0, extra),)) if extra else x


def _kernel_dtype(query: Array, key: Array, value: Array) -> jnp.dtype:
  """The dtype the kernel reads and writes for these operands: theirs if float32 or bfloat16
  alike, else float32 (cast here)."""
  kernel_dtypes = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
  same = query.dtype == key.dtype == value.dtype and jnp.dtype(query.dtype) in kernel_dtypes
  return jnp.dtype(query.dtype) if same else jnp.dtype(jnp.float32)


def _kernel_operands(query: Array, key: Array, value: Array, bias: Array) -> tuple[Array, ...]:
  """What the kernel takes: query, key, value in `_kernel_dtype` (bfloat16 converted to float32
  by the kernel as it reads), depths padded to 16; a float32 rank-4 bias."""
  dtype = _kernel_dtype(query, key, value)
  return (*(_pad_depth(x.astype(dtype)) for x in (query, key, value)),
          _bias4(bias.astype(jnp.float32)))


@jax.custom_vjp
def attention(query: Array, key: Array, value: Array, bias: Array) -> Array:
  """`query [B, Q, H, D]`, `key`, `value [B, K, H, D]`, `bias` broadcastable to `[B, H, Q, K]`
  (float32, or another float dtype: bfloat16 query, key and value are converted to float32 by
  the kernel as it reads them, others cast here, so bfloat16 activations get float32 products,
  softmax and probabilities) -> `[B, Q, H, D]` in `_kernel_dtype` (bfloat16 for bfloat16
  operands, rounded by the kernel as it writes; else float32) through the fused
  kernel (built and registered here on first use; an error where `available()` is False).
  Gradients come back in each operand's dtype; the backward keeps the operands as given (not
  their float32 casts). A depth that is not a multiple of 16 is zero-padded to one. Sharded over
  batch and heads as its operands are (`_per_shard`)."""
  if not available():
    raise RuntimeError("the fused CPU attention kernel is not available (see the warning above); "
                       "call it only where cpu_attention.supports(...) holds")
  depth = query.shape[-1]
  return _per_shard(_forward_call, *_kernel_operands(query, key, value, bias))[..., :depth]


def _attention_fwd(query, key, value, bias):
  # With symbolic zeros each argument comes with `perturbed`: whether it is differentiated.
  args = tuple(x.value for x in (query, key, value, bias))
  return attention(*args), (args, bias.perturbed)


def _attention_bwd(residuals, grad):
  args, bias_perturbed = residuals
  query, key, value, bias = args
  if isinstance(grad, jax.custom_derivatives.SymbolicZero):  # the output got no cotangent
    grad = jnp.zeros(grad.shape, grad.dtype)
  depth = query.shape[-1]
  call = _backward_with_scores_call if bias_perturbed else _backward_call
  grads = _per_shard(call, *_kernel_operands(*args),
                     _pad_depth(grad.astype(_kernel_dtype(query, key, value))))
  bias_grad = None  # a bias that is not differentiated gets no gradient
  if bias_perturbed:  # dS [B, H, Q, K] summed over the bias's broadcast (and missing) dimensions
    scores_grad = grads[3]
    lead = scores_grad.ndim - bias.ndim
    broadcast = tuple(i + lead for i, n in enumerate(bias.shape) if n == 1)
    bias_grad = jnp.sum(scores_grad, axis=tuple(range(lead)) + broadcast).reshape(bias.shape)
    bias_grad = bias_grad.astype(bias.dtype)
  return (*(g[..., :depth].astype(x.dtype) for g, x in zip(grads[:3], args)), bias_grad)


attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)
