"""Hugging Face `save_pretrained` directories of T5-family models <-> canonical flat parameters.

Covers `T5ForConditionalGeneration` / `MT5ForConditionalGeneration` checkpoints (original T5,
T5 1.1, mT5, Flan-T5, UL2). Only `*.safetensors` weights are read (one `model.safetensors`, or
shards listed by `model.safetensors.index.json`); pickled `pytorch_model.bin` is refused.

Canonical layout (unscanned t5x names, see `validate.canonical_param_shapes`): kernels are
[in, out], so every HF `nn.Linear` weight ([out, in]) is transposed; relative position biases
are [heads, buckets] (HF stores the embedding as [buckets, heads]); `token_embedder/embedding` is
`shared.weight` [vocab, embed]; `decoder/logits_dense/kernel` [embed, vocab] is `lm_head.weight`
transposed and exists only for untied models.

Tying: transformers >= 5 always writes `tie_word_embeddings: true` and records original T5's
behaviour (tied head, decoder output scaled by d_model**-0.5) as `scale_decoder_outputs`; older
versions use `tie_word_embeddings` for both. A T5 1.1 model saved by transformers >= 5 whose head
was never untied has no `lm_head.weight`: its head *is* `shared.weight`, so `logits_dense` is then
read from `shared.weight`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ptuning.checkpoints.lazy_arrays import LazyArray, SafetensorsArray, TransposedArray
from ptuning.checkpoints.validate import (CheckpointMismatchError, canonical_param_shapes,
                                          check_params_match_config, check_shapes)
from ptuning.model.config import T5Config

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
SHARED, LM_HEAD = "shared.weight", "lm_head.weight"
LOGITS = "decoder/logits_dense/kernel"
# Copies of `shared.weight` that some checkpoints store; they must equal it.
TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Stored by some old checkpoints, never used by T5 (transformers ignores it on load too).
IGNORED_KEYS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
# transformers reads 'gated-gelu' as gelu_new; all of these are the tanh approximation.
_GELU_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_SILU_ACTS = ("silu", "swish")
_HF_ACT = {"relu": "relu", "gated-gelu": "gelu_new", "gated-silu": "silu"}


# ----------------------------------------------------------------------------- config.json


def _feed_forward_kind(proj: str) -> str:
  """HF `feed_forward_proj` ('relu', 'gated-gelu', 'gated-gelu_new', 'gated-silu', ...) -> ours."""
  parts = proj.split("-")
  if parts == ["relu"]:
    return "relu"
  if len(parts) == 2 and parts[0] == "gated":
    if parts[1] in _GELU_ACTS:
      return "gated-gelu"
    if parts[1] in _SILU_ACTS:
      return "gated-silu"
  raise ValueError(f"config.json feed_forward_proj={proj!r} is not supported; supported: 'relu', "
                   f"'gated-{{{'|'.join(_GELU_ACTS)}}}', 'gated-{{{'|'.join(_SILU_ACTS)}}}'")


def _scales_decoder_output(hf_config: Mapping[str, Any]) -> bool:
  """Original-T5 behaviour (tied head, scaled decoder output), as transformers decides it."""
  if "scale_decoder_outputs" in hf_config:  # written by transformers >= 5
    return bool(hf_config["scale_decoder_outputs"])
  return hf_config.get("tie_word_embeddings", True) is not False


def hf_config_to_t5_kwargs(hf_config: Mapping[str, Any]) -> dict[str, Any]:
  """Keyword arguments for `T5Config` from a parsed HF T5/mT5 `config.json`."""
  model_type = hf_config.get("model_type", "t5")
  if model_type not in ("t5", "mt5"):
    raise ValueError(f"config.json model_type={model_type!r}; only 't5' and 'mt5' are supported")
  archs = hf_config.get("architectures") or []
  if archs and not any(a.endswith(("ForConditionalGeneration", "WithLMHeadModel")) for a in archs):
    raise ValueError(f"config.json architectures={archs}; expected an encoder-decoder LM such as "
                     "T5ForConditionalGeneration")
  required = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
  missing = [k for k in required if k not in hf_config]
  if missing:
    raise ValueError(f"config.json lacks {missing}")
  num_decoder_layers = hf_config.get("num_decoder_layers")
  return dict(
      vocab_size=int(hf_config["vocab_size"]), d_model=int(hf_config["d_model"]),
      d_kv=int(hf_config["d_kv"]), d_ff=int(hf_config["d_ff"]),
      num_heads=int(hf_config["num_heads"]), num_encoder_layers=int(hf_config["num_layers"]),
      num_decoder_layers=int(hf_config["num_layers"] if num_decoder_layers is None
                             else num_decoder_layers),
      feed_forward=_feed_forward_kind(hf_config.get("feed_forward_proj", "relu")),
      tie_embeddings=_scales_decoder_output(hf_config),
      relative_attention_num_buckets=int(hf_config.get("relative_attention_num_buckets", 32)),
      relative_attention_max_distance=int(hf_config.get("relative_attention_max_distance", 128)),
      dropout_rate=float(hf_config.get("dropout_rate", 0.1)),
      layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-6)))


def t5_config_to_hf_dict(cfg: T5Config) -> dict[str, Any]:
  """A `config.json` dict for `T5ForConditionalGeneration` (transformers 4.x and 5.x)."""
  return {
      "architectures": ["T5ForConditionalGeneration"], "model_type": "t5",
      "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
      "num_heads": cfg.num_heads, "num_layers": cfg.num_encoder_layers,
      "num_decoder_layers": cfg.num_decoder_layers,
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.layer_norm_epsilon,
      "initializer_factor": 1.0, "feed_forward_proj": cfg.feed_forward,
      "is_gated_act": cfg.gated, "dense_act_fn": _HF_ACT[cfg.feed_forward],
      # 4.x reads tie_word_embeddings, 5.x prefers scale_decoder_outputs; both mean the same here.
      "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.tie_embeddings,
      "is_encoder_decoder": True, "use_cache": True,
      "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
      "dtype": cfg.param_dtype, "torch_dtype": cfg.param_dtype,  # 5.x / 4.x spelling
  }


# ----------------------------------------------------------------------------- names


def _attention_names(hf: str, ours: str) -> dict[str, tuple[str, bool]]:
  return {f"{ours}/{o}/kernel": (f"{hf}.{h}.weight", True)
          for o, h in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))}


def _mlp_names(hf: str, ours: str, gated: bool) -> dict[str, tuple[str, bool]]:
  wis = ("wi_0", "wi_1") if gated else ("wi",)
  return {f"{ours}/{w}/kernel": (f"{hf}.DenseReluDense.{w}.weight", True) for w in wis + ("wo",)}


# The sub-layers of an HF block, in order: (our layer norm, our attention, HF attention) or, for
# the MLP, (our layer norm, None, None).
_SUBLAYERS = {
    "encoder": (("pre_attention_layer_norm", "attention", "SelfAttention"),
                ("pre_mlp_layer_norm", None, None)),
    "decoder": (("pre_self_attention_layer_norm", "self_attention", "SelfAttention"),
                ("pre_cross_attention_layer_norm", "encoder_decoder_attention", "EncDecAttention"),
                ("pre_mlp_layer_norm", None, None)),
}


def hf_param_names(cfg: T5Config) -> dict[str, tuple[str, bool]]:
  """Canonical name -> (HF state-dict key, whether the HF tensor is stored transposed).

  Includes `decoder/logits_dense/kernel` <- `lm_head.weight` only for untied configs.
  """
  names = {"token_embedder/embedding": (SHARED, False)}
  for stack, n_layers in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
    names[f"{stack}/relpos_bias/rel_embedding"] = (
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True)
    names[f"{stack}/{stack}_norm/scale"] = (f"{stack}.final_layer_norm.weight", False)
    for i in range(n_layers):
      ours = f"{stack}/layers_{i}"
      for j, (norm, attention, hf_attention) in enumerate(_SUBLAYERS[stack]):
        hf = f"{stack}.block.{i}.layer.{j}"
        names[f"{ours}/{norm}/scale"] = (f"{hf}.layer_norm.weight", False)
        if attention:
          names.update(_attention_names(f"{hf}.{hf_attention}", f"{ours}/{attention}"))
        else:
          names.update(_mlp_names(hf, f"{ours}/mlp", cfg.gated))
  if not cfg.tie_embeddings:
    names[LOGITS] = (LM_HEAD, True)
  return names


# ----------------------------------------------------------------------------- reading


def is_hf_checkpoint(path: str | Path) -> bool:
  """True for a directory with `config.json` and HF weights (safetensors, or pickles we refuse)."""
  p = Path(path)
  return (p.is_dir() and (p / CONFIG_NAME).is_file()
          and any((p / n).is_file() for n in (SAFE_WEIGHTS, SAFE_INDEX) + PICKLE_WEIGHTS))


def _weight_files(path: Path) -> list[Path]:
  """The safetensors files to read, in the order transformers prefers them."""
  if (path / SAFE_WEIGHTS).is_file():
    return [path / SAFE_WEIGHTS]
  if (path / SAFE_INDEX).is_file():
    weight_map = json.loads((path / SAFE_INDEX).read_text())["weight_map"]
    files = [path / f for f in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
      raise FileNotFoundError(f"{path / SAFE_INDEX} lists shard(s) that do not exist: {absent}")
    return files
  if any((path / n).is_file() for n in PICKLE_WEIGHTS):
    raise ValueError(
        f"{path} has only PyTorch pickle weights ({' / '.join(PICKLE_WEIGHTS)}); ptuning refuses to "
        "unpickle them (loading a pickle can run arbitrary code). Convert once, in an environment "
        "you trust: `T5ForConditionalGeneration.from_pretrained(src).save_pretrained(dst, "
        "safe_serialization=True)`, then point at dst (or use a revision of the model that "
        "ships model.safetensors).")
  raise FileNotFoundError(f"{path} has neither {SAFE_WEIGHTS} nor {SAFE_INDEX}")


def _locate(handles: Mapping[Path, Any]) -> dict[str, Path]:
  """HF key -> the file holding it, over all open safetensors files."""
  where: dict[str, Path] = {}
  for file, handle in handles.items():
    for key in handle.keys():
      if key in where:
        raise CheckpointMismatchError(f"tensor {key!r} is in both {where[key]} and {file}")
      where[key] = file
  return where


def read_hf_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Returns (params in the canonical layout as numpy arrays, the parsed config.json dict).

  Tensors keep their stored dtype (float32, bfloat16 as `ml_dtypes.bfloat16`, ...). Raises
  `CheckpointMismatchError` naming the key and file for missing tensors, listing unexpected
  tensors, and naming parameter and both shapes for tensors that do not fit config.json.
  """
  params, hf_config = open_hf_checkpoint(path)
  return {name: np.asarray(source) for name, source in params.items()}, hf_config


