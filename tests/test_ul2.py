"""UL2 denoisers: span statistics, reconstruction, mode tokens, prefix LM, lengths, mixture."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

import tasks.registry
from ptuning.gin_setup import load_config
from ptuning.vocab import get_vocabulary
from tasks import ul2

DOC_LENGTHS = {"inputs": 512, "targets": 512}  # UL2's pretraining lengths
BY_NAME = {d.name: d for d in ul2.UL2_DENOISERS}
SPAN_DENOISERS = [d for d in ul2.UL2_DENOISERS if not d.prefix_lm]
# Tolerances of the statistics over the whole of tinyshakespeare (~340k tokens per denoiser):
# the counts are right in expectation, so only sampling noise and the at-least-one-span floor
# on short chunks remain.
DENSITY_TOLERANCE = 0.005  # absolute
MEAN_SPAN_TOLERANCE = 0.05  # relative


@pytest.fixture(scope="module")
def vocab(shared_data):
  return get_vocabulary(shared_data / "t5_vocab" / "spiece.model")


@pytest.fixture(scope="module")
def shakespeare(shared_data) -> str:
  return (shared_data / "text" / "tinyshakespeare_input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def docs(shakespeare, tmp_path_factory) -> tuple[str, list[str]]:
  """tinyshakespeare as a .jsonl of ~6,000-character documents (cut at blank lines)."""
  docs, current = [], ""
  for speech in shakespeare.split("\n\n"):
    current = f"{current}\n\n{speech}" if current else speech
    if len(current) > 6000:
      docs.append(current)
      current = ""
  docs.append(current)
  path = tmp_path_factory.mktemp("ul2_docs") / "shakespeare.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
  return str(path), docs


@pytest.fixture(scope="module")
def lines_txt(shakespeare, tmp_path_factory) -> tuple[str, list[str]]:
  """The first 240 non-blank lines of tinyshakespeare as a .txt file (one example per line)."""
  lines = [line for line in shakespeare.splitlines() if line.strip()][:240]
  path = tmp_path_factory.mktemp("ul2_lines") / "lines.txt"
  path.write_text("\n\n".join(lines) + "\n", encoding="utf-8")  # blank lines are skipped
  return str(path), lines


def _examples(name: str, lengths, seed: int = 0, take: int | None = None) -> list[dict]:
  ds = seqio.get_mixture_or_task(name).get_dataset(lengths, shuffle=False, seed=seed)
  return list((ds.take(take) if take else ds).as_numpy_iterator())


@pytest.fixture(scope="module")
def doc_examples(docs, vocab) -> dict[str, list[dict]]:
  """Every denoiser's examples of the whole document file at UL2's 512/512 lengths."""
  ul2.register_ul2_tasks("ul2t_docs", ul2.text_file_source(docs[0]), vocab)
  return {d.name: _examples(f"ul2t_docs_{d.name}", DOC_LENGTHS) for d in ul2.UL2_DENOISERS}


def _is_sentinel(token: int, vocab) -> bool:
  return token >= vocab.vocab_size - vocab.extra_ids


def _undo_spans(example, vocab, mode_ids) -> tuple[list[int], list[bool], list[int]]:
  """(original tokens, noise mask, sentinels in order) of a span-corruption example."""
  inputs, targets = example["inputs"].tolist(), example["targets"].tolist()
  assert inputs[-1] == targets[-1] == vocab.eos_id
  assert inputs[:len(mode_ids)] == mode_ids
  inputs, targets = inputs[len(mode_ids):-1], targets[:-1]
  assert _is_sentinel(targets[0], vocab)
  spans: list[tuple[int, list[int]]] = []
  for token in targets:
    if _is_sentinel(token, vocab):
      spans.append((token, []))
    else:
      spans[-1][1].append(token)
  tokens, mask, used = [], [], 0
  for token in inputs:
    if _is_sentinel(token, vocab):
      sentinel, span = spans[used]
      assert token == sentinel and span, "inputs' sentinels must match the targets' in order"
      tokens += span
      mask += [True] * len(span)
      used += 1
    else:
      tokens.append(token)
      mask.append(False)
  assert used == len(spans)
  return tokens, mask, [sentinel for sentinel, _ in spans]


def test_span_statistics_match_configuration(doc_examples, vocab):
  for denoiser in SPAN_DENOISERS:
    mode_ids = vocab.encode(denoiser.mode_token)
    noise = total = spans = 0
    halves = np.zeros(2)
    span_lengths = []
    for example in doc_examples[denoiser.name]:
      _, mask, sentinels = _undo_spans(example, vocab, mode_ids)
      noise, total, spans = noise + sum(mask), total + len(mask), spans + len(sentinels)
      half = len(mask) // 2
      halves += [sum(mask[:half]) / half, sum(mask[half:]) / (len(mask) - half)]
      runs = np.diff(np.flatnonzero(np.diff(np.r_[0, np.asarray(mask, int), 0])))[::2]
      span_lengths += runs.tolist()
    density, mean_span = noise / total, noise / spans
    halves /= len(doc_examples[denoiser.name])
    print(f"{denoiser.name}: {len(doc_examples[denoiser.name])} examples, {total} tokens; "
          f"noise density {density:.4f} (configured {denoiser.noise_density}), mean span "
          f"{mean_span:.2f} (configured {denoiser.mean_span_length}); density by chunk half "
          f"{halves.round(3).tolist()}")
    assert abs(density - denoiser.noise_density) <= DENSITY_TOLERANCE
    assert abs(mean_span / denoiser.mean_span_length - 1) <= MEAN_SPAN_TOLERANCE
    assert sum(span_lengths) == noise and len(span_lengths) == spans
    assert abs(halves[0] - halves[1]) < 0.03  # spans are placed evenly, not at the end
    if denoiser.mean_span_length <= 8:
      assert len(set(span_lengths)) > 3  # span lengths vary around the mean


def test_reconstruction_and_sentinels(doc_examples, docs, vocab):
  all_tokens = [t for doc in docs[1] for t in vocab.encode(doc)]
  extra_id = {i: vocab.encode(f"<extra_id_{i}>") for i in range(vocab.extra_ids)}
  for denoiser in SPAN_DENOISERS:
    mode_ids = vocab.encode(denoiser.mode_token)
    rebuilt, most = [], 0
    for example in doc_examples[denoiser.name]:
      tokens, _, sentinels = _undo_spans(example, vocab, mode_ids)
      assert sentinels == [vocab.vocab_size - 1 - i for i in range(len(sentinels))]
      assert all(extra_id[i] == [s] for i, s in enumerate(sentinels))
      rebuilt += tokens
      most = max(most, len(sentinels))
    assert rebuilt == all_tokens, denoiser.name  # every chunk, in order, nothing lost
    assert most <= vocab.extra_ids
    if denoiser.name == "x3_50":  # ~128 spans would fit 512 tokens: capped by the sentinels
      assert most >= 90


def test_mode_tokens_prefix_inputs(doc_examples, vocab):
  expected = {"r": "[NLU]", "x": "[NLG]", "s": "[S2S]"}
  for denoiser in ul2.UL2_DENOISERS:
    assert denoiser.mode_token == expected[denoiser.name[0]]
    mode_ids = vocab.encode(denoiser.mode_token)
    assert len(mode_ids) > 1  # "[NLU]" is several pieces of the T5 vocabulary
    for example in doc_examples[denoiser.name][:20]:
      assert example["inputs"][:len(mode_ids)].tolist() == mode_ids
      assert vocab.decode(example["inputs"].tolist()).startswith(denoiser.mode_token)


def test_mode_token_as_one_piece_or_none(lines_txt, shakespeare, tmp_path):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(shakespeare.splitlines()[:3000]), model_writer=model,
      vocab_size=400, user_defined_symbols=["[NLU]", "[NLG]", "[S2S]"], minloglevel=2)
  (tmp_path / "small.model").write_bytes(model.getvalue())
  small = get_vocabulary(tmp_path / "small.model")
  ul2.register_ul2_tasks("ul2t_small", ul2.text_file_source(lines_txt[0]), small,
                         inputs_length=64, targets_length=64)
  ul2.register_ul2_tasks("ul2t_nomode", ul2.text_file_source(lines_txt[0]), small,
                         inputs_length=64, targets_length=64, use_mode_tokens=False)
  for name, mode in (("x8_50", "[NLG]"), ("s", "[S2S]")):
    mode_ids, piece = small.encode(mode), small.tokenizer.piece_to_id(mode)
    assert mode_ids[-1] == piece and len(mode_ids) <= 2  # the piece (after a "▁" piece)
    with_mode = _examples(f"ul2t_small_{name}", None, take=30)  # lines fit whole either way
    without = _examples(f"ul2t_nomode_{name}", None, take=30)
    assert all(ex["inputs"][:len(mode_ids)].tolist() == mode_ids for ex in with_mode)
    assert not any(piece in ex["inputs"] for ex in without)
    for a, b in zip(with_mode, without):  # the same draws, without the mode tokens
      assert a["inputs"][len(mode_ids):].tolist() == b["inputs"].tolist()
      assert a["targets"].tolist() == b["targets"].tolist()


def test_prefix_lm_splits_at_random_points(doc_examples, docs, vocab):
  mode_ids = vocab.encode("[S2S]")
  rebuilt, splits = [], []
  for example in doc_examples["s"]:
    inputs, targets = example["inputs"].tolist(), example["targets"].tolist()
    assert inputs[-1] == targets[-1] == vocab.eos_id and inputs[:len(mode_ids)] == mode_ids
    prefix, suffix = inputs[len(mode_ids):-1], targets[:-1]
    assert prefix and suffix and not any(_is_sentinel(t, vocab) for t in prefix + suffix)
    rebuilt += prefix + suffix
    splits.append(len(prefix) / (len(prefix) + len(suffix)))
  assert rebuilt == [t for doc in docs[1] for t in vocab.encode(doc)]
  print(f"s: {len(splits)} examples, prefix fraction min {min(splits):.3f} "
        f"mean {np.mean(splits):.3f} max {max(splits):.3f}")
  assert len(set(splits)) > 0.9 * len(splits)
  assert min(splits) < 0.1 and max(splits) > 0.9 and abs(np.mean(splits) - 0.5) < 0.06


def test_examples_fit_lengths_and_lose_nothing(lines_txt, vocab):
  """Lengths SeqIO asks for override the registered 512/512; nothing is trimmed.

  At 24/16 the inputs bound the R chunks and the targets bound the X-50% ones.
  """
  lengths = {"inputs": 24, "targets": 16}
  ul2.register_ul2_tasks("ul2t_lines", ul2.text_file_source(lines_txt[0]), vocab, merge_texts=4)
  all_tokens = [t for line in lines_txt[1] for t in vocab.encode(line)]
  for denoiser in ul2.UL2_DENOISERS:
    mode_ids = vocab.encode(denoiser.mode_token)
    examples = _examples(f"ul2t_lines_{denoiser.name}", lengths)
    rebuilt = []
    for example in examples:
      assert len(example["inputs"]) <= lengths["inputs"]
      assert len(example["targets"]) <= lengths["targets"]
      if denoiser.prefix_lm:
        rebuilt += example["inputs"][len(mode_ids):-1].tolist() + example["targets"][:-1].tolist()
      else:
        rebuilt += _undo_spans(example, vocab, mode_ids)[0]
    assert rebuilt == all_tokens, denoiser.name
    longest = max(len(ex["inputs"]) for ex in examples), max(len(ex["targets"]) for ex in examples)
    print(f"{denoiser.name}: {len(examples)} examples, longest inputs/targets {longest}")
    assert lengths["inputs"] - 3 <= longest[0] or lengths["targets"] - 3 <= longest[1]


def test_short_texts_dropped_and_chunks_balanced(tmp_path, vocab):
  path = tmp_path / "short.txt"
  long_text = " ".join(["speak"] * 100)
  path.write_text(f"I\n{long_text}\nSpeak, speak.\n", encoding="utf-8")
  assert len(vocab.encode("I")) == 1 and len(vocab.encode(long_text)) == 100
  ul2.register_ul2_tasks("ul2t_short", ul2.text_file_source(path), vocab,
                         denoisers=[BY_NAME["r3_15"]], inputs_length=48, targets_length=48)
  mode_ids = vocab.encode("[NLU]")
  examples = _examples("ul2t_short_r3_15", None)  # the registered lengths
  chunks = [_undo_spans(ex, vocab, mode_ids)[0] for ex in examples]
  assert [t for c in chunks for t in c] == vocab.encode(long_text) + vocab.encode("Speak, speak.")
  sizes = [len(c) for c in chunks[:-1]]
  assert len(sizes) > 1 and max(sizes) - min(sizes) <= 1  # the 100-token text in equal parts


def test_mixture_rates(lines_txt, vocab, shared_data):
  name = ul2.register_ul2_tasks("ul2t_mix", ul2.text_file_source(lines_txt[0]), vocab,
                                inputs_length=32, targets_length=32, merge_texts=4)
  mixture = seqio.get_mixture_or_task(name)
  rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
  assert rates == pytest.approx({f"ul2t_mix_{d.name}": d.rate for d in ul2.UL2_DENOISERS})
  assert sum(rates.values()) == pytest.approx(1.0)
  assert BY_NAME["s"].rate == 0.2 and BY_NAME["r3_15"].rate == BY_NAME["r8_15"].rate == 0.2
  # Sampled examples follow the rates (R: [NLU], X: [NLG], S: [S2S]).
  modes = {mode: vocab.encode(mode) for mode in ("[NLU]", "[NLG]", "[S2S]")}
  counts = dict.fromkeys(modes, 0)
  for example in _examples(name, {"inputs": 32, "targets": 32}, seed=3, take=1000):
    (mode,) = [m for m, ids in modes.items() if example["inputs"][:len(ids)].tolist() == ids]
    counts[mode] += 1
  print(f"mode tokens in 1000 mixture examples: {counts}")
  for mode, share in (("[NLU]", 0.4), ("[NLG]", 0.4), ("[S2S]", 0.2)):
    assert abs(counts[mode] / 1000 - share) < 0.05  # > 3 standard deviations

  # Configurable rates, through gin: a 0 drops a denoiser, the rest are normalised.
  config = load_config(["runs/train.gin"], [
      "MODEL_DIR = '/tmp/unused'",
      f"VOCABULARY_PATH = '{shared_data / 't5_vocab' / 'spiece.model'}'",
      "MIXTURE_OR_TASK_NAME = @tasks.ul2_mixture()",
      f"tasks.ul2_mixture.text_files = ['{lines_txt[0]}']",
      "tasks.ul2_mixture.vocabulary_path = %VOCABULARY_PATH",
      "tasks.ul2_mixture.name = 'ul2t_gin'",
      "tasks.ul2_mixture.rates = {'s': 0.6, 'x3_50': 0}",
      "tasks.ul2_mixture.inputs_length = 32", "tasks.ul2_mixture.targets_length = 32"])
  assert config.mixture_or_task_name == "ul2t_gin"
  mixture = seqio.get_mixture_or_task("ul2t_gin")
  rates = {task.name: mixture.get_rate(task) for task in mixture.tasks}
  assert "ul2t_gin_x3_50" not in rates and len(rates) == 6
  assert rates["ul2t_gin_s"] == pytest.approx(0.6 / 1.3)  # 0.2 + 0.2 + 3 * 0.1 + 0.6
  assert rates["ul2t_gin_x8_50"] == pytest.approx(0.1 / 1.3)
  # Registering the same configuration again is a no-op.
  assert tasks.registry.ul2_mixture(lines_txt[0], str(shared_data / "t5_vocab" / "spiece.model"),
                                    name="ul2t_gin", rates={"s": 0.6, "x3_50": 0},
                                    inputs_length=32, targets_length=32) == "ul2t_gin"


def test_invalid_configurations_raise(lines_txt, vocab):
  for kwargs, field in [(dict(noise_density=1.5), "noise_density"),
                        (dict(noise_density=0.0), "noise_density"),
                        (dict(mean_span_length=0.5), "mean_span_length"),
                        (dict(mean_span_length=None), "mean_span_length"),
                        (dict(rate=-1.0), "rate"), (dict(name="r 3"), "name")]:
    with pytest.raises(ValueError, match=field):
      ul2.Denoiser(**{**dict(name="r", mode_token="[NLU]", mean_span_length=3,
                             noise_density=0.15), **kwargs})
  with pytest.raises(ValueError, match="prefix-LM"):
    ul2.Denoiser("s", "[S2S]", 3, 0.5, prefix_lm=True)
  with pytest.raises(ValueError, match=r"unknown denoisers \['r5'\]"):
    ul2.ul2_denoisers({"r5": 1.0})
  source = ul2.text_file_source(lines_txt[0])
  with pytest.raises(ValueError, match="rate 0"):
    ul2.register_ul2_tasks("ul2t_bad", source, vocab,
                           denoisers=ul2.ul2_denoisers({d.name: 0 for d in ul2.UL2_DENOISERS}))
  with pytest.raises(ValueError, match=r"no room for denoiser r3_15 \(4 mode token ids"):
    ul2.register_ul2_tasks("ul2t_bad", source, vocab, inputs_length=5, targets_length=8)
  assert not [n for n in seqio.TaskRegistry.names() if n.startswith("ul2t_bad")]
  assert "ul2t_bad" not in seqio.MixtureRegistry.names()
  ul2.register_ul2_tasks("ul2t_twice", source, vocab, inputs_length=64, targets_length=64)
  assert ul2.register_ul2_tasks("ul2t_twice", ul2.text_file_source(lines_txt[0]), vocab,
                                inputs_length=64, targets_length=64) == "ul2t_twice"
  with pytest.raises(ValueError, match="already registered as 'ul2t_twice_r3_15'"):
    ul2.register_ul2_tasks("ul2t_twice", source, vocab, inputs_length=128, targets_length=64)
  with pytest.raises(ValueError, match="already registered as 'ul2t_twice'"):
    ul2.register_ul2_tasks("ul2t_twice", source, vocab, inputs_length=64, targets_length=64,
                           denoisers=ul2.ul2_denoisers({"s": 1.0}))
  with pytest.raises(ValueError, match="name='ul2-t'"):
    ul2.register_ul2_tasks("ul2-t", source, vocab)
  with pytest.raises(ValueError, match=r"\.txt or \.jsonl"):
    ul2.text_file_source("/tmp/text.csv")


def test_bad_jsonl_line_names_file_and_line(tmp_path, vocab):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "fine"}\n\n{"text": "broken"\n', encoding="utf-8")
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: invalid JSON")):
    list(ul2.read_text_file(str(path)))
  other = tmp_path / "other.jsonl"
  other.write_text('{"text": "fine"}\n{"inputs": "x"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=re.escape(f"{other}:2: expected a JSON object")):
    list(ul2.read_text_file(str(other)))
  ul2.register_ul2_tasks("ul2t_badline", ul2.text_file_source(path), vocab,
                         denoisers=[BY_NAME["r3_15"]])
  with pytest.raises(Exception, match=re.escape(f"{path}:3")):
    _examples("ul2t_badline_r3_15", DOC_LENGTHS)


def test_same_seed_same_examples(lines_txt, vocab):
  ul2.register_ul2_tasks("ul2t_seed", ul2.text_file_source(lines_txt[0]), vocab,
                         inputs_length=32, targets_length=32, merge_texts=4)
  lengths = {"inputs": 32, "targets": 32}
  as_lists = lambda examples: [(e["inputs"].tolist(), e["targets"].tolist()) for e in examples]
  for name in ("x64_50", "s"):
    first, again, other = (as_lists(_examples(f"ul2t_seed_{name}", lengths, seed=seed, take=30))
                           for seed in (7, 7, 8))
    assert first == again and first != other


def test_preprocessor_directly_and_denoisers_draw_their_own(vocab):
  """`ul2_denoise` in a plain pipeline; two denoisers given the same seeds draw differently."""
  features = {key: seqio.Feature(vocab, add_eos=False) for key in ("inputs", "targets")}
  texts = [vocab.encode(t) for t in ("Before we proceed any further, hear me speak.",
                                     "You are all resolved rather to die than to famish?")] * 5
  ds = tf.data.Dataset.from_generator(lambda: ({"text": t} for t in texts),
                                      output_signature={"text": tf.TensorSpec([None], tf.int32)})

  def run(name):
    denoiser = ul2.Denoiser(name, "[NLU]", 2, 0.3)
    with seqio.utils.map_seed_manager(11):
      out = ul2.ul2_denoise(ds, {"inputs": 64, "targets": 64}, features, denoiser=denoiser,
                            text_key="text")
    return [(e["inputs"].tolist(), e["targets"].tolist()) for e in out.as_numpy_iterator()]

  first, second = run("a"), run("b")
  assert len(first) == len(texts) and first == run("a") and first != second
  mode_ids = vocab.encode("[NLU]")
  for (inputs, targets), text in zip(first, texts):
    example = {key: np.array(ids + [vocab.eos_id])
               for key, ids in (("inputs", inputs), ("targets", targets))}
    assert _undo_spans(example, vocab, mode_ids)[0] == text
