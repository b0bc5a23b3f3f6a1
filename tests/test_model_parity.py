"""Parity of our Flax backbone with transformers' PyTorch T5 on identical weights (float32, CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ptuning import sharding
from ptuning.checkpoints.load import load_backbone
from ptuning.model import decoding
from ptuning.model.layers import relative_position_bucket
from ptuning.model.t5 import EncoderDecoder

FLAVOURS = {
    "t5_original": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5_1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "ul2_style": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False),
}
VOCAB = 96


def tiny_hf_model(flavour: str, seed: int = 0, decoder_layers: int = 3
                  ) -> transformers.T5ForConditionalGeneration:
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
      num_decoder_layers=decoder_layers, relative_attention_num_buckets=32, relative_attention_max_distance=128,
      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
      **FLAVOURS[flavour])
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():  # HF's init makes tiny logits; widen the weights so tests are sharp.
    for name, param in model.named_parameters():
      if "relative_attention_bias" in name:
        param.normal_(0.0, 1.0)
    if not config.scale_decoder_outputs:
      # transformers 5 ties lm_head to the embedding at construction; T5 1.1 / UL2 checkpoints
      # have their own head, so give it distinct weights (save_pretrained then writes it).
      model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.5)
  assert (model.lm_head.weight is model.shared.weight) == bool(config.scale_decoder_outputs)
  return model


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def hf_checkpoint(request, tmp_path_factory):
  model = tiny_hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path, safe_serialization=True)
  return request.param, model, path


def padded_batch(rng: np.random.Generator, batch: int, max_len: int, min_len: int = 3):
  lengths = rng.integers(min_len, max_len + 1, size=batch)
  lengths[0] = max_len  # at least one full row; others padded
  tokens = np.zeros((batch, max_len), np.int64)
  for i, n in enumerate(lengths):
    tokens[i, :n - 1] = rng.integers(2, VOCAB, size=n - 1)
    tokens[i, n - 1] = 1  # EOS
  return tokens


def test_relative_position_buckets_match_transformers():
  relative = np.arange(-400, 401)[None, :]
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (16, 64), (64, 256)):
      ours = np.asarray(relative_position_bucket(jnp.asarray(relative, jnp.int32), bidirectional,
                                                 buckets, distance))
      theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
          torch.tensor(relative), bidirectional, buckets, distance).numpy()
      np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_transformers_with_padding(hf_checkpoint, scan_layers):
  flavour, hf_model, path = hf_checkpoint
  rng = np.random.default_rng(1)
  inputs, targets = padded_batch(rng, 4, 17), padded_batch(rng, 4, 7)
  with torch.no_grad():
    expected = hf_model(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs != 0),
                        labels=torch.tensor(targets)).logits.numpy()
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  cfg, params = load_backbone(path, mesh, scan_layers=scan_layers)
  assert cfg.feed_forward == FLAVOURS[flavour]["feed_forward_proj"]
  decoder_inputs = decoding.shift_right(jnp.asarray(targets, jnp.int32))
  ours = EncoderDecoder(cfg).apply({"params": params}, jnp.asarray(inputs, jnp.int32), decoder_inputs)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_greedy_decoding_matches_generate(flavour, tmp_path):
  # transformers' generate() sizes its cache by the encoder depth: keep both stacks equal here.
  hf_model, path = tiny_hf_model(flavour, seed=4, decoder_layers=2), tmp_path
  hf_model.save_pretrained(path, safe_serialization=True)
  inputs = padded_batch(np.random.default_rng(2), 3, 12)
  max_new = 10
  with torch.no_grad():
    expected = hf_model.generate(input_ids=torch.tensor(inputs),
                                 attention_mask=torch.tensor(inputs != 0), max_new_tokens=max_new,
                                 do_sample=False, num_beams=1, min_length=0).numpy()[:, 1:]
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  cfg, params = load_backbone(path, mesh)
  tokens = jnp.asarray(inputs, jnp.int32)
  model = EncoderDecoder(cfg)
  encoded = model.apply({"params": params}, tokens, method=EncoderDecoder.encode)
  ours = np.asarray(jax.jit(decoding.greedy_decode, static_argnums=(0, 4))(
      cfg, params, encoded, tokens > 0, max_new))
  ours = ours[:, :expected.shape[1]]
  np.testing.assert_array_equal(ours, np.pad(expected, ((0, 0), (0, ours.shape[1] - expected.shape[1]))))


def test_cached_decoding_equals_teacher_forcing(hf_checkpoint):
  """Step-by-step logits with the cache equal one full teacher-forced pass, scanned too."""
  _, _, path = hf_checkpoint
  rng = np.random.default_rng(3)
  inputs, targets = padded_batch(rng, 2, 9), padded_batch(rng, 2, 6, min_len=6)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  for scan in (False, True):
    cfg, params = load_backbone(path, mesh, scan_layers=scan)
    tokens = jnp.asarray(inputs, jnp.int32)
    decoder_inputs = decoding.shift_right(jnp.asarray(targets, jnp.int32))
    full = EncoderDecoder(cfg).apply({"params": params}, tokens, decoder_inputs)
    encoded = EncoderDecoder(cfg).apply({"params": params}, tokens, method=EncoderDecoder.encode)
    cache = decoding.init_cache(cfg, params, encoded, tokens > 0, targets.shape[1])
    for t in range(targets.shape[1]):
      step_logits, cache = decoding.decode_step(cfg, params, cache, encoded, tokens > 0,
                                                decoder_inputs[:, t], targets.shape[1])
      np.testing.assert_allclose(np.asarray(step_logits), np.asarray(full[:, t]), atol=1e-4,
                                 rtol=1e-4)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_candidates_sharing_one_encoding_match_transformers(hf_checkpoint, scan_layers):
  """Rank classification: `decode_logits(encoded [N, L, E], ..., targets [N * G, T])` (keys and
  values projected once per input) equals transformers run on the encoder outputs repeated per
  candidate; a batch that is not a multiple of N is refused, naming both shapes."""
  _, hf_model, path = hf_checkpoint
  rng = np.random.default_rng(5)
  group = 3
  inputs, targets = padded_batch(rng, 2, 11), padded_batch(rng, 2 * group, 5)
  with torch.no_grad():
    encoded_hf = hf_model.encoder(input_ids=torch.tensor(inputs),
                                  attention_mask=torch.tensor(inputs != 0)).last_hidden_state
    expected = hf_model(encoder_outputs=(encoded_hf.repeat_interleave(group, dim=0),),
                        attention_mask=torch.tensor(inputs != 0).repeat_interleave(group, dim=0),
                        labels=torch.tensor(targets)).logits.numpy()
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  cfg, params = load_backbone(path, mesh, scan_layers=scan_layers)
  model, tokens = EncoderDecoder(cfg), jnp.asarray(inputs, jnp.int32)
  encoded = model.apply({"params": params}, tokens, method=EncoderDecoder.encode)
  decoder_inputs = decoding.shift_right(jnp.asarray(targets, jnp.int32))
  ours = model.apply({"params": params}, encoded, tokens > 0, decoder_inputs,
                     method=EncoderDecoder.decode_logits)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=1e-4)
  with pytest.raises(ValueError, match=r"\(5, 5\).*\(2, 11, 32\)"):
    model.apply({"params": params}, encoded, tokens > 0, decoder_inputs[:5],
                method=EncoderDecoder.decode_logits)
