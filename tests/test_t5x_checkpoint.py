"""T5X checkpoint reading: the real tiny T5 1.1 checkpoint, msgpack/Orbax round trips, errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization
from flax.traverse_util import unflatten_dict

from ptuning.checkpoints.infer_config import infer_t5_config_kwargs
from ptuning.checkpoints.lazy_arrays import TensorStoreArray
from ptuning.checkpoints.t5x import (is_t5x_checkpoint, open_t5x_checkpoint, read_t5x_checkpoint,
                                     read_t5x_optimizer_state)
from ptuning.model.config import T5Config

TINY = (Path(__file__).resolve().parents[2] / "shared" / "data" / "t5x_checkpoints" /
        "t5_1_1_tiny" / "checkpoint_3")
if not TINY.is_dir():  # An acceptance test: fail loudly rather than skip.
  raise FileNotFoundError(f"{TINY} is missing: CI places ../shared beside the repository")


def canonical_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
  """The unscanned t5x parameter layout of `cfg`: key -> shape."""
  e, h, inner, f = cfg.d_model, cfg.num_heads, cfg.inner_dim, cfg.d_ff
  mlp = ({"mlp/wi_0/kernel": (e, f), "mlp/wi_1/kernel": (e, f)} if cfg.gated
         else {"mlp/wi/kernel": (e, f)})
  mlp["mlp/wo/kernel"] = (f, e)

  def attention(name):
    return {f"{name}/{p}/kernel": (e, inner) for p in ("query", "key", "value")} | {
        f"{name}/out/kernel": (inner, e)}

  enc_layer = {"pre_attention_layer_norm/scale": (e,), **attention("attention"),
               "pre_mlp_layer_norm/scale": (e,), **mlp}
  dec_layer = {"pre_self_attention_layer_norm/scale": (e,), **attention("self_attention"),
               "pre_cross_attention_layer_norm/scale": (e,),
               **attention("encoder_decoder_attention"), "pre_mlp_layer_norm/scale": (e,), **mlp}
  shapes = {"token_embedder/embedding": (cfg.vocab_size, e),
            "encoder/relpos_bias/rel_embedding": (h, cfg.relative_attention_num_buckets),
            "decoder/relpos_bias/rel_embedding": (h, cfg.relative_attention_num_buckets),
            "encoder/encoder_norm/scale": (e,), "decoder/decoder_norm/scale": (e,)}
  for i in range(cfg.num_encoder_layers):
    shapes.update({f"encoder/layers_{i}/{k}": s for k, s in enc_layer.items()})
  for i in range(cfg.num_decoder_layers):
    shapes.update({f"decoder/layers_{i}/{k}": s for k, s in dec_layer.items()})
  if not cfg.tie_embeddings:
    shapes["decoder/logits_dense/kernel"] = (e, cfg.vocab_size)
  return shapes


def random_params(cfg: T5Config, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 params, with the layer norms in bfloat16 to exercise that dtype."""
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s).astype(np.float32) for k, s in canonical_shapes(cfg).items()}
  return {k: v.astype(ml_dtypes.bfloat16) if k.endswith("/scale") else v for k, v in params.items()}


def nested(flat: dict[str, np.ndarray]) -> dict:
  return unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def assert_same(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]):
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype, key
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


SMALL = T5Config(vocab_size=50, d_model=8, d_kv=4, d_ff=12, num_heads=2, num_encoder_layers=2,
                 num_decoder_layers=3, relative_attention_num_buckets=6)


def writable_copy(src: Path, dst: Path) -> Path:
  """Copies the (read-only) shared checkpoint so a test may edit it."""
  shutil.copytree(src, dst, copy_function=shutil.copyfile)
  for root, dirs, _ in os.walk(dst):
    for d in [root, *(os.path.join(root, d) for d in dirs)]:
      os.chmod(d, 0o755)
  return dst


# --- the real tiny T5 1.1 checkpoint --------------------------------------------------------------

def test_real_checkpoint_every_leaf_matches_independent_read():
  params = read_t5x_checkpoint(TINY)
  stored = serialization.msgpack_restore((TINY / "checkpoint").read_bytes())
  assert stored["version"] == 3 and set(stored["optimizer"]) == {"target", "state"}
  inline = zarr = 0
  for key, value in params.items():
    leaf = stored["optimizer"]["target"]
    for name in key.split("/"):
      leaf = leaf[name]
    if isinstance(leaf, np.ndarray):
      inline += 1
      expected = leaf
    else:  # a TensorStore spec: the zarr directory is named after the dotted key
      zarr += 1
      zarr_dir = TINY / f"target.{key.replace('/', '.')}"
      assert leaf["driver"] == "zarr" and leaf["kvstore"]["path"] == zarr_dir.name
      expected = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(zarr_dir)}}
                         ).result().read().result()
      assert list(expected.shape) == leaf["metadata"]["shape"]
    assert value.dtype == expected.dtype == np.float32, key
    np.testing.assert_array_equal(value, expected, err_msg=key)
  assert (inline, zarr) == (14, 38)

  kwargs = infer_t5_config_kwargs(params)
  print("inferred config:", kwargs)
  assert kwargs == dict(vocab_size=32128, d_model=4, d_kv=2, d_ff=8, num_heads=2,
                        num_encoder_layers=2, num_decoder_layers=2, feed_forward="gated-gelu",
                        tie_embeddings=False, relative_attention_num_buckets=4)
  shapes = canonical_shapes(T5Config(**kwargs))
  assert len(params) == len(shapes) == 52
  assert {k: v.shape for k, v in params.items()} == shapes


