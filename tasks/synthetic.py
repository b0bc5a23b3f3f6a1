"""Deterministic synthetic multitask data in the xP3 layout, and its vocabulary, for a nano T5.

`python -m tasks.synthetic --out DIR [--seed N]` (or `generate(out_dir, seed)`) writes, from
`random.Random` streams seeded by `(seed, file)` only (same seed: byte-identical files):

- `xp3/{lang}/xp3_{family}_{subset}_train_{template}.jsonl`: the training tasks, lines
  `inputs`, `targets`, `language`, `split`, `template`, `dataset`, `config`
  (`tasks.xp3.register_xp3_directory` reads them). Seven families (`FAMILIES`), three
  templates each (instruction wordings in the file's language), in both languages
  (`tasks.synthetic_language`: syna, synb), 400 examples a file by default:
  translate (sentence to the other language; subset `syna-synb` / `synb-syna`), topic
  (category of a sentence whose nouns share one; syna only), sentiment (good/bad from the
  one polar adjective), category (noun -> its category), count (how many nouns of a
  category in a list, 1-4), qa (who does it / what does the subject verb), reverse (a word
  list backwards). Labels of topic, sentiment and count are balanced. Default: 39 files,
  15,600 examples; inputs at most 16 tokens, targets at most 8 (bounds `MAX_TOKENS`: 48 / 8).
- `heldout/topic_synb_{train,validation}.jsonl` (2,000 / 400 lines): the held-out task.
- `text/{lang}.jsonl`: `{"text": ...}` paragraphs of 10-60 words (3,000 a language) for UL2.
- `spiece.model`: the vocabulary (`synthetic_language.vocabulary_model`: every word one
  piece, `[NLU]`/`[NLG]`/`[S2S]` one id each, T5 ids; 287 pieces for seed 0); `lexicon.json`:
  concept -> word per language; `summary.json`: files, counts, held-out task, chance
  accuracy, vocabulary size, longest inputs/targets in tokens (no EOS).

Held-out task (`HELDOUT`): topic classification of synb sentences, asked with an instruction
("say kind of this text: ...") no training file uses, answered with synb's four category
words (balanced: chance accuracy 0.25). Topic is trained only in syna, so the backbone has
never done it in synb, but every piece is taught: synb's words and word order (translation,
text), its category words as answers (category lookup), each noun's category (category
lookup in both languages), the task itself in syna and every instruction word in other synb
templates. Without a prompt the unfamiliar instruction should get translation- or copy-like
answers; a soft prompt only has to point the frozen model at a skill it has.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
from collections.abc import Callable, Iterable, Mapping

import sentencepiece as spm

from tasks.synthetic_language import (ADJECTIVES, ALL_NOUNS, CATEGORIES, CATEGORY_OF,
                                      LANGUAGE_CODES, NOUNS, NUMERALS, POLARITY_LABELS,
                                      PUNCTUATION, VERBS, Clause, Language, build_languages,
                                      sample_clause, sample_paragraph, sample_polar_clause,
                                      vocabulary_model, vocabulary_words)

SPLIT = "train"
EXAMPLES_PER_FILE = 400
TEXT_LINES = 3000
HELDOUT_SIZES = {"train": 2000, "validation": 400}
# Longest inputs / targets allowed, in tokens without EOS (`generate` checks them).
MAX_TOKENS = {"inputs": 48, "targets": 8}


@dataclasses.dataclass(frozen=True)
class Draw:
  """What one example is drawn for: its index (which balances labels), language, template."""

  index: int
  language: Language
  languages: Mapping[str, Language]
  template: str
  target_language: str | None = None  # translate only


# A sample function returns (slots, target) for a Draw: slots are text in draw.language.
Sample = Callable[[random.Random, Draw], tuple[dict[str, str], str]]


@dataclasses.dataclass(frozen=True)
class Family:
  """A task family: template name -> instruction (concepts, `{slot}`s, punctuation)."""

  name: str
  templates: Mapping[str, str]
  sample: Sample
  languages: tuple[str, ...] = LANGUAGE_CODES


def fill(template: str, slots: Mapping[str, str], language: Language) -> str:
  """`template` in `language`: concepts -> words, `{slot}` -> slots[slot], punctuation attached."""
  out: list[str] = []
  for token in template.split():
    if token.startswith("{"):
      out.append(slots[token[1:-1]])
    elif token in PUNCTUATION:
      out[-1] += token
    else:
      out.append(language.lexicon[token])
  return " ".join(out)


def _sample_translate(rng: random.Random, draw: Draw) -> tuple[dict[str, str], str]:
  clause = sample_clause(rng)
  target = draw.target_language
  return ({"text": draw.language.render(clause), "language": draw.language.lexicon[target]},
          draw.languages[target].render(clause))


def _topic_clause(rng: random.Random, category: str) -> Clause:
  return sample_clause(rng, nouns=NOUNS[category])


def _sample_topic(rng: random.Random, draw: Draw) -> tuple[dict[str, str], str]:
  category = CATEGORIES[draw.index % len(CATEGORIES)]
  return ({"text": draw.language.render(_topic_clause(rng, category))},
          draw.language.lexicon[category])


def _sample_sentiment(rng: random.Random, draw: Draw) -> tuple[dict[str, str], str]:
  label = POLARITY_LABELS[draw.index % len(POLARITY_LABELS)]
  return ({"text": draw.language.render(sample_polar_clause(rng, positive=label == "good"))},
          draw.language.lexicon[label])


def _sample_category(rng: random.Random, draw: Draw) -> tuple[dict[str, str], str]:
  noun = rng.choice(ALL_NOUNS)
  return {"word": draw.language.lexicon[noun]}, draw.language.lexicon[CATEGORY_OF[noun]]


def _sample_count(rng: random.Random, draw: Draw) -> tuple[dict[str, str], str]:
  """3-6 nouns, 1-4 (by index) of them of the asked category."""
  count = 1 + draw.index % 4
  category = rng.choice(CATEGORIES)
  others = [noun for noun in ALL_NOUNS if CATEGORY_OF[noun] != category]
  nouns = ([rng.choice(NOUNS[category]) for _ in range(count)]
           + [rng.choice(others) for _ in range(rng.randint(max(0, 3 - count), 6 - count))])
  rng.shuffle(nouns)
  language = draw.language
  return ({"list": " ".join(language.words(nouns)), "category": language.lexicon[category]},
          language.lexicon[NUMERALS[count - 1]])


_QA_ASKS = {"who_after": "subject", "who_first": "subject", "what_after": "object"}


def _sample_qa(rng: random.Random, draw: Draw) -> tuple[dict[str, str], str]:
  clause = sample_clause(rng, transitive=True)
  lexicon = draw.language.lexicon
  slots = {"text": draw.language.render(clause), "verb": lexicon[clause.verb],
           "subject": lexicon[clause.subject.noun]}
  asked = clause.subject if _QA_ASKS[draw.template] == "subject" else clause.object
  return slots, lexicon[asked.noun]


def _sample_reverse(rng: random.Random, draw: Draw) -> tuple[dict[str, str], str]:
  words = draw.language.words(rng.choice(ALL_NOUNS + ADJECTIVES + VERBS)
                              for _ in range(rng.randint(2, 6)))
  return {"list": " ".join(words)}, " ".join(reversed(words))


FAMILIES = {family.name: family for family in (
    Family("translate", {"translate_into": "translate into {language} : {text}",
                         "say_in": "{text} . say this in {language} .",
                         "what_in": "what is {text} in {language} ?"}, _sample_translate),
    Family("topic", {"what_about": "what is this text about ? {text}",
                     "topic_after": "{text} . topic ?",
                     "options": "{text} . animal or food or tool or place ?"},
           _sample_topic, languages=("syna",)),
    Family("sentiment", {"what_feeling": "what feeling ? {text}",
                         "good_or_bad": "{text} . good or bad ?",
                         "feeling_of_text": "{text} . feeling of this text ?"},
           _sample_sentiment),
    Family("category", {"what_kind": "what kind is {word} ?",
                        "which_kind": "{word} : which kind ?",
                        "options": "{word} : animal or food or tool or place ?"},
           _sample_category),
    Family("count", {"how_many": "how many {category} ? {list}",
                     "list_first": "{list} . how many {category} ?",
                     "count_words": "count {category} words : {list}"}, _sample_count),
    Family("qa", {"who_after": "{text} . who {verb} ?", "who_first": "who {verb} ? {text}",
                  "what_after": "{text} . {subject} {verb} what ?"}, _sample_qa),
    Family("reverse", {"reverse": "reverse : {list}", "say_in_reverse": "say in reverse : {list}",
                       "reverse_this_text": "{list} . reverse this text ."}, _sample_reverse),
)}


@dataclasses.dataclass(frozen=True)
class HeldoutTask:
  """The held-out task: a family asked in a language and with a template no training file has."""

  name: str
  family: str
  language: str
  template_name: str
  template: str
  labels: tuple[str, ...]  # concepts


HELDOUT = HeldoutTask("topic_synb", "topic", "synb", "say_kind_of_text",
                      "say kind of this text : {text}", CATEGORIES)


@dataclasses.dataclass(frozen=True)
class TrainingFile:
  """One xP3 file: a family's template in a language (to a target language for translate)."""

  language: str
  family: str
  template: str
  target_language: str | None = None

  @property
  def subset(self) -> str:
    return f"{self.language}-{self.target_language}" if self.target_language else "None"

  @property
  def path(self) -> str:
    return f"xp3/{self.language}/xp3_{self.family}_{self.subset}_{SPLIT}_{self.template}.jsonl"


