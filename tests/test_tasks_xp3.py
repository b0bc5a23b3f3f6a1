"""xP3-layout directories: tasks per file / language, mixture rates, bad lines, the gin file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import seqio

from ptuning.data.batches import make_eval_examples
from ptuning.vocab import get_vocabulary
from tasks.xp3 import (mixture_rates, register_xp3_directory, register_xp3_mixture,
                       xp3_task_info)

LENGTHS = {"inputs": 64, "targets": 8}
LAYOUT_FIRST = "xp3_ag_news_None_train_classify_question_first.jsonl"
# language -> {file name: number of lines}; merged_en repeats en's files (skipped per file).
LAYOUT = {
    "en": {LAYOUT_FIRST: 40,
           "xp3_ag_news_None_train_which_section.jsonl": 10,
           "merged_en.jsonl": 50},
    "fr": {"xp3_paws-x_fr_train_task_description.jsonl": 6},
}


@pytest.fixture(scope="module")
def vocab(shared_data):
  return get_vocabulary(shared_data / "t5_vocab" / "spiece.model")


@pytest.fixture(scope="module")
def xp3_dir(shared_data, tmp_path_factory) -> Path:
  """An xP3 directory built from the real prompted examples, with xP3's fields per line."""
  real = [json.loads(line) for line in
          open(shared_data / "xp3_format" / "megatron_t0_ag_news_classify_question_first.jsonl")]
  assert {"inputs", "targets"} <= set(real[0])
  root = tmp_path_factory.mktemp("xp3")
  for lang, files in LAYOUT.items():
    (root / lang).mkdir()
    for name, count in files.items():
      with open(root / lang / name, "w", encoding="utf-8") as f:
        for i in range(count):
          f.write(json.dumps({**real[i % len(real)], "language": lang, "split": "train",
                              "template": name, "dataset": "ag_news", "config": None}) + "\n")
  # A language that only has a merged file, at the top level as in the release.
  (root / "merged_sw.jsonl").write_text(
      "\n".join(json.dumps({"inputs": f"swali {i}", "targets": "jibu"}) for i in range(3)))
  return root


def test_tasks_per_file(xp3_dir, vocab):
  names = register_xp3_directory(xp3_dir, vocab, per="file", name_prefix="xp3f")
  assert names == ["xp3f_en_ag_news_None_train_classify_question_first",
                   "xp3f_en_ag_news_None_train_which_section",
                   "xp3f_fr_paws_x_fr_train_task_description",  # "-" is no SeqIO name char
                   "xp3f_sw_merged"]
  assert [xp3_task_info(n).num_examples for n in names] == [40, 10, 6, 3]
  assert [xp3_task_info(n).language for n in names] == ["en", "en", "fr", "sw"]
  assert register_xp3_directory(xp3_dir, vocab, per="file", name_prefix="xp3f") == names
  examples = make_eval_examples(names[0], "train", LENGTHS)
  real = json.loads(open(xp3_dir / "en" / LAYOUT_FIRST).readline())
  assert examples[0]["inputs_pretokenized"] == real["inputs"]
  assert examples[0]["targets_pretokenized"] == real["targets"] == "Business"


def test_tasks_per_language(xp3_dir, vocab):
  names = register_xp3_directory(xp3_dir, vocab, per="language", name_prefix="xp3l")
  assert names == ["xp3l_en", "xp3l_fr", "xp3l_sw"]
  info = xp3_task_info("xp3l_en")
  assert info.paths == (str(xp3_dir / "en" / "merged_en.jsonl"),) and info.num_examples == 50
  assert len(make_eval_examples("xp3l_sw", "train", LENGTHS)) == 3


def test_mixture_rates_follow_formulas():
  sizes = {"a": 40, "b": 10, "c": 6, "d": 3}
  languages = {"a": "en", "b": "en", "c": "fr", "d": "sw"}
  cap = 20
  proportional = mixture_rates(sizes, "proportional", cap=cap)
  capped = {t: min(n, cap) for t, n in sizes.items()}  # 20, 10, 6, 3
  print("proportional, cap 20:", proportional)
  for task, n in capped.items():
    assert proportional[task] == pytest.approx(n / 39)
  temperature = mixture_rates(sizes, "temperature", temperature=2.0)
  print("temperature T=2:", temperature)
  norm = sum(n ** 0.5 for n in sizes.values())
  for task, n in sizes.items():
    assert temperature[task] == pytest.approx(n ** 0.5 / norm)
  assert mixture_rates(sizes, "temperature", temperature=1.0) == pytest.approx(
      mixture_rates(sizes, "proportional"))
  weights = {"en": 0.5, "fr": 0.3, "sw": 0.2}
  language = mixture_rates(sizes, "language", language_weights=weights, languages=languages)
  print("language weights en .5 fr .3 sw .2:", language)
  # en's 0.5 split 40:10 between a and b; fr and sw have one task each.
  assert language == pytest.approx({"a": 0.4, "b": 0.1, "c": 0.3, "d": 0.2})
  with pytest.raises(ValueError, match="no language_weights for languages"):
    mixture_rates(sizes, "language", language_weights={"en": 1.0}, languages=languages)