def test_real_checkpoint_accepts_file_dir_and_parent():
  from_dir = read_t5x_checkpoint(TINY)
  assert_same(read_t5x_checkpoint(TINY / "checkpoint"), from_dir)
  assert_same(read_t5x_checkpoint(str(TINY.parent)), from_dir)
  assert is_t5x_checkpoint(TINY) and is_t5x_checkpoint(TINY / "checkpoint")
  assert is_t5x_checkpoint(TINY.parent)


def test_real_optimizer_state():
  state = read_t5x_optimizer_state(TINY)
  assert state["step"] == 3 and state["step"].dtype == np.int32
  assert len(state) == 1 + 52 * 4  # step + Adafactor m, v, v_col, v_row per parameter
  assert state["param_states/decoder/logits_dense/kernel/v"].shape == (4, 32128)


# --- round trips ----------------------------------------------------------------------------------

def test_single_file_msgpack_round_trip(tmp_path):
  params = random_params(SMALL)
  state = {"step": np.int32(7), "param_states": nested({k: np.ones((1,), np.float32)
                                                          for k in params})}
  plain = tmp_path / "plain.msgpack"
  plain.write_bytes(serialization.msgpack_serialize({"target": nested(params), "state": state}))
  wrapped = tmp_path / "wrapped.msgpack"  # the t5x root: {'version', 'optimizer': {...}}
  wrapped.write_bytes(serialization.msgpack_serialize(
      {"version": 3, "optimizer": {"state": state, "target": nested(params)}}))
  for file in (plain, wrapped):
    assert is_t5x_checkpoint(file)
    assert_same(read_t5x_checkpoint(file), params)
    opt = read_t5x_optimizer_state(file)
    assert opt["step"] == 7 and len(opt) == 1 + len(params)
  assert T5Config(**infer_t5_config_kwargs(read_t5x_checkpoint(plain))) == SMALL


def write_zarr(directory: Path, array: np.ndarray) -> dict:
  """Writes `array` as t5x does (zarr v2, gzip) and returns the metadata part of its spec."""
  metadata = {"shape": list(array.shape), "chunks": list(array.shape),
              "dtype": "bfloat16" if array.dtype == ml_dtypes.bfloat16 else array.dtype.str,
              "compressor": {"id": "gzip", "level": 1}}
  ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(directory)},
           "metadata": metadata}, create=True).result().write(array).result()
  return metadata


def test_tensorstore_spec_variants(tmp_path):
  """Relative dict spec; JSON-text spec pointing at the writer's filesystem; the pre-0.1.14
  spec with `path` beside a gcs kvstore; a bare kvstore URL string; a bfloat16 zarr array."""
  rng = np.random.default_rng(2)
  arrays = {"a/kernel": rng.standard_normal((3, 5)).astype(np.float32),
            "b/kernel": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
            "c/kernel": rng.standard_normal((6,)).astype(np.float32),
            "d/scale": np.arange(3, dtype=np.float32),
            "e/kernel": rng.standard_normal((2, 2)).astype(np.float32)}
  specs = {}
  for key in ("a/kernel", "b/kernel", "c/kernel", "e/kernel"):
    name = f"target.{key.replace('/', '.')}"
    specs[key] = {"driver": "zarr", "metadata": write_zarr(tmp_path / name, arrays[key])}
    specs[key]["kvstore"] = {"driver": "gfile", "path": name}
  specs["b/kernel"]["kvstore"]["path"] = "/gcs/elsewhere/checkpoint_7/target.b.kernel"
  specs["b/kernel"] = json.dumps(specs["b/kernel"])
  specs["c/kernel"]["kvstore"] = {"driver": "gcs", "bucket": "t5x-dummy-bucket"}
  specs["c/kernel"]["path"] = "target.c.kernel"
  specs["e/kernel"] = "file:///writer/checkpoint_7/target.e.kernel/"
  tree = nested({**specs, "d/scale": arrays["d/scale"]})
  (tmp_path / "checkpoint").write_bytes(
      serialization.msgpack_serialize({"version": 3, "optimizer": {"target": tree, "state": {}}}))
  assert_same(read_t5x_checkpoint(tmp_path), arrays)


