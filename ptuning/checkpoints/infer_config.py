"""Infers `T5Config` sizes from a flat parameter dict in the canonical (t5x, unscanned) layout.

Shapes read: `token_embedder/embedding` [vocab, d_model], `encoder/relpos_bias/rel_embedding`
[heads, buckets], `encoder/layers_0/attention/query/kernel` [d_model, heads * d_kv],
`encoder/layers_0/mlp/wi/kernel` (relu) or `mlp/wi_0/kernel` (gated) [d_model, d_ff]; layer
counts come from the `encoder/layers_{i}` / `decoder/layers_{i}` names.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from ptuning.model.config import FEED_FORWARD_KINDS


def infer_t5_config_kwargs(params: Mapping[str, np.ndarray],
                           feed_forward: str | None = None) -> dict[str, Any]:
  """Returns `T5Config` keyword arguments for `params`.

  Gated weights (`wi_0`/`wi_1`) cannot tell GELU from SiLU: they give 'gated-gelu' unless
  `feed_forward` says otherwise ('gated-silu' for UL2). `tie_embeddings` is True iff there is
  no `decoder/logits_dense/kernel`. Scanned layouts (a stacked `layers` axis) are not supported.
  """
  vocab_size, d_model = _shape(params, "token_embedder/embedding", 2)
  num_heads, num_buckets = _shape(params, "encoder/relpos_bias/rel_embedding", 2)
  inner_dim = _shape(params, "encoder/layers_0/attention/query/kernel", 2)[1]
  if inner_dim % num_heads:
    raise ValueError(f"attention width {inner_dim} is not a multiple of num_heads={num_heads} "
                     f"(from encoder/relpos_bias/rel_embedding [heads, buckets])")
  gated = "encoder/layers_0/mlp/wi/kernel" not in params
  d_ff = _shape(params, f"encoder/layers_0/mlp/{'wi_0' if gated else 'wi'}/kernel", 2)[1]
  if feed_forward is None:
    feed_forward = "gated-gelu" if gated else "relu"
  elif feed_forward not in FEED_FORWARD_KINDS:
    raise ValueError(f"feed_forward={feed_forward!r}; expected one of {FEED_FORWARD_KINDS}")
  elif (feed_forward != "relu") != gated:
    raise ValueError(f"feed_forward={feed_forward!r} contradicts the weights: the MLP has "
                     f"{'wi_0/wi_1 (gated)' if gated else 'a single wi (relu)'}")
  return dict(
      vocab_size=vocab_size,
      d_model=d_model,
      d_kv=inner_dim // num_heads,
      d_ff=d_ff,
      num_heads=num_heads,
      num_encoder_layers=_count_layers(params, "encoder"),
      num_decoder_layers=_count_layers(params, "decoder"),
      feed_forward=feed_forward,
      tie_embeddings="decoder/logits_dense/kernel" not in params,
      relative_attention_num_buckets=num_buckets,
  )


def _shape(params: Mapping[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
  if key not in params:
    raise KeyError(f"parameter {key!r} is missing; expected the unscanned t5x layout "
                   f"(e.g. 'encoder/layers_0/...'), got keys like {sorted(params)[:5]}")
  shape = tuple(int(d) for d in np.shape(params[key]))
  if len(shape) != ndim:
    raise ValueError(f"parameter {key!r} has shape {shape}; expected {ndim} dimensions")
  return shape


def _count_layers(params: Mapping[str, np.ndarray], stack: str) -> int:
  """Number of `{stack}/layers_{i}` blocks; their indices must be exactly 0..n-1."""
  pattern = re.compile(rf"{stack}/layers_(\d+)/")
  indices = {int(m.group(1)) for key in params if (m := pattern.match(key))}
  if not indices or indices != set(range(len(indices))):
    raise ValueError(f"{stack} layer indices {sorted(indices)} are not 0..n-1 "
                     f"(expected unscanned '{stack}/layers_{{i}}/...' keys)")
  return len(indices)
