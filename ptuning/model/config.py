"""Backbone configurations: one frozen dataclass, named presets for T5, T5 1.1, mT5, Flan-T5, UL2.

A config fully determines the parameter tree's shapes; activation/parameter dtypes and layer
stacking (`scan_layers`, `remat_policy`) change only how the model computes, never what.
"""

from __future__ import annotations

import dataclasses
from typing import Any

FEED_FORWARD_KINDS = ("relu", "gated-gelu", "gated-silu")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "minimal")
ATTENTION_IMPLS = ("recompute", "plain", "cudnn")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes and numerics of a T5-family encoder-decoder.

  `feed_forward` is 'relu' (original T5: one `wi`), 'gated-gelu' (T5 1.1, mT5, Flan-T5) or
  'gated-silu' (UL2): gated variants have `wi_0` (activation) and `wi_1` (linear).
  `tie_embeddings`: original T5 shares the input embedding with the LM head and scales the
  decoder output by `d_model ** -0.5` before it; T5 1.1 and later use an untied `logits_dense`.
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  feed_forward: str = "gated-gelu"
  tie_embeddings: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"  # activation dtype ('bfloat16' for speed); logits are always float32
  param_dtype: str = "float32"
  scan_layers: bool = False  # stack layers with nn.scan: parameters get a leading 'layers' axis
  remat_policy: str = "none"  # rematerialisation of each layer, see REMAT_POLICIES
  # 'recompute': the backward pass recomputes attention probabilities `[B, H, Q, K]` instead of
  # keeping every layer's ('plain'); same forward (ptuning/model/layers.py); on CPU without
  # dropout it runs the fused float32 kernel of ptuning/model/cpu_attention.py. 'cudnn':
  # `jax.nn.dot_product_attention`, cuDNN flash attention on GPU in bfloat16/float16 (XLA elsewhere);
  # it has no attention dropout, so it needs dropout_rate == 0.
  attention_impl: str = "recompute"
  # Each RMSNorm's output behind an optimization barrier: computed once in the norm's kernel. On
  # GPUs XLA otherwise fuses the norm's scaling into the prologue of every Triton GEMM reading it
  # (Q, K, V, wi_0, wi_1, cross-attention K/V), which ran those GEMMs at 514-541 TFLOP/s against
  # 648-656 for the same products without it on an H100 (README, GPU); with it the T5 1.1 XL step
  # took 0.272 s against 0.285 (H100, 2026-11-27). On CPU XLA removes the barriers before fusing
  # anything: the same compiled program and numbers. Same values either way.
  norm_barrier: bool = True

  def __post_init__(self):
    if self.feed_forward not in FEED_FORWARD_KINDS:
      raise ValueError(f"feed_forward={self.feed_forward!r}; expected one of {FEED_FORWARD_KINDS}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl={self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
    if self.attention_impl == "cudnn" and self.dropout_rate > 0:
      raise ValueError(
          f"attention_impl='cudnn' (flash attention) has no dropout of the attention weights, but "
          f"dropout_rate={self.dropout_rate}: set dropout_rate=0 (gin DROPOUT_RATE = 0.0) or use "
          f"attention_impl='recompute'")

  @property
  def gated(self) -> bool:
    return self.feed_forward != "relu"

  @property
  def inner_dim(self) -> int:
    """Width of the joined attention heads, `num_heads * d_kv`."""
    return self.num_heads * self.d_kv

  def replace(self, **changes: Any) -> "T5Config":
    return dataclasses.replace(self, **changes)


def _t5_1_1(d_model, d_ff, heads, layers, vocab=32128, d_kv=64):
  return T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_heads=heads,
                  num_encoder_layers=layers, num_decoder_layers=layers, feed_forward="gated-gelu")


def _t5_original(d_model, d_ff, heads, layers, d_kv=64):
  return T5Config(vocab_size=32128, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_heads=heads,
                  num_encoder_layers=layers, num_decoder_layers=layers, feed_forward="relu",
                  tie_embeddings=True)


MT5_VOCAB = 250112

PRESETS: dict[str, T5Config] = {
    # T5 1.1 (also the Flan-T5 and LM-adapted shapes).
    "t5_1_1_small": _t5_1_1(512, 1024, 6, 8),
    "t5_1_1_base": _t5_1_1(768, 2048, 12, 12),
    "t5_1_1_large": _t5_1_1(1024, 2816, 16, 24),
    "t5_1_1_xl": _t5_1_1(2048, 5120, 32, 24),
    "t5_1_1_xxl": _t5_1_1(4096, 10240, 64, 24),
    # mT5: T5 1.1 shapes with the 250,112-piece multilingual vocabulary.
    "mt5_small": _t5_1_1(512, 1024, 6, 8, vocab=MT5_VOCAB),
    "mt5_base": _t5_1_1(768, 2048, 12, 12, vocab=MT5_VOCAB),
    "mt5_large": _t5_1_1(1024, 2816, 16, 24, vocab=MT5_VOCAB),
    "mt5_xl": _t5_1_1(2048, 5120, 32, 24, vocab=MT5_VOCAB),
    "mt5_xxl": _t5_1_1(4096, 10240, 64, 24, vocab=MT5_VOCAB),
    # Original T5 (ReLU MLP, tied embeddings).
    "t5_small": _t5_original(512, 2048, 8, 6),
    "t5_base": _t5_original(768, 3072, 12, 12),
    "t5_large": _t5_original(1024, 4096, 16, 24),
    "t5_3b": _t5_original(1024, 16384, 32, 24, d_kv=128),
    "t5_11b": _t5_original(1024, 65536, 128, 24, d_kv=128),
    # UL2 20B (gated-SiLU, 32+32 layers).
    "ul2_20b": T5Config(vocab_size=32128, d_model=4096, d_kv=256, d_ff=16384, num_heads=16,
                        num_encoder_layers=32, num_decoder_layers=32, feed_forward="gated-silu"),
    # Tiny presets for tests: same code paths, seconds to run on a CPU.
    "tiny_t5_1_1": T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                            num_encoder_layers=2, num_decoder_layers=2, feed_forward="gated-gelu"),
    "tiny_t5": T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                        num_encoder_layers=2, num_decoder_layers=2, feed_forward="relu",
                        tie_embeddings=True),
    # The demo's self-made backbone (launch/nano_t5/): T5 1.1 layout over the 387-id synthetic
    # vocabulary of tasks/synthetic.py (padded to 512), ~0.9M parameters.
    "nano_t5": T5Config(vocab_size=512, d_model=96, d_kv=24, d_ff=256, num_heads=4,
                        num_encoder_layers=3, num_decoder_layers=3, feed_forward="gated-gelu"),
    "tiny_ul2": T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                         num_encoder_layers=2, num_decoder_layers=2, feed_forward="gated-silu"),
}
# Flan-T5 checkpoints share the T5 1.1 shapes.
for _size in ("small", "base", "large", "xl", "xxl"):
  PRESETS[f"flan_t5_{_size}"] = PRESETS[f"t5_1_1_{_size}"]


def get_preset(name: str) -> T5Config:
  """Returns the preset called `name`; unknown names list the valid ones."""
  try:
    return PRESETS[name]
  except KeyError:
    raise KeyError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}") from None
