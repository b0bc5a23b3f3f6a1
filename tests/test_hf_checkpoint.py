"""Hugging Face checkpoint reading/writing against real tiny `T5ForConditionalGeneration`s (CPU)."""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import torch
import transformers

from ptuning.checkpoints import hf  # noqa: E402
from ptuning.checkpoints.lazy_arrays import read_safetensors_raw  # noqa: E402
from ptuning.checkpoints.validate import (CheckpointMismatchError, canonical_param_shapes,  # noqa: E402
                                          check_params_match_config)
from ptuning.model.config import T5Config  # noqa: E402

VARIANTS = {  # name: (feed_forward_proj, tied, decoder layers)
    "t5_relu_tied": ("relu", True, 2),
    "t5_1_1_gated_gelu_untied": ("gated-gelu", False, 2),
    "ul2_gated_silu_untied": ("gated-silu", False, 3),
}
_STACK_LAYERS = {  # HF sub-layer index -> (canonical norm, canonical module)
    "encoder": {0: ("pre_attention_layer_norm", "attention"), 1: ("pre_mlp_layer_norm", "mlp")},
    "decoder": {0: ("pre_self_attention_layer_norm", "self_attention"),
                1: ("pre_cross_attention_layer_norm", "encoder_decoder_attention"),
                2: ("pre_mlp_layer_norm", "mlp")},
}
_ATTN = {"q": "query", "k": "key", "v": "value", "o": "out"}


def _canonical_name(key: str) -> tuple[str, bool] | None:
  """Independent HF key -> (canonical name, stored transposed); None for tied embedding copies."""
  if key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    return None
  if key == "shared.weight":
    return "token_embedder/embedding", False
  if key == "lm_head.weight":
    return "decoder/logits_dense/kernel", True
  if m := re.fullmatch(r"(encoder|decoder)\.final_layer_norm\.weight", key):
    return f"{m[1]}/{m[1]}_norm/scale", False
  if m := re.fullmatch(r"(\w+)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
                       key):
    return f"{m[1]}/relpos_bias/rel_embedding", True
  m = re.fullmatch(r"(\w+)\.block\.(\d+)\.layer\.(\d)\.(.+)\.weight", key)
  assert m, key
  norm, module = _STACK_LAYERS[m[1]][int(m[3])]
  prefix = f"{m[1]}/layers_{m[2]}"
  if m[4] == "layer_norm":
    return f"{prefix}/{norm}/scale", False
  if a := re.fullmatch(r"(?:SelfAttention|EncDecAttention)\.([qkvo])", m[4]):
    return f"{prefix}/{module}/{_ATTN[a[1]]}/kernel", True
  w = re.fullmatch(r"DenseReluDense\.(wi|wi_0|wi_1|wo)", m[4])
  assert w, key
  return f"{prefix}/mlp/{w[1]}/kernel", True


def _expected_params(state_dict, tied: bool) -> dict[str, np.ndarray]:
  out = {}
  for key, tensor in state_dict.items():
    mapped = _canonical_name(key)
    if mapped is None or (tied and key == "lm_head.weight"):
      continue
    array = tensor.detach().float().numpy()
    out[mapped[0]] = array.T if mapped[1] else array
  return out


def _hf_model(ff: str, tied: bool, dec_layers: int, seed: int = 0):
  """A tiny HF T5; untied variants get a distinct `lm_head` like a real T5 1.1 checkpoint.

  (transformers 5 ties `lm_head` to `shared` on construction whatever `tie_word_embeddings` says.)
  """
  torch.manual_seed(seed)
  config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=4,
                                 num_layers=2, num_decoder_layers=dec_layers, feed_forward_proj=ff,
                                 tie_word_embeddings=tied, relative_attention_num_buckets=8,
                                 decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(config).eval()
  if not tied:
    model.lm_head.weight = torch.nn.Parameter(torch.randn(64, 16))
  return model


def _logits(model, seed: int = 1) -> np.ndarray:
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    out = model(input_ids=torch.randint(2, 64, (2, 7), generator=g),
                decoder_input_ids=torch.randint(2, 64, (2, 5), generator=g))
  return out.logits.float().numpy()


def _assert_params_equal(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].shape == want[name].shape, name
    np.testing.assert_array_equal(np.asarray(got[name], np.float32), want[name], err_msg=name)


