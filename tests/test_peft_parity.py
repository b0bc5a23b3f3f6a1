"""Peer parity with HF PEFT prompt tuning: same frozen T5, same initial prompt, same batch.

PEFT's `PeftModelForSeq2SeqLM.forward` (peft 0.21.2) for PROMPT_TUNING prepends
`prompt_encoder[adapter].embedding.weight[:num_virtual_tokens]` to the encoder `inputs_embeds`,
prepends ones to `attention_mask`, and leaves the decoder alone (its inputs come from
shift-right of the labels inside T5). That is our `PromptTuning(placement='prefix')`, so the
loss and the gradient w.r.t. the prompt must agree, for every normalisation we offer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
import transformers

from ptuning import sharding
from ptuning.checkpoints.load import load_backbone
from ptuning.model import decoding
from ptuning.prompts.vanilla import PromptTuning
from ptuning.train import losses
from ptuning.train.step import StepSpec, loss_and_metrics

FLAVOURS = {
    "t5_original": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    "t5_1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
VOCAB = 96
D_MODEL = 32
PROMPT_LENGTH = 7


def tiny_hf_model(flavour: str, seed: int = 0) -> transformers.T5ForConditionalGeneration:
  torch.manual_seed(seed)
  config = transformers.T5Config(
      vocab_size=VOCAB, d_model=D_MODEL, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
      num_decoder_layers=2, relative_attention_num_buckets=32, relative_attention_max_distance=128,
      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
      **FLAVOURS[flavour])
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():  # widen HF's tiny init so that differences show
    for name, param in model.named_parameters():
      if "relative_attention_bias" in name:
        param.normal_(0.0, 1.0)
    if not config.tie_word_embeddings:
      # transformers 5 ties lm_head to `shared` at construction; T5 1.1 has its own head.
      model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.5)
  assert (model.lm_head.weight is model.shared.weight) == config.tie_word_embeddings
  return model


def padded_tokens(rng: np.random.Generator, lengths) -> np.ndarray:
  tokens = np.zeros((len(lengths), max(lengths)), np.int64)
  for i, n in enumerate(lengths):
    tokens[i, :n - 1] = rng.integers(2, VOCAB, size=n - 1)
    tokens[i, n - 1] = 1  # EOS
  return tokens


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def setup(request, tmp_path_factory):
  """(our cfg, our backbone params, PEFT model, prompt [P, E], numpy batch)."""
  flavour = request.param
  hf_model = tiny_hf_model(flavour)
  path = tmp_path_factory.mktemp(flavour)
  hf_model.save_pretrained(path, safe_serialization=True)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  cfg, params = load_backbone(path, mesh)
  assert cfg.feed_forward == FLAVOURS[flavour]["feed_forward_proj"]

  peft_model = peft.get_peft_model(hf_model, peft.PromptTuningConfig(
      task_type="SEQ_2_SEQ_LM", num_virtual_tokens=PROMPT_LENGTH, num_transformer_submodules=1))
  peft_model.eval()
  prompt = np.random.default_rng(7).normal(0.0, 1.0, (PROMPT_LENGTH, D_MODEL)).astype(np.float32)
  embedding = peft_model.prompt_encoder["default"].embedding
  assert tuple(embedding.weight.shape) == (PROMPT_LENGTH, D_MODEL)
  with torch.no_grad():
    embedding.weight.copy_(torch.from_numpy(prompt))

  rng = np.random.default_rng(3)
  inputs = padded_tokens(rng, [13, 6, 9, 4])
  targets = padded_tokens(rng, [7, 3, 5, 1])
  batch = {
      "encoder_input_tokens": inputs.astype(np.int32),
      "decoder_target_tokens": targets.astype(np.int32),
      "decoder_input_tokens": np.asarray(decoding.shift_right(jnp.asarray(targets, jnp.int32))),
      "decoder_loss_weights": (targets > 0).astype(np.int32),
  }
  return cfg, params, peft_model, prompt, batch


def peft_forward(peft_model, batch):
  """PEFT's (output, prompt parameter) with gradients cleared; labels use -100 at padding."""
  prompt_param = peft_model.prompt_encoder["default"].embedding.weight
  peft_model.zero_grad(set_to_none=True)
  inputs = torch.tensor(batch["encoder_input_tokens"], dtype=torch.long)
  labels = torch.tensor(batch["decoder_target_tokens"], dtype=torch.long)
  labels = labels.masked_fill(labels == 0, -100)
  out = peft_model(input_ids=inputs, attention_mask=(inputs != 0).long(), labels=labels)
  return out, prompt_param


