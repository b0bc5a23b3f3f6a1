"""End to end through the public entry points: `ptuning score`, `ptuning info`, and the real
T5X checkpoint loaded, exported to Hugging Face format and run by transformers."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ptuning import cli, sharding
from ptuning.checkpoints import hf, t5x
from ptuning.checkpoints.load import load_backbone
from ptuning.model import build, decoding
from ptuning.model.t5 import EncoderDecoder

T5X_TINY = "t5x_checkpoints/t5_1_1_tiny/checkpoint_3"


def single_device_mesh():
  return sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])


def hf_log_likelihood(model, inputs: list[int], targets: list[int]) -> float:
  with torch.no_grad():
    logits = model(input_ids=torch.tensor([inputs]), labels=torch.tensor([targets])).logits
  log_probs = torch.log_softmax(logits.double(), dim=-1)[0]
  return float(log_probs[torch.arange(len(targets)), torch.tensor(targets)].sum())


def test_score_command_equals_transformers_log_likelihood(tmp_path, shared_data):
  torch.manual_seed(0)
  config = transformers.T5Config(vocab_size=32128, d_model=32, d_kv=8, d_ff=48, num_heads=4,
                                 num_layers=2, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False, dropout_rate=0.0,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(config).eval()
  model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
  model.save_pretrained(tmp_path / "backbone", safe_serialization=True)
  vocab = shared_data / "t5_vocab" / "spiece.model"
  lines = [
      {"inputs": "sst2 sentence: a gripping, beautifully acted film", "targets": "positive"},
      {"inputs": "translate English to German: That is good.", "targets": "Das ist gut.",
       "id": 7},
      {"inputs": [8774, 296, 6, 48, 19, 332, 9125, 1], "targets": [32099, 5, 1]},
  ] + [{"inputs": f"question {i}: what is {i} plus {i}?", "targets": f"{2 * i}"} for i in range(20)]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))

  assert cli.main(["score", "--checkpoint", str(tmp_path / "backbone"), "--vocab", str(vocab),
                   "--inputs", str(tmp_path / "in.jsonl"), "--output",
                   str(tmp_path / "out.jsonl"), "--batch_size", "8"]) == 0
  rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert len(rows) == len(lines)
  tokenizer = transformers.T5Tokenizer.from_pretrained(str(vocab.parent), extra_ids=100)
  for line, row in zip(lines, rows):
    assert {k: v for k, v in row.items() if k != "score"} == line  # other fields kept
    ids = {f: line[f] if isinstance(line[f], list) else tokenizer(line[f]).input_ids
           for f in ("inputs", "targets")}
    expected = hf_log_likelihood(model, ids["inputs"], ids["targets"])
    assert row["score"] == pytest.approx(expected, abs=1e-3, rel=1e-5)


def test_score_rejects_bad_lines_and_keeps_output(tmp_path, shared_data):
  checkpoint = str(shared_data / T5X_TINY)
  (tmp_path / "out.jsonl").write_text("precious\n")
  (tmp_path / "bad.jsonl").write_text('{"inputs": [5, 1], "targets": [6, 1]}\n{"inputs": [5, 1]}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: missing required field 'targets'"):
    cli.main(["score", "--checkpoint", checkpoint, "--inputs", str(tmp_path / "bad.jsonl"),
              "--output", str(tmp_path / "out.jsonl")])
  assert (tmp_path / "out.jsonl").read_text() == "precious\n"
  (tmp_path / "text.jsonl").write_text('{"inputs": "hello", "targets": "world"}\n')
  with pytest.raises(ValueError, match="needs a vocabulary"):
    cli.main(["score", "--checkpoint", checkpoint, "--inputs", str(tmp_path / "text.jsonl"),
              "--output", str(tmp_path / "out.jsonl")])


def test_wrong_preset_for_checkpoint_names_the_mismatch(shared_data):
  with pytest.raises(ValueError, match=r"d_model: config 512 vs checkpoint 4"):
    load_backbone(shared_data / T5X_TINY, single_device_mesh(), "t5_1_1_small")


def test_real_t5x_checkpoint_loads_exactly_and_exports_to_transformers(tmp_path, shared_data):
  path = shared_data / T5X_TINY
  stored = t5x.read_t5x_checkpoint(path)
  cfg, params = load_backbone(path, single_device_mesh())
  loaded = build.host_params(params)
  assert set(loaded) == set(stored) and len(stored) == 52
  for key, array in stored.items():
    np.testing.assert_array_equal(loaded[key], array, err_msg=key)

  hf.write_hf_checkpoint(loaded, cfg, tmp_path / "hf")
  model, info = transformers.T5ForConditionalGeneration.from_pretrained(
      tmp_path / "hf", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  rng = np.random.default_rng(0)
  inputs = rng.integers(2, 32100, size=(3, 11))
  inputs[2, 6:] = 0
  targets = rng.integers(2, 32100, size=(3, 5))
  with torch.no_grad():
    expected = model.eval()(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs != 0),
                            labels=torch.tensor(targets)).logits.numpy()
  ours = EncoderDecoder(cfg).apply({"params": params}, jnp.asarray(inputs, jnp.int32),
                                   decoding.shift_right(jnp.asarray(targets, jnp.int32)))
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4, rtol=1e-4)


def test_info_command_reports_count_and_bytes_per_device():
  out = subprocess.run([sys.executable, "-m", "ptuning", "info", "--model", "t5_1_1_xxl",
                        "--mesh", "data=2,model=4"], capture_output=True, text=True, check=True).stdout
  assert "parameters: 11,135,332,352" in out
  per_device = int(out.split("parameter bytes per device: ")[1].split()[0].replace(",", ""))
  # Everything but norms / relpos tables / nothing else is split 4 ways over 'model'.
  assert 11_135_332_352 * 4 / 4 <= per_device * 1.01 and per_device < 11_135_332_352 * 4 / 3.9


def _score_grouped_and_line_by_line(rows_in, rows_tgt, monkeypatch):
  """(scores of `score_token_ids` with batch 6, the (inputs, rows) batch shapes of its calls,
  each line scored on its own) on a random tiny T5 1.1."""
  from ptuning import scoring, sharding
  from ptuning.model import build
  from ptuning.model.config import get_preset
  cfg = get_preset("tiny_t5_1_1")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  params = build.init_params(cfg, jax.random.key(0), mesh)
  calls = []
  real = scoring.make_score_fn

  def recording(cfg):
    fn = real(cfg)
    return lambda p, x, t: calls.append((x.shape[0], t.shape[0])) or fn(p, x, t)
  monkeypatch.setattr(scoring, "make_score_fn", recording)
  grouped = scoring.score_token_ids(cfg, params, rows_in, rows_tgt, batch_size=6)
  grouped_calls = list(calls)
  one_by_one = [scoring.score_token_ids(cfg, params, [x], [t], batch_size=1)[0]
                for x, t in zip(rows_in, rows_tgt)]
  return grouped, grouped_calls, one_by_one


def test_score_command_encodes_each_input_once_for_its_candidates(tmp_path, monkeypatch):
  """Lines that come as G candidates of one input are scored with that input encoded once per
  call (batch_size // G inputs, G candidates each), with the same scores as line by line."""
  from ptuning import scoring
  assert scoring.candidate_group_size([1, 1, 2, 2, 3, 3]) == 2
  assert scoring.candidate_group_size([1, 1, 2, 3, 3]) == 2  # the run of 1 is padded to 2
  assert scoring.candidate_group_size([1, 2, 1]) == 1
  assert scoring.candidate_group_size([7] * 10 + [1, 2, 3, 4, 5, 6]) == 1  # 70 slots for 16 rows
  rng = np.random.default_rng(0)
  inputs = [rng.integers(2, 500, n).tolist() + [1] for n in (5, 9, 3, 7, 4)]
  candidates = [[rng.integers(2, 500, n).tolist() + [1] for n in (1, 3, 2)] for _ in inputs]
  rows_in = [row for row in inputs for _ in range(3)]
  rows_tgt = [c for per_input in candidates for c in per_input]
  grouped, calls, one_by_one = _score_grouped_and_line_by_line(rows_in, rows_tgt, monkeypatch)
  assert calls == [(2, 6)] * 3  # 5 inputs x 3 candidates, 2 inputs per call
  np.testing.assert_allclose(grouped, one_by_one, rtol=1e-5, atol=1e-5)
  assert len(set(np.round(grouped, 3))) > 5


def test_score_command_pads_candidate_groups_of_different_sizes(tmp_path, monkeypatch):
  """Inputs with 3, 1 and 2 candidates: each input encoded once, groups padded to 3 slots, and
  every line scored as on its own (padding slots dropped, order kept)."""
  rng = np.random.default_rng(1)
  sizes = (3, 1, 2, 2, 3)
  inputs = [rng.integers(2, 500, n).tolist() + [1] for n in (5, 9, 3, 7, 4)]
  rows_in = [x for x, n in zip(inputs, sizes) for _ in range(n)]
  rows_tgt = [rng.integers(2, 500, int(n)).tolist() + [1] for n in rng.integers(1, 4, len(rows_in))]
  grouped, calls, one_by_one = _score_grouped_and_line_by_line(rows_in, rows_tgt, monkeypatch)
  assert calls == [(2, 6)] * 3  # 5 inputs, 2 per call, 3 slots each
  np.testing.assert_allclose(grouped, one_by_one, rtol=1e-5, atol=1e-5)
  assert not np.isnan(grouped).any() and len(set(np.round(grouped, 3))) > 5