@pytest.fixture(params=sorted(VARIANTS))
def saved(request, tmp_path):
  ff, tied, dec = VARIANTS[request.param]
  model = _hf_model(ff, tied, dec)
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  return model, tmp_path / "hf", (ff, tied, dec)


def test_reads_save_pretrained(saved):
  model, path, (ff, tied, dec) = saved
  params, hf_config = hf.read_hf_checkpoint(path)
  _assert_params_equal(params, _expected_params(model.state_dict(), tied))
  assert hf_config["feed_forward_proj"] == ff
  kwargs = hf.hf_config_to_t5_kwargs(hf_config)
  assert kwargs == dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=4,
                        num_encoder_layers=2, num_decoder_layers=dec, feed_forward=ff,
                        tie_embeddings=tied, relative_attention_num_buckets=8,
                        relative_attention_max_distance=128, dropout_rate=0.1,
                        layer_norm_epsilon=1e-6)
  check_params_match_config(params, canonical_param_shapes(T5Config(**kwargs)))
  assert hf.is_hf_checkpoint(path) and not hf.is_hf_checkpoint(path / "config.json")


def test_round_trip_through_from_pretrained(saved, tmp_path):
  model, path, (_, tied, _) = saved
  params, hf_config = hf.read_hf_checkpoint(path)
  cfg = T5Config(**hf.hf_config_to_t5_kwargs(hf_config))
  hf.write_hf_checkpoint(params, cfg, tmp_path / "ours")
  loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
      tmp_path / "ours", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  _assert_params_equal(_expected_params(loaded.state_dict(), tied), params)
  assert (loaded.lm_head.weight is loaded.shared.weight) == tied
  assert loaded.config.scale_decoder_outputs == tied
  np.testing.assert_array_equal(_logits(loaded.eval()), _logits(model))


def test_untied_config_without_lm_head_reads_head_from_shared(tmp_path):
  # What transformers 5 saves for a T5 1.1 model whose head was never untied.
  model = _hf_model("gated-gelu", True, 2)
  model.config.scale_decoder_outputs = False
  model.save_pretrained(tmp_path, safe_serialization=True)
  with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
    assert "lm_head.weight" not in f.keys()
  params, hf_config = hf.read_hf_checkpoint(tmp_path)
  assert hf.hf_config_to_t5_kwargs(hf_config)["tie_embeddings"] is False
  np.testing.assert_array_equal(params["decoder/logits_dense/kernel"],
                                params["token_embedder/embedding"].T)
  hf.write_hf_checkpoint(params, T5Config(**hf.hf_config_to_t5_kwargs(hf_config)), tmp_path / "o")
  loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "o")
  np.testing.assert_array_equal(_logits(loaded.eval()), _logits(model))


def test_sharded_save_pretrained_and_sharded_write(tmp_path):
  model = _hf_model("gated-gelu", False, 2)
  model.save_pretrained(tmp_path / "single", safe_serialization=True)
  model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
  assert (tmp_path / "sharded" / hf.SAFE_INDEX).is_file()
  assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
  single, _ = hf.read_hf_checkpoint(tmp_path / "single")
  sharded, hf_config = hf.read_hf_checkpoint(tmp_path / "sharded")
  _assert_params_equal(sharded, single)

  cfg = T5Config(**hf.hf_config_to_t5_kwargs(hf_config))
  out = tmp_path / "ours"
  hf.write_hf_checkpoint(single, cfg, out)  # a stale single file the sharded write must remove
  hf.write_hf_checkpoint(single, cfg, out, max_shard_bytes=8_000)
  shards = sorted(out.glob("model-*-of-*.safetensors"))
  index = json.loads((out / hf.SAFE_INDEX).read_text())
  assert len(shards) > 2 and not (out / hf.SAFE_WEIGHTS).exists()
  assert set(index["weight_map"].values()) == {s.name for s in shards}
  _assert_params_equal(hf.read_hf_checkpoint(out)[0], single)
  loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
      out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  np.testing.assert_array_equal(_logits(loaded.eval()), _logits(model))