def training_files(language_codes: Iterable[str] = LANGUAGE_CODES) -> list[TrainingFile]:
  """Every training file, sorted by path: family x template x language (x target language)."""
  codes = list(language_codes)
  files = []
  for family in FAMILIES.values():
    for code in family.languages:
      targets = [c for c in codes if c != code] if family.name == "translate" else [None]
      files.extend(TrainingFile(code, family.name, template, target)
                   for target in targets for template in family.templates)
  return sorted(files, key=lambda f: f.path)


def _write_jsonl(path: str, records: Iterable[Mapping[str, object]]) -> int:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  count = 0
  with open(path, "w", encoding="utf-8", newline="\n") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      count += 1
  return count


def _training_records(spec: TrainingFile, languages: Mapping[str, Language], seed: int,
                      count: int) -> list[dict[str, str]]:
  rng = random.Random(f"synthetic/{seed}/{spec.path}")
  family, language = FAMILIES[spec.family], languages[spec.language]
  records = []
  for index in range(count):
    draw = Draw(index, language, languages, spec.template, spec.target_language)
    slots, target = family.sample(rng, draw)
    records.append({"inputs": fill(family.templates[spec.template], slots, language),
                    "targets": target, "language": spec.language, "split": SPLIT,
                    "template": spec.template, "dataset": spec.family,
                    "config": spec.subset if spec.target_language else None})
  rng.shuffle(records)
  return records


