"""The synthetic xP3 data set: determinism, layout, held-out task, vocabulary, lengths, lexicon."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import seqio
import sentencepiece as spm

from ptuning.vocab import get_vocabulary
from tasks.synthetic import FAMILIES, HELDOUT, MAX_TOKENS, fill, generate
from tasks.synthetic_language import (CONCEPTS, LANGUAGE_CODES, MODE_TOKENS, OBJECT_MARKER,
                                      build_languages)
from tasks.xp3 import register_xp3_directory, xp3_task_info

REPO = Path(__file__).resolve().parents[1]
SLOT = "@SLOT@"  # stands for a template's {text} (no synthetic word holds "@")
EXPECTED_FILES = sum(len(f.templates) * len(f.languages) * (len(f.languages) - 1 if
                                                            f.name == "translate" else 1)
                     for f in FAMILIES.values())


def _read(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, dict]:
  out = tmp_path_factory.mktemp("synthetic") / "seed0"
  return out, generate(out, seed=0)


@pytest.fixture(scope="module")
def training(generated) -> dict[str, list[dict]]:
  """Relative path -> lines of every training file."""
  out, _ = generated
  return {str(p.relative_to(out)): _read(p) for p in sorted((out / "xp3").rglob("*.jsonl"))}


@pytest.fixture(scope="module")
def heldout(generated) -> dict[str, list[dict]]:
  out, _ = generated
  return {split: _read(out / "heldout" / f"{HELDOUT.name}_{split}.jsonl")
          for split in ("train", "validation")}


@pytest.fixture(scope="module")
def vocab(generated) -> seqio.SentencePieceVocabulary:
  return get_vocabulary(generated[0] / "spiece.model")


def test_same_seed_is_byte_identical_and_another_seed_differs(generated, tmp_path):
  out, _ = generated
  # The CLI in a fresh process with another hash seed writes the same bytes.
  env = {**os.environ, "PYTHONHASHSEED": "12345"}
  subprocess.run([sys.executable, "-m", "tasks.synthetic", "--out", str(tmp_path / "cli"),
                  "--seed", "0"], cwd=REPO, env=env, check=True, capture_output=True)
  first, again = _tree(out), _tree(tmp_path / "cli")
  assert "spiece.model" in first and "summary.json" in first
  assert len(first) == EXPECTED_FILES + 2 + len(LANGUAGE_CODES) + 3  # + heldout, text, others
  assert again == first

  generate(tmp_path / "seed1", seed=1)
  other = _tree(tmp_path / "seed1")
  assert sorted(other) == sorted(first)
  assert other["spiece.model"] != first["spiece.model"]
  assert all(other[name] != first[name] for name in first if name.endswith(".jsonl"))


def test_registers_as_xp3_tasks(generated, training, vocab):
  out, summary = generated
  names = register_xp3_directory(out / "xp3", vocab, name_prefix="synthetic")
  assert len(names) == EXPECTED_FILES == len(summary["training_files"]) == 39
  assert "synthetic_syna_translate_syna_synb_train_translate_into" in names
  assert "synthetic_synb_qa_None_train_who_first" in names
  assert "synthetic_syna_topic_None_train_options" in names
  assert not [n for n in names if n.startswith("synthetic_synb_topic")]
  assert {xp3_task_info(n).num_examples for n in names} == {400}
  assert sorted(xp3_task_info(n).language for n in names) == sorted(
      path.split("/")[1] for path in training)
  assert summary["training_examples"] == sum(map(len, training.values())) == 39 * 400

  # One example through SeqIO (TF tokenizer): the same ids as the Python tokenizer.
  name = "synthetic_synb_translate_synb_syna_train_what_in"
  first = training["xp3/synb/xp3_translate_synb-syna_train_what_in.jsonl"][0]
  example = next(seqio.get_mixture_or_task(name).get_dataset(
      None, split="train", shuffle=False).as_numpy_iterator())
  assert list(example["inputs"]) == vocab.encode(first["inputs"]) + [1]
  assert list(example["targets"]) == vocab.encode(first["targets"]) + [1]


def test_heldout_task_is_absent_from_training(training, heldout):
  lines = [line for file in training.values() for line in file]
  assert HELDOUT.template_name not in {line["template"] for line in lines}
  assert not [line for line in lines
              if (line["dataset"], line["language"]) == (HELDOUT.family, HELDOUT.language)]
  assert [line for line in lines if line["dataset"] == HELDOUT.family]  # taught elsewhere

  # Every held-out input holds the held-out instruction, which no training input holds.
  all_heldout = heldout["train"] + heldout["validation"]
  language = build_languages(0)[HELDOUT.language]
  prefix, suffix = fill(HELDOUT.template, {"text": SLOT}, language).split(SLOT)
  assert all(line["inputs"].startswith(prefix) and line["inputs"].endswith(suffix)
             for line in all_heldout)
  instruction = [part.strip() for part in (prefix, suffix) if part.strip()]
  assert instruction
  assert not [line for line in lines if any(part in line["inputs"] for part in instruction)]
  # ... and yet every held-out word is taught by the training files of its language.
  taught = {word for line in lines if line["language"] == HELDOUT.language
            for field in ("inputs", "targets") for word in line[field].replace(":", " ")
            .replace("?", " ").replace(".", " ").split()}
  used = {word for line in all_heldout for word in
          line["inputs"].replace(":", " ").split() + [line["targets"]]}
  assert used <= taught
  assert not {line["inputs"] for line in heldout["train"]} & {
      line["inputs"] for line in heldout["validation"]}


def test_heldout_labels_are_balanced(generated, heldout):
  _, summary = generated
  info = summary["heldout"]
  assert info["chance_accuracy"] == 1 / len(info["labels"]) == 0.25
  for split, size in (("train", 2000), ("validation", 400)):
    counts = collections.Counter(line["targets"] for line in heldout[split])
    assert sorted(counts) == sorted(info["labels"])
    assert set(counts.values()) == {size // len(info["labels"])}
    assert info["files"][f"heldout/{HELDOUT.name}_{split}.jsonl"] == size


def _all_texts(generated, training, heldout) -> dict[str, list[str]]:
  out, _ = generated
  lines = [line for file in list(training.values()) + list(heldout.values()) for line in file]
  text = [line["text"] for code in LANGUAGE_CODES for line in _read(out / "text" / f"{code}.jsonl")]
  return {"inputs": [line["inputs"] for line in lines],
          "targets": [line["targets"] for line in lines], "text": text}


def test_vocabulary_round_trips_without_unk(generated, training, heldout, vocab):
  _, summary = generated
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.bos_id) == (0, 1, 2, -1)
  pieces = spm.SentencePieceProcessor(model_file=str(generated[0] / "spiece.model"))
  assert 200 <= pieces.get_piece_size() <= 1500
  assert pieces.get_piece_size() == summary["vocabulary"]["pieces"]
  assert vocab.vocab_size == pieces.get_piece_size() + 100  # SeqIO's sentinels

  longest = {}
  for field, texts in _all_texts(generated, training, heldout).items():
    encoded = [vocab.encode(text) for text in texts]
    assert not [t for t, ids in zip(texts, encoded) if vocab.unk_id in ids]
    assert [vocab.decode(ids) for ids in encoded] == texts
    longest[field] = max(map(len, encoded))
  assert longest == summary["max_tokens"]
  assert longest["inputs"] <= MAX_TOKENS["inputs"] and longest["targets"] <= MAX_TOKENS["targets"]

  words = [word for lexicon in json.loads((generated[0] / "lexicon.json").read_text()).values()
           for word in lexicon.values()]
  assert len(set(words)) == len(words) == len(CONCEPTS) * len(LANGUAGE_CODES)
  assert not [word for word in words if len(vocab.encode(word)) != 1]
  for token in MODE_TOKENS:
    (mode_id,) = vocab.encode(token)
    assert vocab.tokenizer.id_to_piece(mode_id) == f"▁{token}"
    assert vocab.encode(f"{token} {words[0]}") == [mode_id] + vocab.encode(words[0])
    assert vocab.decode([mode_id]) == token


def test_text_corpus(generated):
  out, summary = generated
  lexicon = json.loads((out / "lexicon.json").read_text())
  for code in LANGUAGE_CODES:
    lines = [line["text"] for line in _read(out / "text" / f"{code}.jsonl")]
    assert len(lines) == summary["text_files"][f"text/{code}.jsonl"] == 3000
    lengths = [len(line.split()) for line in lines]
    assert min(lengths) >= 10 and max(lengths) <= 60
    own = set(lexicon[code].values())
    assert {w.rstrip(".") for line in lines for w in line.split()} <= own


def test_translations_are_consistent(generated, training):
  languages = build_languages(0)
  lexicons = {code: dict(language.lexicon) for code, language in languages.items()}
  assert json.loads((generated[0] / "lexicon.json").read_text()) == lexicons
  reordered = 0
  for path, lines in training.items():
    if lines[0]["dataset"] != "translate":
      continue
    source, target = lines[0]["config"].split("-")
    template = FAMILIES["translate"].templates[lines[0]["template"]]
    pattern = re.escape(fill(template, {"text": SLOT, "language": lexicons[source][target]},
                             languages[source])).replace(SLOT, "(.+)")
    concept_of = {word: concept for concept, word in lexicons[source].items()}
    marker = lexicons[target][OBJECT_MARKER]
    together: dict[str, set[str]] = {}  # source word -> target words present every time
    for line in lines:
      words = re.fullmatch(pattern, line["inputs"])[1].split()
      targets = [word for word in line["targets"].split() if word != marker]
      mapped = [lexicons[target][concept_of[w]] for w in words if concept_of[w] != OBJECT_MARKER]
      assert sorted(mapped) == sorted(targets), (path, line)
      reordered += mapped != targets
      for word in words:
        together[word] = together.get(word, set(targets)) & set(targets)
    # From the data alone: the target words present every time a source word is are its
    # translation and nothing else.
    assert {w: found for w, found in together.items() if concept_of[w] != OBJECT_MARKER} == {
        w: {lexicons[target][concept_of[w]]} for w in together if concept_of[w] != OBJECT_MARKER}
  assert reordered > 100  # the two word orders differ: translation is not word by word