def test_bf16_round_trip(tmp_path):
  model = _hf_model("gated-silu", False, 2).to(torch.bfloat16)
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  params, hf_config = hf.read_hf_checkpoint(tmp_path / "hf")
  assert {a.dtype for a in params.values()} == {np.dtype(ml_dtypes.bfloat16)}
  _assert_params_equal(params, _expected_params(model.state_dict(), False))

  cfg = T5Config(**hf.hf_config_to_t5_kwargs(hf_config))
  hf.write_hf_checkpoint(params, cfg, tmp_path / "ours")
  with safe_open(str(tmp_path / "ours" / hf.SAFE_WEIGHTS), "np") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    key = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight"
    np.testing.assert_array_equal(read_safetensors_raw(tmp_path / "ours" / hf.SAFE_WEIGHTS, key),
                                  f.get_tensor(key))  # the fallback reader agrees
  assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
  loaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
      tmp_path / "ours", output_loading_info=True, dtype=torch.bfloat16)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  assert loaded.shared.weight.dtype == torch.bfloat16
  _assert_params_equal(_expected_params(loaded.state_dict(), False), params)


def test_write_takes_jax_arrays_and_checks_shapes(tmp_path):
  import jax.numpy as jnp
  cfg = T5Config(vocab_size=8, d_model=4, d_kv=2, d_ff=8, num_heads=2, num_encoder_layers=1,
                 num_decoder_layers=1, feed_forward="gated-gelu")
  params = {k: jnp.full(s, 0.5, jnp.bfloat16) for k, s in canonical_param_shapes(cfg).items()}
  hf.write_hf_checkpoint(params, cfg, tmp_path / "a", max_shard_bytes=100)
  read, _ = hf.read_hf_checkpoint(tmp_path / "a")
  _assert_params_equal(read, {k: np.asarray(v, np.float32) for k, v in params.items()})
  params["decoder/logits_dense/kernel"] = jnp.zeros((4, 9))
  with pytest.raises(CheckpointMismatchError, match=r"logits_dense/kernel.*\(4, 8\).*\(4, 9\)"):
    hf.write_hf_checkpoint(params, cfg, tmp_path / "b")
  (tmp_path / "a" / "model-00002-of-{:05d}.safetensors".format(
      len(list((tmp_path / "a").glob("model-*"))))).unlink()
  with pytest.raises(FileNotFoundError, match="model-00002-of"):
    hf.read_hf_checkpoint(tmp_path / "a")


