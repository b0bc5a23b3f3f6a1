"""Test set-up: 8 fake CPU devices (set before jax is imported), one XLA compilation cache per
test run, and paths to shared data."""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# JAX's persistent compilation cache, fresh for each run and shared by the xdist workers and the
# commands tests launch (they inherit the environment): the many identical tiny programs compile
# once per run. Results do not change (an entry is keyed by the program, its devices, the XLA
# flags and the jaxlib version); in-memory jit caches, which the compile-once test counts, are
# untouched. The controller made it, so the controller removes it (pytest_sessionfinish).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ptuning-tests-xla-cache-")
  os.environ["PTUNING_TESTS_OWN_XLA_CACHE"] = str(os.getpid())
# Only programs that take half a second or more to compile: the thousands of one-operation
# programs of un-jitted model code compile in milliseconds, and each entry written costs more
# than that, since with the size limit below every write scans the whole directory (a subset
# of the tests took 247 s caching everything, 169 s with this threshold, on a 2-core AMD EPYC).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# A size limit turns on JAX's file lock around each entry's read and write: two workers that
# compile the same program at once never read a half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 * 2**30))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
  if not SHARED_DATA.is_dir():
    raise FileNotFoundError(f"{SHARED_DATA} is missing: CI places ../shared beside the repository")
  return SHARED_DATA


def pytest_sessionfinish(session):
  if os.environ.get("PTUNING_TESTS_OWN_XLA_CACHE") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