def open_hf_checkpoint(path: str | Path) -> tuple[dict[str, LazyArray], dict[str, Any]]:
  """`read_hf_checkpoint` (same checks, same errors) with every tensor left on disk: values are
  `lazy_arrays` sources that read only the slices asked for. Only the embedding and its stored
  copies are read here, to check that the copies equal it."""
  path = Path(path)
  if not (path / CONFIG_NAME).is_file():
    raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; not a Hugging Face checkpoint directory")
  hf_config = json.loads((path / CONFIG_NAME).read_text())
  cfg = T5Config(**hf_config_to_t5_kwargs(hf_config))
  files = _weight_files(path)
  with contextlib.ExitStack() as stack:
    handles = {f: stack.enter_context(safe_open(str(f), framework="np")) for f in files}
    where = _locate(handles)
    names = hf_param_names(cfg)
    if not cfg.tie_embeddings and LM_HEAD not in where:
      names.pop(LOGITS)  # transformers >= 5 tied this head to `shared` when saving: see below
    missing = [f"{key!r} (for {name})" for name, (key, _) in names.items() if key not in where]
    if missing:
      raise CheckpointMismatchError(
          f"{path}: missing tensor(s) in {', '.join(f.name for f in files)}: {', '.join(missing)}")
    known = {key for key, _ in names.values()} | {LM_HEAD, *TIED_COPIES, *IGNORED_KEYS}
    unexpected = sorted(set(where) - known)
    if unexpected:
      raise CheckpointMismatchError(f"{path}: unexpected tensor(s) for {cfg.num_encoder_layers}+"
                                    f"{cfg.num_decoder_layers}-layer T5 in config.json: {unexpected}")
    found, labels = {}, {}
    for name, (key, transposed) in names.items():
      shape = tuple(handles[where[key]].get_slice(key).get_shape())
      found[name] = shape[::-1] if transposed else shape
      labels[name] = f"{key!r} in {where[key].name}" + (", transposed" if transposed else "")
    expected = canonical_param_shapes(cfg)
    if LOGITS not in names:
      expected.pop(LOGITS, None)
    check_shapes(found, expected, source=str(path), against=f"its {CONFIG_NAME}", labels=labels)

    copies = [k for k in TIED_COPIES + ((LM_HEAD,) if cfg.tie_embeddings else ()) if k in where]
    sources = {}
    for key in [key for key, _ in names.values()] + copies:
      stored = handles[where[key]].get_slice(key)
      sources[key] = SafetensorsArray(where[key], key, stored.get_shape(), stored.get_dtype())
  params: dict[str, LazyArray] = {}
  for name, (key, transposed) in names.items():
    params[name] = TransposedArray(sources[key]) if transposed else sources[key]
  if not cfg.tie_embeddings and LOGITS not in params:
    params[LOGITS] = TransposedArray(params["token_embedder/embedding"])
  if copies:
    shared = np.asarray(params["token_embedder/embedding"])
    for key in copies:
      copy = np.asarray(sources[key])
      if copy.shape != shared.shape or not np.array_equal(copy, shared):
        why = (" config.json ties the LM head to the embedding (tie_word_embeddings / "
               "scale_decoder_outputs); a separate head needs them false" if key == LM_HEAD else "")
        raise CheckpointMismatchError(f"{path}: {key!r} in {where[key].name} differs from "
                                      f"{SHARED!r}, but our model ties them.{why}")
  return params, hf_config


