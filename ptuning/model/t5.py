"""T5 encoder-decoder in Flax: Encoder, Decoder, EncoderDecoder.

Parameter names match T5X (see ptuning/checkpoints): `token_embedder/embedding`,
`encoder/layers_{i}/attention/query/kernel`, ... With `scan_layers` the per-layer subtrees are
stacked under `encoder/layers/...` with a leading 'layers' axis.

The encoder consumes input *embeddings* plus a mask, the seam every prompt method uses:

    embeds = model.apply(params, tokens, method=EncoderDecoder.embed)          # [B, L, E]
    embeds, mask = <prompt method>(embeds, tokens > 0)                          # [B, P+L, E]
    logits = model.apply(params, embeds, mask, decoder_inputs,
                         method=EncoderDecoder.forward_embeddings)              # [B, T, V] f32

Per-layer (deep) prompts: `Encoder(embeds, mask, layer_prompts, layer_prompt_mode)` with
`layer_prompts [N, P, E]` or `[N, B, P, E]` (N = num_encoder_layers) acts on the first P rows of
the hidden states at the input of *every* layer i = 0..N-1, layer 0 included (P-tuning v2: each
layer has its own prompt), after the embedding dropout and before the layer's pre-norm:
  'replace': x[:, :P] = layer_prompts[i]      (layer 0's rows from the method's `apply` are
                                               overwritten; they only fix P and the mask)
  'add':     x[:, :P] += layer_prompts[i]     (layer_prompts[0] adds to `apply`'s rows; all
                                               zeros is exactly the plain prompted encoder)
`layer_prompt_offset=k` moves those rows to `[k:k+P]` (a UL2 mode token placed before the prompt,
ptuning/prompts/mode_token.py); rows `[:k]` are then ordinary hidden states in every layer.
With `scan_layers` the prompts are a scanned input (in_axes 0) of the layer scan.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ptuning.model import mixed_einsum
from ptuning.model.batch_broadcast import broadcast_batch
from ptuning.model.config import T5Config
from ptuning.model.flash_attention import PaddedBias, even_rows, key_lengths_of
from ptuning.model.layers import (ATTENTION_NAME, MASK_VALUE, P, Dense, MlpBlock,
                                  MultiHeadAttention, RelativePositionBias, RMSNorm, constrain)

Array = jax.Array

LAYER_PROMPT_MODES = ("replace", "add")

_policies = jax.checkpoint_policies
# The dot policies also save the named low-precision products of `mixed_einsum` (a custom VJP,
# which the dot policies cannot see into: without the names they would recompute everything),
# and 'dots' the output of attention (a custom VJP, or the CPU kernel: no dot either).
_SAVE_DOTS = _policies.save_from_both_policies(
    _policies.checkpoint_dots,
    _policies.save_only_these_names(mixed_einsum.BATCHED_NAME, mixed_einsum.UNBATCHED_NAME,
                                    ATTENTION_NAME))
_SAVE_UNBATCHED_DOTS = _policies.save_from_both_policies(
    _policies.dots_with_no_batch_dims_saveable,
    _policies.save_only_these_names(mixed_einsum.UNBATCHED_NAME))
REMAT_POLICY_FNS = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": _SAVE_DOTS,
    "dots_with_no_batch_dims": _SAVE_UNBATCHED_DOTS,
    "minimal": _SAVE_UNBATCHED_DOTS,
}


def _dtypes(cfg: T5Config) -> dict:
  return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _norm(cfg: T5Config, name: str) -> RMSNorm:
  return RMSNorm(cfg.layer_norm_epsilon, output_barrier=cfg.norm_barrier, name=name,
                 **_dtypes(cfg))


def apply_layer_prompt(x: Array, prompt: Array, mode: str, offset: int = 0) -> Array:
  """`x [B, L, E]`, `prompt [P, E] | [B, P, E]` -> x with rows `[:, offset:offset+P]` replaced /
  added to."""
  prompt = prompt.astype(x.dtype)
  if prompt.ndim == 2:  # shared by the batch: its gradient's batch sum as a matmul
    prompt = broadcast_batch(prompt, x.shape[0])
  prompt = jnp.broadcast_to(prompt, (x.shape[0],) + prompt.shape[-2:])
  end = offset + prompt.shape[1]
  rows = prompt if mode == "replace" else x[:, offset:end] + prompt
  pieces = ([x[:, :offset]] if offset else []) + [rows, x[:, end:]]
  return constrain(jnp.concatenate(pieces, axis=1), ("batch", "length", "embed"))


def _check_layer_prompts(layer_prompts: Array, mode: str, num_layers: int, embeds_shape,
                         offset: int = 0) -> None:
  batch, length, width = embeds_shape
  shape = tuple(layer_prompts.shape)
  if mode not in LAYER_PROMPT_MODES:
    raise ValueError(f"unknown layer_prompt_mode {mode!r}; choose from {LAYER_PROMPT_MODES}")
  if (len(shape) not in (3, 4) or shape[0] != num_layers or shape[-1] != width
      or (len(shape) == 4 and shape[1] != batch) or offset < 0 or offset + shape[-2] > length):
    raise ValueError(f"layer_prompts of shape {shape} do not fit [{num_layers}, P, {width}] or "
                     f"[{num_layers}, {batch}, P, {width}] with offset {offset} + P <= input "
                     f"length {length}")


class EncoderLayer(nn.Module):
  """Pre-norm self-attention + MLP; `(x [B, L, E], bias [B|1, H, L, L] | PaddedBias) -> (x, None)`.

  `prompt [P, E] | [B, P, E]` (optional) first replaces / is added to
  `x[:, prompt_offset:prompt_offset+P]` (`prompt_mode`).
  """

  cfg: T5Config
  deterministic: bool = True
  prompt_mode: str = "replace"
  prompt_offset: int = 0

  @nn.compact
  def __call__(self, x: Array, bias: Array, prompt: Array | None = None):
    cfg, dt = self.cfg, _dtypes(self.cfg)
    if prompt is not None:
      x = apply_layer_prompt(x, prompt, self.prompt_mode, self.prompt_offset)
    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    h = _norm(cfg, "pre_attention_layer_norm")(x)
    h = MultiHeadAttention(cfg.num_heads, cfg.d_kv, cfg.dropout_rate, deterministic=self.deterministic,
                           attention_impl=cfg.attention_impl, name="attention", **dt)(h, h, bias)
    x = x + dropout(h)
    h = _norm(cfg, "pre_mlp_layer_norm")(x)
    h = MlpBlock(cfg.d_ff, cfg.feed_forward, cfg.dropout_rate, self.deterministic, name="mlp", **dt)(h)
    x = constrain(x + dropout(h), ("batch", "length", "embed"))
    return x, None


class DecoderLayer(nn.Module):
  """Pre-norm causal self-attention, cross-attention, MLP; `x [B, T, E] -> (x, None)`."""

  cfg: T5Config
  deterministic: bool = True
  decode: bool = False
  max_decode_length: int | None = None

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array,
               decode_position: Array | None = None):
    cfg, dt = self.cfg, _dtypes(self.cfg)
    dropout = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)
    attention = functools.partial(MultiHeadAttention, cfg.num_heads, cfg.d_kv, cfg.dropout_rate,
                                  deterministic=self.deterministic,
                                  attention_impl=cfg.attention_impl, **dt)
    h = _norm(cfg, "pre_self_attention_layer_norm")(x)
    h = attention(name="self_attention")(h, h, self_bias, decode=self.decode,
                                         decode_position=decode_position,
                                         max_decode_length=self.max_decode_length)
    x = x + dropout(h)
    h = _norm(cfg, "pre_cross_attention_layer_norm")(x)
    h = attention(is_cross=True, name="encoder_decoder_attention")(h, encoded, cross_bias,
                                                                   decode=self.decode)
    x = x + dropout(h)
    h = _norm(cfg, "pre_mlp_layer_norm")(x)
    h = MlpBlock(cfg.d_ff, cfg.feed_forward, cfg.dropout_rate, self.deterministic, name="mlp", **dt)(h)
    x = constrain(x + dropout(h), ("batch", "length", "embed"))
    return x, None


def _stack(layer_cls, cfg: T5Config, num_layers: int, num_broadcast_args: int,
           num_scanned_args: int = 0, **layer_kwargs):
  """Returns a callable applying `num_layers` layers: unrolled `layers_{i}` or one `nn.scan`.

  The callable takes `(x, *args)`: the first `num_broadcast_args` args go to every layer as they
  are; the next `num_scanned_args` have a leading `[num_layers]` axis and layer i gets slice i
  (an `nn.scan` input with in_axes 0 when scanned).
  """
  if cfg.remat_policy != "none":
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICY_FNS[cfg.remat_policy],
                         prevent_cse=not cfg.scan_layers)
  if cfg.scan_layers:
    scanned = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 1},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast,) * num_broadcast_args + (0,) * num_scanned_args,
                      length=num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    layer = scanned(cfg, name="layers", **layer_kwargs)
    return lambda x, *args: layer(x, *args)[0]

  layers = [layer_cls(cfg, name=f"layers_{i}", **layer_kwargs) for i in range(num_layers)]

  def apply(x, *args):
    shared, per_layer = args[:num_broadcast_args], args[num_broadcast_args:]
    for i, layer in enumerate(layers):
      x, _ = layer(x, *shared, *(a[i] for a in per_layer))
    return x
  return apply


def encoder_rows(cfg: T5Config, embeds: Array, mask: Array) -> tuple[Array, Array]:
  """The encoder's input rows as the attention wants them: `embeds [B, L, E]`, `mask [B, L]`
  unchanged, or with `attention_impl='cudnn'` one masked row more if L is odd
  (`flash_attention.even_rows`: cuDNN takes even lengths)."""
  return even_rows(embeds, mask) if cfg.attention_impl == "cudnn" else (embeds, mask)


def attention_mask_bias(query_mask: Array | None, key_mask: Array) -> Array:
  """`key_mask [B, K]` (1 = visible) -> additive float32 bias `[B, 1, 1, K]`."""
  del query_mask  # Padded queries attend normally; their outputs are ignored downstream.
  return jnp.where(key_mask[:, None, None, :] > 0, 0.0, MASK_VALUE).astype(jnp.float32)


class Encoder(nn.Module):
  """`embeds [B, L, E], mask [B, L] -> encoded [B, L, E]` (bidirectional, relative positions).

  Optional `layer_prompts [N, P, E] | [N, B, P, E]`: per-layer prompts on rows `[:P]` of every
  layer's input (`[k:k+P]` with `layer_prompt_offset=k`), `layer_prompt_mode` 'replace' | 'add'
  (see the module docstring).
  """

  cfg: T5Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, embeds: Array, mask: Array, layer_prompts: Array | None = None,
               layer_prompt_mode: str = "replace", layer_prompt_offset: int = 0) -> Array:
    cfg = self.cfg
    scanned_args = ()
    if layer_prompts is not None:
      _check_layer_prompts(layer_prompts, layer_prompt_mode, cfg.num_encoder_layers, embeds.shape,
                           layer_prompt_offset)
      scanned_args = (layer_prompts,)
    length = embeds.shape[1]
    positions = jnp.arange(length, dtype=jnp.int32)
    bias = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                cfg.relative_attention_max_distance, bidirectional=True,
                                param_dtype=jnp.dtype(cfg.param_dtype), name="relpos_bias")(
                                    positions, positions)
    if cfg.attention_impl == "cudnn":  # shared by the batch, padding as key lengths
      bias = PaddedBias(bias, key_lengths_of(mask))
    else:
      bias = bias + attention_mask_bias(None, mask)
    x = nn.Dropout(cfg.dropout_rate)(embeds, deterministic=self.deterministic)
    x = constrain(x.astype(jnp.dtype(cfg.dtype)), ("batch", "length", "embed"))
    x = _stack(EncoderLayer, cfg, cfg.num_encoder_layers, 1, len(scanned_args),
               deterministic=self.deterministic, prompt_mode=layer_prompt_mode,
               prompt_offset=layer_prompt_offset)(
                   x, bias, *scanned_args)
    x = _norm(cfg, "encoder_norm")(x)
    return nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)


class Decoder(nn.Module):
  """`decoder_embeds [B, T, E]` attending to `encoded [B, L, E]` -> logits `[B, T, V]` float32.

  With `decode=True`, `decoder_embeds` is one step `[B, 1, E]` and the self-attention caches
  plus a scalar `position` live in the 'cache' collection.
  """

  cfg: T5Config
  deterministic: bool = True
  decode: bool = False
  max_decode_length: int | None = None

  @nn.compact
  def __call__(self, decoder_embeds: Array, encoded: Array, encoder_mask: Array,
               shared_embedding: Array | None) -> Array:
    cfg = self.cfg
    relpos = RelativePositionBias(cfg.num_heads, cfg.relative_attention_num_buckets,
                                  cfg.relative_attention_max_distance, bidirectional=False,
                                  param_dtype=jnp.dtype(cfg.param_dtype), name="relpos_bias")
    length = decoder_embeds.shape[1]
    decode_position = None
    if self.decode and self.has_variable("cache", "position"):
      # One step: the query sits at `position`, keys are the whole cache (future ones masked).
      position_var = self.variable("cache", "position", jnp.zeros, (), jnp.int32)
      decode_position = position_var.value
      key_positions = jnp.arange(self.max_decode_length, dtype=jnp.int32)
      self_bias = relpos(decode_position[None], key_positions)
      self_bias = self_bias + jnp.where(key_positions <= decode_position, 0.0, MASK_VALUE)
      position_var.value = decode_position + length
    else:
      if self.decode:  # Cache initialisation call: create the position counter at 0.
        self.variable("cache", "position", jnp.zeros, (), jnp.int32)
      positions = jnp.arange(length, dtype=jnp.int32)
      causal = positions[None, :] <= positions[:, None]
      self_bias = relpos(positions, positions) + jnp.where(causal, 0.0, MASK_VALUE)
    cross_bias = attention_mask_bias(None, encoder_mask)

    x = nn.Dropout(cfg.dropout_rate)(decoder_embeds, deterministic=self.deterministic)
    x = constrain(x.astype(jnp.dtype(cfg.dtype)), ("batch", "length", "embed"))
    x = _stack(DecoderLayer, cfg, cfg.num_decoder_layers, 4, deterministic=self.deterministic,
               decode=self.decode, max_decode_length=self.max_decode_length)(
                   x, encoded, self_bias, cross_bias, decode_position)
    x = _norm(cfg, "decoder_norm")(x)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
    if cfg.tie_embeddings:
      x = x * (cfg.d_model ** -0.5)
      logits = mixed_einsum.einsum("bte,ve->btv", x, shared_embedding, jnp.float32, x.dtype)
    else:
      logits = LogitsDense(cfg.vocab_size, name="logits_dense", **_dtypes(cfg))(x)
    return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class LogitsDense(nn.Module):
  """Untied LM head `[B, T, E] -> [B, T, V]`, accumulated in float32."""

  vocab_size: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", P(nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"),
                                    ("embed", "vocab")), (x.shape[-1], self.vocab_size),
                        self.param_dtype)
    return mixed_einsum.einsum("bte,ev->btv", x, kernel, jnp.float32, self.dtype)


class EncoderDecoder(nn.Module):
  """The frozen backbone. Tokens are int32 with 0 = padding (also the decoder start token)."""

  cfg: T5Config
  deterministic: bool = True
  decode: bool = False
  max_decode_length: int | None = None

  def setup(self):
    cfg = self.cfg
    self.token_embedder = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        embedding_init=P(nn.initializers.normal(stddev=1.0), ("vocab", "embed")))
    self.encoder = Encoder(cfg, self.deterministic)
    self.decoder = Decoder(cfg, self.deterministic, self.decode, self.max_decode_length)

  def embed(self, tokens: Array) -> Array:
    """`[B, L] int -> [B, L, E]` in the activation dtype."""
    return constrain(self.token_embedder(tokens), ("batch", "length", "embed"))

  def encode_embeddings(self, embeds: Array, mask: Array, layer_prompts: Array | None = None,
                        layer_prompt_mode: str = "replace", layer_prompt_offset: int = 0) -> Array:
    """`embeds [B, L, E], mask [B, L] -> encoded [B, L, E]`; optional per-layer prompts
    `layer_prompts [N, P, E] | [N, B, P, E]` ('replace' | 'add' rows `[k:k+P]` of every layer's
    input, k = `layer_prompt_offset`)."""
    return self.encoder(embeds, mask, layer_prompts, layer_prompt_mode, layer_prompt_offset)

  def encode(self, encoder_input_tokens: Array) -> Array:
    return self.encoder(self.embed(encoder_input_tokens), encoder_input_tokens > 0)

  def decode_logits(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array) -> Array:
    """Teacher-forced (or, with `decode=True`, one cached step of) decoding -> `[B, T, V]` f32.

    `encoded [N, L, E]`, `encoder_mask [N, L]`, `decoder_input_tokens [B, T]` with `B = N * G`:
    decoder rows `i * G ... i * G + G - 1` read encoder row `i` (G = 1: one each), exactly as
    with the encoder rows repeated G times (`jnp.repeat(encoded, G, axis=0)`) but with each
    row's cross-attention keys and values computed once (G candidates of one input)."""
    if decoder_input_tokens.shape[0] % encoded.shape[0] or (
        self.decode and decoder_input_tokens.shape[0] != encoded.shape[0]):
      raise ValueError(f"decoder_input_tokens {decoder_input_tokens.shape}: its batch must be a "
                       f"multiple of encoded {encoded.shape}'s (equal when decoding)")
    return self.decoder(self.embed(decoder_input_tokens), encoded, encoder_mask,
                        self.token_embedder.embedding)

  def forward_embeddings(self, embeds: Array, mask: Array, decoder_input_tokens: Array) -> Array:
    """`embeds [B, L, E]`, `mask [B, L]`, `decoder_input_tokens [B, T]` -> logits `[B, T, V]`."""
    embeds, mask = encoder_rows(self.cfg, embeds, mask)
    return self.decode_logits(self.encode_embeddings(embeds, mask), mask, decoder_input_tokens)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array) -> Array:
    """Token ids in, logits `[B, T, V]` float32 out; padding (id 0) masked in the encoder."""
    mask = encoder_input_tokens > 0
    return self.forward_embeddings(self.embed(encoder_input_tokens), mask, decoder_input_tokens)
