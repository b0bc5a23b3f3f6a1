"""Shape checks shared by the checkpoint readers (Hugging Face, T5X).

Parameters are flat dicts from canonical '/'-joined names (the t5x names, unscanned layout) to
arrays. `canonical_param_shapes(cfg)` lists what a `T5Config` implies; `check_params_match_config`
compares a parameter dict against such a listing and raises one `CheckpointMismatchError` that
names every missing, unexpected or mis-shaped parameter with the expected and found shapes.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ptuning.model.config import T5Config

Shape = tuple[int, ...]
_MAX_LISTED = 20  # names listed per kind of problem before eliding


class CheckpointMismatchError(ValueError):
  """A checkpoint's tensors do not match what the model config implies."""


def _attention_shapes(prefix: str, cfg: T5Config) -> dict[str, Shape]:
  """query/key/value kernels are [embed, heads * d_kv]; out is [heads * d_kv, embed]."""
  d, inner = cfg.d_model, cfg.inner_dim
  return {f"{prefix}/query/kernel": (d, inner), f"{prefix}/key/kernel": (d, inner),
          f"{prefix}/value/kernel": (d, inner), f"{prefix}/out/kernel": (inner, d)}


def _mlp_shapes(prefix: str, cfg: T5Config) -> dict[str, Shape]:
  """wi (relu) or wi_0/wi_1 (gated) are [embed, mlp]; wo is [mlp, embed]."""
  wis = ("wi_0", "wi_1") if cfg.gated else ("wi",)
  shapes = {f"{prefix}/{w}/kernel": (cfg.d_model, cfg.d_ff) for w in wis}
  shapes[f"{prefix}/wo/kernel"] = (cfg.d_ff, cfg.d_model)
  return shapes


def canonical_param_shapes(cfg: T5Config) -> dict[str, Shape]:
  """Every parameter of the unscanned canonical layout for `cfg`, with its shape.

  Embedding [vocab, embed]; relative position biases [heads, buckets]; layer-norm scales [embed];
  kernels [in, out]; `decoder/logits_dense/kernel` [embed, vocab] only when embeddings are untied.
  """
  d = cfg.d_model
  relpos = (cfg.num_heads, cfg.relative_attention_num_buckets)
  shapes: dict[str, Shape] = {"token_embedder/embedding": (cfg.vocab_size, d),
                              "encoder/relpos_bias/rel_embedding": relpos,
                              "encoder/encoder_norm/scale": (d,),
                              "decoder/relpos_bias/rel_embedding": relpos,
                              "decoder/decoder_norm/scale": (d,)}
  for i in range(cfg.num_encoder_layers):
    p = f"encoder/layers_{i}"
    shapes[f"{p}/pre_attention_layer_norm/scale"] = (d,)
    shapes.update(_attention_shapes(f"{p}/attention", cfg))
    shapes[f"{p}/pre_mlp_layer_norm/scale"] = (d,)
    shapes.update(_mlp_shapes(f"{p}/mlp", cfg))
  for i in range(cfg.num_decoder_layers):
    p = f"decoder/layers_{i}"
    shapes[f"{p}/pre_self_attention_layer_norm/scale"] = (d,)
    shapes.update(_attention_shapes(f"{p}/self_attention", cfg))
    shapes[f"{p}/pre_cross_attention_layer_norm/scale"] = (d,)
    shapes.update(_attention_shapes(f"{p}/encoder_decoder_attention", cfg))
    shapes[f"{p}/pre_mlp_layer_norm/scale"] = (d,)
    shapes.update(_mlp_shapes(f"{p}/mlp", cfg))
  if not cfg.tie_embeddings:
    shapes["decoder/logits_dense/kernel"] = (d, cfg.vocab_size)
  return shapes


def _listing(names: list[str]) -> str:
  shown = ", ".join(names[:_MAX_LISTED])
  return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def check_shapes(found: Mapping[str, Shape], expected: Mapping[str, Shape], *,
                 source: str = "checkpoint", against: str = "the model config",
                 labels: Mapping[str, str] | None = None) -> None:
  """Raises `CheckpointMismatchError` unless `found` has exactly the names and shapes of `expected`.

  `source` names where `found` came from (e.g. a path), `against` what `expected` came from;
  `labels` optionally adds a description
  per parameter name (e.g. the key and file it was read from) to the mismatch lines.
  """
  labels = labels or {}
  problems = []
  missing = sorted(set(expected) - set(found))
  if missing:
    problems.append(f"missing {len(missing)} parameter(s): {_listing(missing)}")
  unexpected = sorted(set(found) - set(expected))
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} parameter(s): {_listing(unexpected)}")
  for name in sorted(set(found) & set(expected)):
    want, got = tuple(expected[name]), tuple(found[name])
    if want != got:
      label = f" ({labels[name]})" if name in labels else ""
      problems.append(f"parameter {name}{label}: expected shape {want}, found {got}")
  if problems:
    raise CheckpointMismatchError(f"{source}: parameters do not match {against}:\n  "
                                  + "\n  ".join(problems))


def check_params_match_config(params: Mapping[str, Any], expected_shapes: Mapping[str, Shape], *,
                              source: str = "checkpoint", against: str = "the model config",
                              labels: Mapping[str, str] | None = None) -> None:
  """`check_shapes` on the shapes of `params` (flat name -> array, numpy or jax)."""
  found = {name: tuple(np.shape(value)) for name, value in params.items()}
  check_shapes(found, expected_shapes, source=source, against=against, labels=labels)