def test_parent_directory_picks_largest_step(tmp_path):
  for step in (2, 10, 9):
    (tmp_path / f"checkpoint_{step}").mkdir()
    tree = {"target": {"w": np.full((2,), step, np.float32)}, "state": {"step": np.int32(step)}}
    (tmp_path / f"checkpoint_{step}" / "checkpoint").write_bytes(
        serialization.msgpack_serialize(tree))
  (tmp_path / "checkpoint_11.tmp-1234").mkdir()  # an unfinished write is ignored
  assert read_t5x_checkpoint(tmp_path)["w"].tolist() == [10, 10]


def test_orbax_round_trip(tmp_path):
  import orbax.checkpoint as ocp
  cfg = SMALL.replace(feed_forward="relu", tie_embeddings=True)
  params = random_params(cfg, seed=1)
  state = {"step": np.int32(5), "param_states": nested({k: v * 0 for k, v in params.items()})}
  direct = tmp_path / "orbax"
  ocp.PyTreeCheckpointer().save(direct, {"target": nested(params), "state": state})
  assert {"_METADATA", "manifest.ocdbt"} <= set(os.listdir(direct))
  # CheckpointManager layout: <dir>/<step>/state/_METADATA beside <step>/_CHECKPOINT_METADATA.
  with ocp.CheckpointManager(tmp_path / "managed", item_names=("state",)) as manager:
    manager.save(4, args=ocp.args.Composite(state=ocp.args.PyTreeSave(
        {"target": nested(params), "state": state})))
  for path in (direct, tmp_path / "managed" / "4", tmp_path / "managed"):
    assert is_t5x_checkpoint(path)
    assert_same(read_t5x_checkpoint(path), params)
    opened = open_t5x_checkpoint(path)  # left on disk, read slice by slice
    assert all(isinstance(v, TensorStoreArray) for v in opened.values()), path
    key = "encoder/layers_0/mlp/wi/kernel"
    np.testing.assert_array_equal(opened[key][(slice(1, 3),)], params[key][1:3])
    opt = read_t5x_optimizer_state(path)
    assert opt["step"] == 5 and len(opt) == 1 + len(params)
  assert T5Config(**infer_t5_config_kwargs(read_t5x_checkpoint(direct))) == cfg


# --- errors ---------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
  missing = tmp_path / "nope" / "checkpoint_1"
  with pytest.raises(FileNotFoundError, match="nope"):
    read_t5x_checkpoint(missing)
  assert not is_t5x_checkpoint(missing)


def test_unknown_or_corrupt_directory(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(ValueError, match=r"not a T5X checkpoint.*expected"):
    read_t5x_checkpoint(tmp_path)
  assert not is_t5x_checkpoint(tmp_path)
  tf_style = tmp_path / "tf" / "checkpoint"  # TF writes a text file with the same name
  tf_style.parent.mkdir()
  tf_style.write_text('model_checkpoint_path: "model.ckpt-1000000"\n')
  with pytest.raises(ValueError, match="not a T5X msgpack checkpoint"):
    read_t5x_checkpoint(tf_style.parent)
  assert not is_t5x_checkpoint(tf_style.parent)
  truncated = tmp_path / "truncated.msgpack"
  truncated.write_bytes(serialization.msgpack_serialize(
      {"target": nested(random_params(SMALL))})[:500])
  with pytest.raises(ValueError, match="corrupt"):
    read_t5x_checkpoint(truncated)


def test_zarr_shape_mismatch_names_key_and_shapes(tmp_path):
  ckpt = writable_copy(TINY, tmp_path / "checkpoint_3")
  zarray = ckpt / "target.encoder.layers_0.attention.query.kernel" / ".zarray"
  meta = json.loads(zarray.read_text())
  meta["shape"] = [4, 8]
  zarray.write_text(json.dumps(meta))
  with pytest.raises(ValueError) as info:
    read_t5x_checkpoint(ckpt)
  message = str(info.value)
  assert "encoder/layers_0/attention/query/kernel" in message
  assert "(4, 8)" in message and "(4, 4)" in message


def test_missing_zarr_directory_names_key(tmp_path):
  ckpt = writable_copy(TINY, tmp_path / "checkpoint_3")
  shutil.rmtree(ckpt / "target.decoder.logits_dense.kernel")
  with pytest.raises(FileNotFoundError, match="decoder/logits_dense/kernel"):
    read_t5x_checkpoint(ckpt)


# --- config inference -----------------------------------------------------------------------------

def test_infer_config_overrides_and_errors():
  gated = {k: np.zeros(s, np.float32) for k, s in canonical_shapes(SMALL).items()}
  assert infer_t5_config_kwargs(gated, feed_forward="gated-silu")["feed_forward"] == "gated-silu"
  with pytest.raises(ValueError, match="contradicts"):
    infer_t5_config_kwargs(gated, feed_forward="relu")
  with pytest.raises(KeyError, match="token_embedder/embedding"):
    infer_t5_config_kwargs({k: v for k, v in gated.items() if not k.startswith("token")})
  with pytest.raises(ValueError, match="decoder layer indices"):
    infer_t5_config_kwargs({k: v for k, v in gated.items() if "decoder/layers_1/" not in k})
