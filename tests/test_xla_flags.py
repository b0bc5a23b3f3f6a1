"""The XLA flags the commands add by default (`ptuning/xla_flags.py`)."""

import os
import subprocess
import sys

from ptuning import xla_flags

DEFAULT = "--xla_gpu_cudnn_gemm_fusion_level=2"


def test_defaults_are_added_to_the_users_flags_and_never_override_them():
  assert DEFAULT in xla_flags.DEFAULT_FLAGS
  assert xla_flags.with_defaults("") == " ".join(xla_flags.DEFAULT_FLAGS)
  assert xla_flags.with_defaults(" --xla_force_host_platform_device_count=8 ").split() == [
      "--xla_force_host_platform_device_count=8", *xla_flags.DEFAULT_FLAGS]
  # the user's own value of a default flag stays, and stays alone
  users = "--xla_gpu_cudnn_gemm_fusion_level=0 --xla_dump_to=/tmp/x"
  assert xla_flags.with_defaults(users) == users
  # names are matched whole: a flag whose name merely starts the same adds nothing
  assert DEFAULT in xla_flags.with_defaults("--xla_gpu_cudnn_gemm_fusion_level_other=1")
  env = {"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=true"}
  assert xla_flags.add_defaults(env) == env["XLA_FLAGS"]
  assert env["XLA_FLAGS"].split() == ["--xla_cpu_use_thunk_runtime=true", DEFAULT]


def _flags_seen_by_a_cli_process(xla_flags_env: str | None) -> str:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags_env is not None:
    env["XLA_FLAGS"] = xla_flags_env
  # The CLI module adds the defaults on import; JAX then starts its CPU backend with them (a flag
  # this jaxlib did not know would abort the process here).
  code = ("import os, ptuning.cli, jax, jax.numpy as jnp; "
          "assert float(jnp.arange(3.0).sum()) == 3.0; print(os.environ['XLA_FLAGS'])")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout.strip()


def test_the_cli_starts_jax_with_the_defaults_on_cpu_and_keeps_a_users_value():
  assert _flags_seen_by_a_cli_process(None) == DEFAULT
  assert _flags_seen_by_a_cli_process("--xla_gpu_cudnn_gemm_fusion_level=0") == (
      "--xla_gpu_cudnn_gemm_fusion_level=0")
