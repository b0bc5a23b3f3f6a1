"""promptsource templates from ../shared/data/promptsource rendered on real SST-2 / RTE rows."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from ptuning.data.batches import make_eval_examples
from ptuning.vocab import get_vocabulary
from tasks.templates import (Template, load_templates, register_template_task, render_examples,
                             write_xp3_file)
from tasks.xp3 import register_xp3_directory, xp3_task_info

RTE_LABELS = ("entailment", "not_entailment")  # HF datasets' class ids, as templates index them


@pytest.fixture(scope="module")
def sst2_rows(shared_data) -> list[dict]:
  with open(shared_data / "glue" / "SST-2" / "dev.tsv", encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  return [{"sentence": r["sentence"], "label": int(r["label"]), "idx": i}
          for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def rte_rows(shared_data) -> list[dict]:
  with open(shared_data / "superglue" / "RTE" / "val.jsonl", encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return [{**r, "label": RTE_LABELS.index(r["label"])} for r in rows]


def test_load_real_template_files(shared_data):
  sst2 = load_templates(shared_data / "promptsource" / "glue_sst2_templates.yaml")
  assert list(sst2) == ["positive negative after", "review", "said",
                        "following positive negative", "happy or mad"]
  review = sst2["review"]
  assert review.id == "228fcae7-7f4c-4e3c-9ac4-e49b26bc103d"
  assert review.metadata["metrics"] == ["Accuracy"] and review.metadata["original_task"]
  rte = load_templates(shared_data / "promptsource" / "super_glue_rte_templates.yaml")
  assert len(rte) == 10 and "GPT-3 style" in rte


def test_loader_is_safe(tmp_path):
  path = tmp_path / "evil.yaml"
  path.write_text("templates:\n  x: !!python/object/apply:os.system ['echo hacked']\n")
  with pytest.raises(yaml.constructor.ConstructorError):
    load_templates(path)


def test_sst2_templates_on_real_rows(shared_data, sst2_rows):
  templates = load_templates(shared_data / "promptsource" / "glue_sst2_templates.yaml")
  first, second = sst2_rows[0], sst2_rows[1]
  assert first["sentence"] == "it 's a charming and often affecting journey . "
  # 'review': two blank lines in the single-quoted YAML scalar -> "\n\n"; then `|||`.
  assert templates["review"].apply(first) == (
      "I'm reading a review that says \"it 's a charming and often affecting journey . \".\n\n"
      "Do you think the review is positive or negative?", "positive")
  assert templates["review"].apply(second) == (
      "I'm reading a review that says \"unflinchingly bleak and desperate \".\n\n"
      "Do you think the review is positive or negative?", "negative")
  # 'positive negative after': one blank line -> "\n"; the input is stripped at both ends.
  assert templates["positive negative after"].apply(second) == (
      "unflinchingly bleak and desperate \nQuestion: Was that sentence positive or negative? "
      "Answer:", "negative")
  assert templates["said"].answer_choices(first) == ["sad", "happy"]
  assert templates["said"].apply(first)[1] == "happy"


def test_rte_templates_on_real_rows(shared_data, rte_rows):
  templates = load_templates(shared_data / "promptsource" / "super_glue_rte_templates.yaml")
  first, second = rte_rows[0], rte_rows[1]
  assert (first["label"], second["label"]) == (1, 0)  # not_entailment, entailment
  premise = ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at "
             "age 44, according to the Christopher Reeve Foundation.")
  assert templates["GPT-3 style"].apply(first) == (
      premise + "\nQuestion: Christopher Reeve had an accident. True or False?", "False")
  assert templates["can we infer"].apply(second) == (
      "Suppose Yet, we now are discovering that antibiotics are losing their effectiveness "
      "against illness. Disease-causing bacteria are mutating faster than we can come up with "
      "new antibiotics to fight the new variations. Can we infer that \"Bacteria is winning "
      "the war against antibiotics.\"? Yes or no?", "Yes")
  # `{% if label != -1 %}`: an unlabelled example renders no target.
  assert templates["GPT-3 style"].apply({**first, "label": -1})[1] == ""
  assert templates["GPT-3 style"].answer_choices(first) == ["True", "False"]


def test_pipes_in_values_and_reserved_key():
  template = Template(name="t", jinja="{{a}} ||| {{answer_choices[label]}}",
                      answer_choices_expr="x ||| y")
  assert template.apply({"a": "left ||| right", "label": 1}) == ("left ||| right", "y")
  with pytest.raises(ValueError, match="answer_choices"):
    template.apply({"a": "b", "label": 0, "answer_choices": []})
  with pytest.raises(ValueError, match="UndefinedError|missing"):
    Template(name="bad", jinja="{{ a.b.c }} ||| x").apply({})


def test_template_task_and_xp3_file(shared_data, tmp_path, sst2_rows, rte_rows):
  vocab = get_vocabulary(shared_data / "t5_vocab" / "spiece.model")
  sst2 = load_templates(shared_data / "promptsource" / "glue_sst2_templates.yaml")["review"]
  rows = sst2_rows[:20]
  name = register_template_task("tmpl_sst2_review", {"validation": rows}, sst2, vocab)
  examples = make_eval_examples(name, "validation", {"inputs": 128, "targets": 8})
  expected = list(render_examples(rows, sst2))
  assert [(ex["inputs_pretokenized"], ex["targets_pretokenized"]) for ex in examples] == [
      (e["inputs"], e["targets"]) for e in expected]

  # Own data -> xP3 layout -> xP3 tasks; unlabelled rows (label -1) are left out.
  rte = load_templates(shared_data / "promptsource" / "super_glue_rte_templates.yaml")
  raw = rte_rows[:5] + [{**rte_rows[5], "label": -1}]
  path = write_xp3_file(raw, rte["GPT-3 style"], tmp_path, "en", "super_glue", "rte", "train")
  assert path.endswith("en/xp3_super_glue_rte_train_GPT-3_style.jsonl")
  lines = [json.loads(line) for line in open(path, encoding="utf-8")]
  assert len(lines) == 5 and lines[0]["targets"] == "False"
  assert lines[0]["template"] == "GPT-3 style" and lines[0]["language"] == "en"
  (task,) = register_xp3_directory(tmp_path, vocab, name_prefix="tmplxp3")
  assert xp3_task_info(task).num_examples == 5