def our_loss_and_grad(cfg, params, prompt, batch, z_loss, normalizer):
  spec = StepSpec(model=cfg, method=PromptTuning(length=PROMPT_LENGTH),
                  optimizer=optax.sgd(0.1), z_loss=z_loss, label_smoothing=0.0,
                  loss_normalizing_factor=normalizer)
  jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
  factor, weights = losses.loss_normalizing_factor_and_weights(normalizer, jbatch)

  def loss_fn(p):
    loss, _ = loss_and_metrics({"prompt": {"prompt": p}}, {"backbone": params}, jbatch, None,
                               spec, factor, weights)
    return loss

  loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(prompt))
  return float(loss), np.asarray(grad)


def assert_grads_match(ours: np.ndarray, theirs: np.ndarray):
  ours, theirs = ours.astype(np.float64).ravel(), theirs.astype(np.float64).ravel()
  cosine = ours @ theirs / (np.linalg.norm(ours) * np.linalg.norm(theirs))
  assert cosine > 0.9999, cosine
  assert abs(np.linalg.norm(ours) / np.linalg.norm(theirs) - 1) < 1e-3, (
      np.linalg.norm(ours), np.linalg.norm(theirs))


def test_peft_setup_trains_only_the_prompt(setup):
  _, _, peft_model, _, batch = setup
  trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
  assert trainable == ["prompt_encoder.default.embedding.weight"], trainable
  out, prompt_param = peft_forward(peft_model, batch)
  out.loss.backward()
  assert prompt_param.grad is not None and torch.count_nonzero(prompt_param.grad) > 0
  for name, param in peft_model.named_parameters():
    if param is not prompt_param:
      assert param.grad is None, name
  # The prompt reaches the decoder only through the encoder: logits cover the targets only.
  assert tuple(out.logits.shape) == batch["decoder_target_tokens"].shape + (VOCAB,)


def test_loss_and_prompt_gradient_match_peft(setup):
  cfg, params, peft_model, prompt, batch = setup
  out, prompt_param = peft_forward(peft_model, batch)
  out.loss.backward()
  ours, grad = our_loss_and_grad(cfg, params, prompt, batch, 0.0, "NUM_REAL_TARGET_TOKENS")
  assert abs(ours - out.loss.item()) < 1e-4, (ours, out.loss.item())
  assert_grads_match(grad, prompt_param.grad.numpy())


def torch_loss(logits: torch.Tensor, targets: np.ndarray, z_loss: float,
               normalizer: str) -> torch.Tensor:
  """`ptuning.train.losses` written out independently in torch, from PEFT's logits."""
  targets = torch.tensor(targets, dtype=torch.long)
  mask = (targets > 0).to(logits.dtype)
  log_z = torch.logsumexp(logits, dim=-1)
  nll = log_z - logits.gather(-1, targets[..., None])[..., 0]
  per_token = (nll + z_loss * log_z**2) * mask  # [B, T]
  if normalizer == "NUM_REAL_TARGET_TOKENS":
    return per_token.sum() / mask.sum()
  assert normalizer == "AVERAGE_PER_SEQUENCE"
  per_sequence = per_token.sum(-1) / mask.sum(-1)  # mean NLL of each sequence
  return per_sequence.mean()  # every sequence here has a target token


@pytest.mark.parametrize("z_loss, normalizer", [
    (1e-4, "NUM_REAL_TARGET_TOKENS"),
    (0.0, "AVERAGE_PER_SEQUENCE"),
    (1e-4, "AVERAGE_PER_SEQUENCE"),
])
def test_normalisation_options_match_hand_written_torch_loss(setup, z_loss, normalizer):
  cfg, params, peft_model, prompt, batch = setup
  out, prompt_param = peft_forward(peft_model, batch)
  expected = torch_loss(out.logits, batch["decoder_target_tokens"], z_loss, normalizer)
  expected.backward()
  ours, grad = our_loss_and_grad(cfg, params, prompt, batch, z_loss, normalizer)
  assert abs(ours - expected.item()) < 1e-4, (ours, expected.item())
  assert_grads_match(grad, prompt_param.grad.numpy())
  # The variant really differs from the plain token mean (so the check has teeth).
  plain = out.loss.item()
  assert abs(expected.item() - plain) > 1e-3, (expected.item(), plain)