def _heldout_records(languages: Mapping[str, Language], seed: int, split: str, count: int,
                     exclude: set[str]) -> list[dict[str, str]]:
  """`count` distinct examples (none in `exclude`), `count / len(labels)` of each label."""
  if count % len(HELDOUT.labels):
    raise ValueError(f"held-out {split} size {count} is not a multiple of "
                     f"{len(HELDOUT.labels)} labels")
  rng = random.Random(f"synthetic/{seed}/heldout/{split}")
  language = languages[HELDOUT.language]
  records, seen = [], set(exclude)
  while len(records) < count:
    category = HELDOUT.labels[len(records) % len(HELDOUT.labels)]
    inputs = fill(HELDOUT.template, {"text": language.render(_topic_clause(rng, category))},
                  language)
    if inputs not in seen:
      seen.add(inputs)
      records.append({"inputs": inputs, "targets": language.lexicon[category],
                      "language": HELDOUT.language, "template": HELDOUT.template_name,
                      "dataset": HELDOUT.family})
  rng.shuffle(records)
  return records


def generate(out_dir: str | os.PathLike, seed: int = 0,
             examples_per_file: int = EXAMPLES_PER_FILE, text_lines: int = TEXT_LINES,
             heldout_sizes: Mapping[str, int] = HELDOUT_SIZES) -> dict:
  """Writes the synthetic data set under `out_dir` (see the module docstring); returns summary."""
  out_dir = os.fspath(out_dir)
  languages = build_languages(seed)
  model = vocabulary_model(vocabulary_words(languages))
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "spiece.model"), "wb") as f:
    f.write(model)
  tokenizer = spm.SentencePieceProcessor(model_proto=model)
  longest = {"inputs": 0, "targets": 0, "text": 0}

  def measure(field: str, text: str) -> None:
    ids = tokenizer.encode(text)
    if tokenizer.unk_id() in ids:
      raise RuntimeError(f"{text!r} has a word outside the vocabulary")
    if len(ids) > MAX_TOKENS.get(field, len(ids)):
      raise RuntimeError(f"{field} {text!r} has {len(ids)} tokens > {MAX_TOKENS[field]}")
    longest[field] = max(longest[field], len(ids))

  files: dict[str, int] = {}
  for spec in training_files(languages):
    records = _training_records(spec, languages, seed, examples_per_file)
    for record in records:
      measure("inputs", record["inputs"])
      measure("targets", record["targets"])
    files[spec.path] = _write_jsonl(os.path.join(out_dir, spec.path), records)

  heldout_files: dict[str, int] = {}
  seen: set[str] = set()
  for split in sorted(heldout_sizes, key=lambda s: s != "validation"):  # validation first
    records = _heldout_records(languages, seed, split, heldout_sizes[split], seen)
    seen.update(record["inputs"] for record in records)
    for record in records:
      measure("inputs", record["inputs"])
      measure("targets", record["targets"])
    path = f"heldout/{HELDOUT.name}_{split}.jsonl"
    heldout_files[path] = _write_jsonl(os.path.join(out_dir, path), records)

  text_files: dict[str, int] = {}
  for code, language in languages.items():
    rng = random.Random(f"synthetic/{seed}/text/{code}")
    lines = [sample_paragraph(rng, language) for _ in range(text_lines)]
    for line in lines:
      measure("text", line)
    text_files[f"text/{code}.jsonl"] = _write_jsonl(os.path.join(out_dir, f"text/{code}.jsonl"),
                                                    ({"text": line} for line in lines))

  lexicon = {code: dict(language.lexicon) for code, language in languages.items()}
  with open(os.path.join(out_dir, "lexicon.json"), "w", encoding="utf-8") as f:
    json.dump(lexicon, f, indent=1, sort_keys=True)
  summary = {
      "seed": seed,
      "languages": list(languages),
      "families": {name: {"templates": list(family.templates), "languages": list(family.languages)}
                   for name, family in FAMILIES.items()},
      "training_files": files,
      "training_examples": sum(files.values()),
      "heldout": {"task": HELDOUT.name, "family": HELDOUT.family, "language": HELDOUT.language,
                  "template": HELDOUT.template_name,
                  "labels": [languages[HELDOUT.language].lexicon[c] for c in HELDOUT.labels],
                  "label_concepts": list(HELDOUT.labels),
                  "chance_accuracy": 1 / len(HELDOUT.labels), "files": heldout_files},
      "text_files": text_files,
      "vocabulary": {"path": "spiece.model", "pieces": tokenizer.get_piece_size(),
                     "words": len(vocabulary_words(languages))},
      "max_tokens": longest,
      "token_bounds": MAX_TOKENS,
  }
  with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, sort_keys=True)
    f.write("\n")
  return summary


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--examples-per-file", type=int, default=EXAMPLES_PER_FILE)
  parser.add_argument("--text-lines", type=int, default=TEXT_LINES)
  args = parser.parse_args(argv)
  summary = generate(args.out, args.seed, args.examples_per_file, args.text_lines)
  heldout = summary["heldout"]
  print(f"{args.out}: {len(summary['training_files'])} training files, "
        f"{summary['training_examples']} examples ({', '.join(summary['families'])}) in "
        f"{', '.join(summary['languages'])}; held-out {heldout['task']} "
        f"{heldout['files']} (chance {heldout['chance_accuracy']:.2f}); "
        f"vocabulary {summary['vocabulary']['pieces']} pieces; max tokens {summary['max_tokens']}")


if __name__ == "__main__":
  main()