# ----------------------------------------------------------------------------- writing


def _shards(tensors: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
  """Greedy split in key order; a tensor larger than `max_bytes` gets a shard of its own."""
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key, array in tensors.items():
    if max_bytes is not None and shards[-1] and size + array.nbytes > max_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = array
    size += array.nbytes
  return shards


def write_hf_checkpoint(params: Mapping[str, Any], cfg: T5Config, path: str | Path,
                        max_shard_bytes: int | None = None) -> None:
  """Writes config.json + model.safetensors (or shards + index.json when over `max_shard_bytes`).

  `params` is the canonical flat dict (numpy or jax arrays, any float dtype, kept as is); the
  result loads with `T5ForConditionalGeneration.from_pretrained(path)`. Weight files from an
  earlier save in `path` are removed first.
  """
  check_params_match_config(params, canonical_param_shapes(cfg), source="parameters to write")
  tensors = {}
  for name, (key, transposed) in hf_param_names(cfg).items():
    array = np.asarray(params[name])
    tensors[key] = np.ascontiguousarray(array.T if transposed else array)
  hf_config = t5_config_to_hf_dict(cfg)
  dtypes = {a.dtype.name for a in tensors.values()}
  if len(dtypes) == 1:
    hf_config["dtype"] = hf_config["torch_dtype"] = dtypes.pop()
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  for stale in [path / SAFE_WEIGHTS, path / SAFE_INDEX, *path.glob("model-*-of-*.safetensors")]:
    stale.unlink(missing_ok=True)
  shards = _shards(tensors, max_shard_bytes)
  metadata = {"format": "pt"}  # transformers 4.x refuses safetensors files without it
  if len(shards) == 1:
    save_file(shards[0], str(path / SAFE_WEIGHTS), metadata=metadata)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(path / file), metadata=metadata)
      weight_map.update({key: file for key in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
             "weight_map": weight_map}
    (path / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  (path / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
