"""Backbones are placed straight from disk, one shard at a time: the loaders hand `place_params`
lazy sources (nothing read yet), every distinct device shard is read exactly once and no source
is ever read whole unless its leaf is replicated, on an 8-device mesh with parameters sharded
over both axes (the '2d' rules), unscanned and scanned; the placed values are the stored ones."""

from pathlib import Path

import jax
import numpy as np
import pytest

from ptuning import param_tree, sharding
from ptuning.checkpoints import lazy_arrays
from ptuning.checkpoints.load import read_backbone, resolve_config
from ptuning.model import build

ROOT = Path(__file__).resolve().parents[1]
NANO = ROOT / "launch" / "nano_t5"  # an HF save_pretrained directory (safetensors)
TINY_T5X = ("t5x_checkpoints", "t5_1_1_tiny", "checkpoint_3")  # real t5x: msgpack + zarr


class RecordingSource:
  """Wraps a source; records the bytes of every slice read and refuses whole-array reads."""

  def __init__(self, source):
    self.source, self.shape, self.dtype = source, tuple(source.shape), source.dtype
    self.reads: list[tuple] = []

  def __getitem__(self, index):
    array = np.asarray(self.source[index])
    self.reads.append((tuple((s.start, s.stop) for s in index), array.nbytes))
    return array

  def __array__(self, dtype=None, copy=None):
    raise AssertionError("the whole array was read at once")


def _checkpoint(name, shared_data):
  return NANO if name == "hf" else shared_data.joinpath(*TINY_T5X)


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("name", ["hf", "t5x"])
def test_backbone_is_placed_shard_by_shard_from_disk(name, scan_layers, shared_data):
  path = _checkpoint(name, shared_data)
  sources, inferred = read_backbone(path)
  stored = {k: np.asarray(v) for k, v in sources.items()}
  lazy = {k for k, v in sources.items() if isinstance(v, lazy_arrays.LazyArray)}
  # HF: every tensor; t5x: every array kept in zarr (kernels, the token embedding).
  kernels = {k for k in sources if k.endswith(("kernel", "token_embedder/embedding"))}
  assert kernels and kernels <= lazy, sorted(kernels - lazy)
  if name == "hf":
    assert lazy == set(sources)

  cfg = resolve_config(inferred, None, str(path), scan_layers=scan_layers)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=4, model=2), jax.devices())
  rules = sharding.RULE_SETS["2d"]
  recorded = {k: RecordingSource(v) for k, v in sources.items()}
  placed = build.place_params(recorded, cfg, mesh, rules)

  for path_name, source in recorded.items():
    leaf_bytes = stored[path_name].nbytes
    reads = source.reads
    assert len({index for index, _ in reads}) == len(reads), f"{path_name}: a shard read twice"
    # the distinct shards tile the stored leaf exactly once (scanned: each layer's share of
    # the stacked leaf's shards)
    assert sum(n for _, n in reads) == leaf_bytes, (path_name, reads)
  sharded = [k for k, s in param_tree.flatten(build.param_shardings(cfg, mesh, rules)).items()
             if not s.is_fully_replicated]
  assert sharded, "nothing is sharded: the test would not show per-shard reads"
  stacked_sources = build.stack_layers(recorded, cfg) if scan_layers else recorded
  for leaf in sharded:
    for part in getattr(stacked_sources[leaf], "parts", [stacked_sources[leaf]]):
      assert max(n for _, n in part.reads) < np.asarray(part.source).nbytes, leaf

  expected = build.stack_layers(stored, cfg) if scan_layers else stored
  got = param_tree.flatten(placed)
  assert set(got) == set(expected)
  for leaf, value in got.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[leaf]), err_msg=leaf)


