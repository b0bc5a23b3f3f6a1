"""Load a frozen backbone from any supported checkpoint into its shardings.

Formats are recognised from the files (HF `config.json` + safetensors; T5X msgpack/zarr,
single-file msgpack or Orbax layout). The model config is inferred from the checkpoint; a
preset or explicit `T5Config` may be given instead, and is then checked against it.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from jax.sharding import Mesh

from ptuning import sharding
from ptuning.checkpoints import hf, t5x
from ptuning.checkpoints.infer_config import infer_t5_config_kwargs
from ptuning.model.build import place_params
from ptuning.model.config import T5Config, get_preset


def read_backbone(path: str | os.PathLike, feed_forward: str | None = None
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Opens the checkpoint: {path: array source} in the canonical unscanned layout plus the
  T5Config kwargs they imply. Large arrays stay on disk (`lazy_arrays`: sliceable, with shape
  and dtype) until `place_params` reads each device's shard of them."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"backbone checkpoint {path!r} does not exist")
  if hf.is_hf_checkpoint(path):
    params, hf_config = hf.open_hf_checkpoint(path)
    kwargs = hf.hf_config_to_t5_kwargs(hf_config)
  elif t5x.is_t5x_checkpoint(path):
    params = t5x.open_t5x_checkpoint(path)
    kwargs = infer_t5_config_kwargs(params, feed_forward=feed_forward)
  else:
    raise ValueError(f"{path!r} is neither a Hugging Face save_pretrained directory (config.json + "
                     "*.safetensors) nor a T5X checkpoint (checkpoint_N/ with a msgpack "
                     "'checkpoint' file, a single msgpack file, or an Orbax checkpoint)")
  return params, kwargs


def resolve_config(inferred: dict[str, Any], model: str | T5Config | None, path: str,
                   **overrides: Any) -> T5Config:
  """The config to run: the named preset / given config (checked against the checkpoint's
  sizes), else the inferred one; `overrides` set numerics such as dtype or scan_layers."""
  if model is None:
    return T5Config(**inferred).replace(**overrides)
  cfg = get_preset(model) if isinstance(model, str) else model
  shape_fields = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers",
                  "num_decoder_layers", "tie_embeddings")
  mismatched = [f"{f}: config {getattr(cfg, f)} vs checkpoint {inferred[f]}"
                for f in shape_fields if f in inferred and getattr(cfg, f) != inferred[f]]
  if mismatched:
    raise ValueError(f"checkpoint {path!r} does not match the configured model: "
                     + "; ".join(mismatched))
  return cfg.replace(**overrides)


def load_backbone(path: str | os.PathLike, mesh: Mesh, model: str | T5Config | None = None,
                  rules=sharding.DEFAULT_RULES, **overrides: Any) -> tuple[T5Config, Any]:
  """Returns (config, sharded parameter tree) for the checkpoint at `path`; each device's shard
  is read from disk as it is placed, so the host never holds the whole backbone at once."""
  params, inferred = read_backbone(path, feed_forward=overrides.pop("feed_forward", None))
  cfg = resolve_config(inferred, model, os.fspath(path), **overrides)
  return cfg, place_params(params, cfg, mesh, rules)


def backbone_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Flat numpy arrays exactly as stored (tests use this to check nothing was altered)."""
  params, _ = read_backbone(path)
  return {k: np.asarray(v) for k, v in params.items()}