def test_refuses_pickle_only_directory(tmp_path):
  model = _hf_model("relu", True, 2)
  model.config.save_pretrained(tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  assert hf.is_hf_checkpoint(tmp_path)
  with pytest.raises(ValueError, match=r"refuses to unpickle(.|\n)*safe_serialization=True"):
    hf.read_hf_checkpoint(tmp_path)


def _edit_checkpoint(path, edit) -> None:
  file = str(path / hf.SAFE_WEIGHTS)
  with safe_open(file, "np") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture
def t5_1_1_dir(tmp_path):
  _hf_model("gated-gelu", False, 2).save_pretrained(tmp_path, safe_serialization=True)
  return tmp_path


def test_shape_mismatch_names_parameter_and_shapes(t5_1_1_dir):
  key = "decoder.block.1.layer.2.DenseReluDense.wi_0.weight"  # [d_ff, d_model] = [32, 16]
  _edit_checkpoint(t5_1_1_dir, lambda t: t.__setitem__(key, np.zeros((30, 16), np.float32)))
  with pytest.raises(CheckpointMismatchError) as err:
    hf.read_hf_checkpoint(t5_1_1_dir)
  msg = str(err.value)
  assert "decoder/layers_1/mlp/wi_0/kernel" in msg and key in msg
  assert "expected shape (16, 32)" in msg and "found (16, 30)" in msg


def test_missing_tensor_names_key_and_file(t5_1_1_dir):
  key = "encoder.block.1.layer.0.SelfAttention.v.weight"
  _edit_checkpoint(t5_1_1_dir, lambda t: t.pop(key))
  with pytest.raises(CheckpointMismatchError, match=rf"model\.safetensors.*{re.escape(key)}"):
    hf.read_hf_checkpoint(t5_1_1_dir)


def test_unexpected_tensor_is_listed(t5_1_1_dir):
  key = "encoder.block.2.layer.0.layer_norm.weight"
  _edit_checkpoint(t5_1_1_dir, lambda t: t.__setitem__(key, np.ones(16, np.float32)))
  with pytest.raises(CheckpointMismatchError, match=re.escape(key)):
    hf.read_hf_checkpoint(t5_1_1_dir)


def test_tied_copies_ignored_when_equal_rejected_when_different(t5_1_1_dir):
  ignored = hf.IGNORED_KEYS[0]
  _edit_checkpoint(t5_1_1_dir, lambda t: t.update({"encoder.embed_tokens.weight": t["shared.weight"],
                                                   ignored: np.zeros((8, 4), np.float32)}))
  hf.read_hf_checkpoint(t5_1_1_dir)
  _edit_checkpoint(t5_1_1_dir, lambda t: t.__setitem__("decoder.embed_tokens.weight",
                                                       t["shared.weight"] + 1))
  with pytest.raises(CheckpointMismatchError, match="decoder.embed_tokens.weight"):
    hf.read_hf_checkpoint(t5_1_1_dir)


@pytest.mark.parametrize("extra, expected", [
    ({"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}, ("gated-gelu", False)),
    ({"feed_forward_proj": "gated-gelu_new"}, ("gated-gelu", True)),  # 4.x: untied defaults true
    ({"feed_forward_proj": "gated-silu", "tie_word_embeddings": True,
      "scale_decoder_outputs": False}, ("gated-silu", False)),  # transformers 5 style
    ({}, ("relu", True)),
])
def test_config_variants(extra, expected):
  base = dict(model_type="t5", vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_heads=4,
              num_layers=2, num_decoder_layers=None)
  kwargs = hf.hf_config_to_t5_kwargs({**base, **extra})
  assert (kwargs["feed_forward"], kwargs["tie_embeddings"]) == expected
  assert kwargs["num_decoder_layers"] == 2


@pytest.mark.parametrize("proj", ["gelu", "gated-relu", "gated-gelu-new", "silu"])
def test_unknown_feed_forward_fails_clearly(proj):
  with pytest.raises(ValueError, match=f"feed_forward_proj={proj!r}"):
    hf.hf_config_to_t5_kwargs(dict(vocab_size=8, d_model=4, d_kv=2, d_ff=8, num_heads=2,
                                   num_layers=1, feed_forward_proj=proj))


@pytest.mark.parametrize("preset", ["t5_small", "t5_1_1_base", "ul2_20b", "mt5_small"])
def test_config_dict_round_trip_and_transformers_accepts_it(preset):
  from ptuning.model.config import get_preset
  cfg = get_preset(preset)
  d = hf.t5_config_to_hf_dict(cfg)
  assert T5Config(**hf.hf_config_to_t5_kwargs(d)) == cfg
  theirs = transformers.T5Config(**d)
  assert theirs.is_gated_act == cfg.gated and theirs.scale_decoder_outputs == cfg.tie_embeddings
  assert theirs.dense_act_fn == {"relu": "relu", "gated-gelu": "gelu_new",
                                 "gated-silu": "silu"}[cfg.feed_forward]
  assert (theirs.decoder_start_token_id, theirs.pad_token_id, theirs.eos_token_id) == (0, 0, 1)


def test_check_params_match_config_messages():
  cfg = T5Config(vocab_size=8, d_model=4, d_kv=2, d_ff=8, num_heads=2, num_encoder_layers=1,
                 num_decoder_layers=1, feed_forward="relu", tie_embeddings=True)
  expected = canonical_param_shapes(cfg)
  assert "decoder/logits_dense/kernel" not in expected
  params = {k: np.zeros(s, np.float32) for k, s in expected.items()}
  check_params_match_config(params, expected)
  params["encoder/layers_0/mlp/wi/kernel"] = np.zeros((4, 9), np.float32)
  params.pop("decoder/decoder_norm/scale")
  params["prompt/embedding"] = np.zeros((3, 4), np.float32)
  with pytest.raises(CheckpointMismatchError) as err:
    check_params_match_config(params, expected, source="x")
  msg = str(err.value)
  assert "encoder/layers_0/mlp/wi/kernel" in msg and "(4, 8)" in msg and "(4, 9)" in msg
  assert "missing 1 parameter(s): decoder/decoder_norm/scale" in msg
  assert "unexpected 1 parameter(s): prompt/embedding" in msg
