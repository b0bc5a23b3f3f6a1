"""Beam search and sampling (ptuning.model.search) against transformers' generate() and by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

from ptuning import sharding
from ptuning.checkpoints.load import load_backbone
from ptuning.model import decoding, search
from ptuning.model.t5 import EncoderDecoder

FLAVOURS = {
    "t5_original": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5_1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "ul2_style": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False),
}
VOCAB = 40
MAX_NEW = 9
BEAMS = 4


def tiny_hf_model(flavour: str, seed: int) -> transformers.T5ForConditionalGeneration:
  """A random T5 with sharp logits and an EOS logit of wide spread, so beams end at many lengths.

  Both stacks have 2 layers: generate() sizes its cache by the encoder depth.
  """
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
      num_decoder_layers=2, relative_attention_num_buckets=32, relative_attention_max_distance=128,
      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
      **FLAVOURS[flavour])
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "relative_attention_bias" in name:
        param.normal_(0.0, 1.0)
    if not config.scale_decoder_outputs:  # untied head (see tests/test_model_parity.py)
      model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.5)
    model.lm_head.weight[1] *= 2.5
  return model


def padded_batch(rng: np.random.Generator, batch: int, max_len: int, min_len: int = 3):
  lengths = rng.integers(min_len, max_len + 1, size=batch)
  lengths[0] = max_len
  tokens = np.zeros((batch, max_len), np.int64)
  for i, n in enumerate(lengths):
    tokens[i, :n - 1] = rng.integers(2, VOCAB, size=n - 1)
    tokens[i, n - 1] = 1
  return tokens


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """flavour -> (HF model, checkpoint path, cfg, params); built and loaded once."""
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  out = {}
  for seed, flavour in enumerate(sorted(FLAVOURS)):
    hf_model, path = tiny_hf_model(flavour, seed + 11), tmp_path_factory.mktemp(flavour)
    hf_model.save_pretrained(path, safe_serialization=True)
    out[flavour] = (hf_model, path, *load_backbone(path, mesh))
  return out


@pytest.fixture(scope="module")
def inputs():
  return padded_batch(np.random.default_rng(5), 5, 11)


def encode(cfg, params, inputs):
  tokens = jnp.asarray(inputs, jnp.int32)
  return EncoderDecoder(cfg).apply({"params": params}, tokens, method=EncoderDecoder.encode), tokens > 0


def hf_generate(hf_model, inputs, **kwargs):
  with torch.no_grad():
    return hf_model.generate(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs != 0),
                             max_new_tokens=MAX_NEW, do_sample=False, min_length=0,
                             early_stopping=False, **kwargs)


def hf_tokens(sequences: np.ndarray) -> np.ndarray:
  """HF rows (start token first, EOS-filled after EOS, cropped) -> ours: 0 after EOS, width MAX_NEW."""
  seqs = np.asarray(sequences)[:, 1:]
  after_eos = np.cumsum(np.cumsum(seqs == 1, axis=1), axis=1) > 1
  return np.pad(np.where(after_eos, 0, seqs), ((0, 0), (0, MAX_NEW - seqs.shape[1])))


def generated_lengths(tokens: np.ndarray) -> np.ndarray:
  """Tokens up to and including the first EOS (the full width when there is none)."""
  has_eos = (tokens == 1).any(-1)
  return np.where(has_eos, (tokens == 1).argmax(-1) + 1, tokens.shape[-1])


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_beam_search_matches_generate(models, inputs, flavour):
  hf_model, _, cfg, params = models[flavour]
  encoded, mask = encode(cfg, params, inputs)
  lengths = []
  for alpha in (1.0, 0.0, 2.0, -0.5):
    tokens, scores = search.beam_search(cfg, params, encoded, mask, MAX_NEW, num_beams=BEAMS,
                                        length_penalty=alpha)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    best = hf_generate(hf_model, inputs, num_beams=BEAMS, length_penalty=alpha)
    np.testing.assert_array_equal(tokens[:, 0], hf_tokens(best.numpy()), err_msg=f"alpha={alpha}")
    out = hf_generate(hf_model, inputs, num_beams=BEAMS, length_penalty=alpha,
                      num_return_sequences=BEAMS, output_scores=True, return_dict_in_generate=True)
    np.testing.assert_array_equal(tokens.reshape(-1, MAX_NEW), hf_tokens(out.sequences.numpy()),
                                  err_msg=f"alpha={alpha}")
    np.testing.assert_allclose(scores.reshape(-1), out.sequences_scores.numpy(), atol=1e-4, rtol=0)
    assert np.all(np.diff(scores, axis=1) <= 0)
    lengths.append(generated_lengths(tokens))
  lengths = np.concatenate(lengths)  # the inputs exercise both EOS-ended and max-length beams
  assert (lengths < MAX_NEW).any() and (lengths == MAX_NEW).any()


@pytest.mark.parametrize("style", ["hf", "t5x"])
def test_beam_scores_are_normalised_log_likelihoods(models, inputs, style):
  _, _, cfg, params = models["t5_1_1"]
  encoded, mask = encode(cfg, params, inputs)
  alpha = 0.6
  tokens, scores = search.beam_search(cfg, params, encoded, mask, MAX_NEW, num_beams=BEAMS,
                                      length_penalty=alpha, length_penalty_style=style)
  flat = jnp.asarray(tokens).reshape(-1, MAX_NEW)
  logits = EncoderDecoder(cfg).apply({"params": params}, jnp.repeat(jnp.asarray(inputs), BEAMS, 0),
                                     decoding.shift_right(flat))
  # Token 0 may be generated too (sequence_log_likelihood would skip it): mask by length instead.
  log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  picked = np.take_along_axis(log_probs, np.asarray(flat)[..., None], axis=-1)[..., 0]
  length = generated_lengths(np.asarray(flat))
  log_likelihood = np.where(np.arange(MAX_NEW) < length[:, None], picked, 0.0).sum(-1)
  length = length.astype(np.float64)
  penalty = length ** alpha if style == "hf" else ((5 + length) / 6) ** alpha
  np.testing.assert_allclose(np.asarray(scores).reshape(-1), log_likelihood / penalty, atol=1e-4)
  with pytest.raises(ValueError, match="length_penalty_style"):
    search.beam_search(cfg, params, encoded, mask, MAX_NEW, length_penalty_style="gnmt")


def test_beam_search_with_scanned_layers_and_one_beam(models, inputs):
  _, path, cfg, params = models["ul2_style"]
  encoded, mask = encode(cfg, params, inputs)
  expected = search.beam_search(cfg, params, encoded, mask, MAX_NEW, num_beams=BEAMS)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  scan_cfg, scan_params = load_backbone(path, mesh, scan_layers=True)
  scanned = search.beam_search(scan_cfg, scan_params, encoded, mask, MAX_NEW, num_beams=BEAMS)
  np.testing.assert_array_equal(np.asarray(scanned[0]), np.asarray(expected[0]))
  np.testing.assert_allclose(np.asarray(scanned[1]), np.asarray(expected[1]), atol=1e-5)
  # Without length normalisation a single beam is greedy search.
  one_beam, _ = search.beam_search(cfg, params, encoded, mask, MAX_NEW, num_beams=1, length_penalty=0.0)
  greedy = decoding.greedy_decode(cfg, params, encoded, mask, MAX_NEW)
  np.testing.assert_array_equal(np.asarray(one_beam[:, 0]), np.asarray(greedy))


def test_top_p_filter_keeps_smallest_nucleus_with_ties():
  def kept(probs, p):
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    return np.isfinite(np.asarray(search.top_p_filter(logits, p))).astype(int).tolist()

  probs = [0.1, 0.4, 0.2, 0.3]
  assert kept(probs, 0.3) == [0, 1, 0, 0]
  assert kept(probs, 0.4 - 1e-3) == [0, 1, 0, 0]
  assert kept(probs, 0.4 + 1e-3) == [0, 1, 0, 1]
  assert kept(probs, 0.65) == [0, 1, 0, 1]
  assert kept(probs, 0.75) == [0, 1, 1, 1]
  assert kept(probs, 0.95) == [1, 1, 1, 1]
  assert kept(probs, 1.0) == [1, 1, 1, 1]
  assert kept(probs, 0.0) == [0, 1, 0, 0]  # the most likely token always survives
  ties = [0.2, 0.3, 0.3, 0.2]
  assert kept(ties, 0.25) == [0, 1, 1, 0]  # the second 0.3 ties the nucleus' last token
  assert kept(ties, 0.7) == [1, 1, 1, 1]
  # Batched rows are filtered independently; already-masked (-inf) tokens stay masked.
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2, 0.0], [0.05, 0.05, 0.6, 0.3]], jnp.float32))
  out = np.isfinite(np.asarray(search.top_p_filter(logits, 0.7)))
  np.testing.assert_array_equal(out, [[1, 1, 0, 0], [0, 0, 1, 1]])
  np.testing.assert_array_equal(np.isfinite(np.asarray(search.top_p_filter(logits, 1.0))),
                                [[1, 1, 1, 0], [1, 1, 1, 1]])


def test_top_k_filter():
  logits = jnp.asarray([[1.0, 3.0, 2.0, 3.0, 0.0]])
  assert np.isfinite(np.asarray(search.top_k_filter(logits, 2))).tolist() == [[0, 1, 0, 1, 0]]
  assert np.isfinite(np.asarray(search.top_k_filter(logits, 3))).tolist() == [[0, 1, 1, 1, 0]]
  np.testing.assert_array_equal(np.asarray(search.top_k_filter(logits, 0)), np.asarray(logits))


@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_sample_limits_are_greedy_and_deterministic(models, inputs, flavour):
  _, _, cfg, params = models[flavour]
  encoded, mask = encode(cfg, params, inputs)
  greedy = np.asarray(decoding.greedy_decode(cfg, params, encoded, mask, MAX_NEW))
  key = jax.random.key(0)
  top1 = search.sample(cfg, params, encoded, mask, MAX_NEW, key, temperature=1.0, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1), greedy)
  cold = search.sample(cfg, params, encoded, mask, MAX_NEW, key, temperature=1e-6)
  np.testing.assert_array_equal(np.asarray(cold), greedy)
  zero = search.sample(cfg, params, encoded, mask, MAX_NEW, key, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(zero), greedy)
  first = np.asarray(search.sample(cfg, params, encoded, mask, MAX_NEW, key, temperature=2.0))
  again = np.asarray(search.sample(cfg, params, encoded, mask, MAX_NEW, key, temperature=2.0))
  other = np.asarray(search.sample(cfg, params, encoded, mask, MAX_NEW, jax.random.key(1),
                                   temperature=2.0))
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  after_eos = np.cumsum(np.cumsum(first == 1, axis=1), axis=1) > 1
  assert np.all(first[after_eos] == 0)


def expected_first_token_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
  """softmax(logits / T) restricted to the top-k, then to the smallest nucleus of mass >= top_p."""
  probs = np.exp(logits / temperature - np.max(logits / temperature))
  probs[np.argsort(-logits)[top_k:]] = 0.0
  probs /= probs.sum()
  order = np.argsort(-probs)
  mass_before = np.cumsum(probs[order]) - probs[order]
  probs[order[mass_before >= top_p]] = 0.0
  return probs / probs.sum()


def test_sample_first_token_frequencies(models, inputs):
  _, _, cfg, params = models["t5_original"]
  encoded, mask = encode(cfg, params, inputs[1:2])
  logits = np.asarray(EncoderDecoder(cfg).apply(
      {"params": params}, jnp.asarray(inputs[1:2]), jnp.zeros((1, 1), jnp.int32)))[0, 0]
  num_keys, top_k = 2000, 6
  keys = jax.random.split(jax.random.key(42), num_keys)
  draw = jax.jit(jax.vmap(
      lambda key, t, p: search.sample(cfg, params, encoded, mask, 1, key, t, top_k, p)[0, 0],
      in_axes=(0, None, None)))
  for temperature, top_p in ((3.0, 1.0), (1.5, 1.0), (3.0, 0.7)):
    expected = expected_first_token_probs(logits.astype(np.float64), temperature, top_k, top_p)
    counts = np.bincount(np.asarray(draw(keys, temperature, top_p)), minlength=VOCAB)
    support = expected > 0
    assert counts[~support].sum() == 0
    assert support.sum() >= 3, "the test needs a spread-out distribution"
    statistic, pvalue = scipy.stats.chisquare(counts[support], num_keys * expected[support])
    assert pvalue > 1e-3, (temperature, top_p, counts[support], num_keys * expected[support])


def test_decode_dispatch(models, inputs):
  _, _, cfg, params = models["t5_1_1"]
  encoded, mask = encode(cfg, params, inputs)
  greedy = np.asarray(decoding.greedy_decode(cfg, params, encoded, mask, MAX_NEW))
  np.testing.assert_array_equal(np.asarray(search.decode(cfg, params, encoded, mask, MAX_NEW)), greedy)
  beams, _ = search.beam_search(cfg, params, encoded, mask, MAX_NEW, num_beams=BEAMS)
  np.testing.assert_array_equal(
      np.asarray(search.decode(cfg, params, encoded, mask, MAX_NEW, "beam", num_beams=BEAMS)),
      np.asarray(beams[:, 0]))
  key = jax.random.key(3)
  np.testing.assert_array_equal(
      np.asarray(search.decode(cfg, params, encoded, mask, MAX_NEW, "sample", rng=key, top_k=5)),
      np.asarray(search.sample(cfg, params, encoded, mask, MAX_NEW, key, top_k=5)))
  with pytest.raises(ValueError, match="rng"):
    search.decode(cfg, params, encoded, mask, MAX_NEW, "sample")
  with pytest.raises(ValueError, match="method"):
    search.decode(cfg, params, encoded, mask, MAX_NEW, "nucleus")