def test_registered_mixture(xp3_dir, vocab):
  names = register_xp3_directory(xp3_dir, vocab, per="file", name_prefix="xp3f")
  rates = register_xp3_mixture("xp3f_capped", names, "proportional", cap=20)
  print("registered rates:", rates)
  mixture = seqio.get_mixture_or_task("xp3f_capped")
  assert {t.name: mixture.get_rate(t) for t in mixture.tasks} == pytest.approx(
      {names[0]: 20 / 39, names[1]: 10 / 39, names[2]: 6 / 39, names[3]: 3 / 39})
  examples = mixture.get_dataset(LENGTHS, split="train", shuffle=False, num_epochs=1).take(8)
  assert {"inputs", "targets"} <= set(next(iter(examples)))
  bloomz = register_xp3_mixture("xp3f_lang", names, "language",
                                language_weights={"en": 0.5, "fr": 0.25, "sw": 0.25})
  assert bloomz[names[0]] == pytest.approx(0.5 * 40 / 50)


def test_malformed_line_names_file_and_line(tmp_path, vocab):
  (tmp_path / "en").mkdir()
  path = tmp_path / "en" / "xp3_bad_None_train_t.jsonl"
  path.write_text('{"inputs": "a", "targets": "b"}\n\n{"inputs": "c"}\n')
  (name,) = register_xp3_directory(tmp_path, vocab, name_prefix="xp3bad")
  with pytest.raises(ValueError, match=rf"{path}:3: missing required field 'targets'"):
    make_eval_examples(name, "train", LENGTHS)


def test_gin_file_binds_mixture_and_loss(xp3_dir, shared_data):
  from ptuning.gin_setup import load_config
  config = load_config(
      ["runs/train.gin", "runs/xp3_mixture.gin"],
      ["MODEL_DIR = '/tmp/unused'", f"XP3_DIR = '{xp3_dir}'",
       f"VOCABULARY_PATH = '{shared_data / 't5_vocab' / 'spiece.model'}'",
       "XP3_MIXING = 'temperature'", "XP3_TEMPERATURE = 2.0", "XP3_MIXTURE_NAME = 'xp3_gin'"])
  assert config.mixture_or_task_name == "xp3_gin"
  assert config.loss_normalizing_factor == "AVERAGE_PER_SEQUENCE"
  mixture = seqio.get_mixture_or_task("xp3_gin")
  rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
  norm = sum(n ** 0.5 for n in (40, 10, 6, 3))
  assert rates["xp3_en_ag_news_None_train_which_section"] == pytest.approx(10 ** 0.5 / norm)


def test_language_task_chains_files(tmp_path, vocab):
  (tmp_path / "de").mkdir()
  first = tmp_path / "de" / "xp3_a_None_train_t.jsonl"
  second = tmp_path / "de" / "xp3_b_None_train_t.jsonl"
  first.write_text("".join(json.dumps({"inputs": f"a{i}", "targets": "x"}) + "\n"
                           for i in range(2)))
  second.write_text(json.dumps({"inputs": "b0", "targets": "y"}) + "\n" + "not json\n")
  (name,) = register_xp3_directory(tmp_path, vocab, per="language", name_prefix="xp3chain")
  assert name == "xp3chain_de" and xp3_task_info(name).num_examples == 4
  with pytest.raises(ValueError, match=rf"{second}:2: invalid JSON"):
    make_eval_examples(name, "train", LENGTHS)
  second.write_text(json.dumps({"inputs": "b0", "targets": "y"}) + "\n")
  (name,) = register_xp3_directory(tmp_path, vocab, per="language", name_prefix="xp3chain2")
  assert [ex["inputs_pretokenized"] for ex in make_eval_examples(name, "train", LENGTHS)] == [
      "a0", "a1", "b0"]