def test_transposed_and_bfloat16_slices_read_only_their_region(tmp_path):
  """SafetensorsArray / TransposedArray slices equal slicing the whole tensor (bf16 kept)."""
  import ml_dtypes
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  tensors = {"w": rng.standard_normal((6, 10)).astype(np.float32),
             "b": rng.standard_normal((6, 10)).astype(ml_dtypes.bfloat16)}
  save_file(tensors, str(tmp_path / "x.safetensors"))
  for key, value in tensors.items():
    source = lazy_arrays.SafetensorsArray(tmp_path / "x.safetensors", key, value.shape,
                                          "F32" if key == "w" else "BF16")
    index = (slice(2, 5), slice(3, 9))
    got = source[index]
    assert got.dtype == value.dtype
    np.testing.assert_array_equal(got, value[index])
    transposed = lazy_arrays.TransposedArray(source)
    assert transposed.shape == (10, 6)
    np.testing.assert_array_equal(transposed[(slice(1, 4), slice(None))], value.T[1:4])
    assert transposed[()].flags.c_contiguous
    np.testing.assert_array_equal(np.asarray(transposed), value.T)
  with pytest.raises(TypeError, match="slices"):
    lazy_arrays.SafetensorsArray(tmp_path / "x.safetensors", "w", (6, 10), "F32")[0]


def test_a_damaged_tensor_names_parameter_and_file_when_placed(shared_data, tmp_path):
  """A zarr chunk that goes missing after opening fails at placement with the parameter's name."""
  import shutil
  ckpt = tmp_path / "checkpoint_3"
  shutil.copytree(shared_data.joinpath(*TINY_T5X), ckpt)
  sources, inferred = read_backbone(ckpt)
  zarr_dir = ckpt / "target.decoder.logits_dense.kernel"
  for chunk in zarr_dir.iterdir():
    if not chunk.name.startswith("."):
      chunk.write_bytes(b"not a chunk")
  cfg = resolve_config(inferred, None, str(ckpt))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=8, model=1), jax.devices())
  with pytest.raises(ValueError, match=r"decoder/logits_dense/kernel.*target\.decoder"):
    build.place_params(sources, cfg, mesh)


_MEASURE_LOAD = """
import json, sys, jax
from ptuning import sharding
from ptuning.bench import peak_rss_bytes, reset_peak_rss
from ptuning.checkpoints.load import load_backbone
mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
assert reset_peak_rss(), "needs Linux /proc/self/clear_refs"
before = peak_rss_bytes()  # = the current resident size, just after the reset
_, params = load_backbone(sys.argv[1], mesh)
jax.block_until_ready(params)
print(json.dumps({"param_bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
                  "rss_growth": peak_rss_bytes() - before}))
"""


def test_loading_holds_one_copy_of_the_backbone(tmp_path):
  """Peak RSS of a fresh process rises above its resident size before the load by the placed
  parameters plus a fixed ~90 MiB (runtime, one leaf's transients): 1.44x here, where reading
  the whole model into numpy first, as the loaders used to, gave 2.44x."""
  import json
  import subprocess
  import sys
  from ptuning.checkpoints.hf import write_hf_checkpoint
  from ptuning.model.config import T5Config
  cfg = T5Config(vocab_size=2048, d_model=512, d_kv=64, d_ff=1024, num_heads=8,
                 num_encoder_layers=8, num_decoder_layers=8, feed_forward="gated-gelu",
                 tie_embeddings=False)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  write_hf_checkpoint(build.host_params(build.init_params(cfg, jax.random.key(0), mesh)), cfg,
                      tmp_path / "hf")
  result = subprocess.run([sys.executable, "-c", _MEASURE_LOAD, str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
  assert result.returncode == 0, result.stderr[-3000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  ratio = figures["rss_growth"] / figures["param_bytes"]
  print(f"parameters {figures['param_bytes'] / 2**20:.0f} MiB, peak RSS growth while loading "
        f"{figures['rss_growth'] / 2**20:.0f} MiB ({ratio:.2f}x)")
  assert ratio < 1.75, figures
