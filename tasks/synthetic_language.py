"""Synthetic languages for the nano backbone: lexicons over one concept inventory, word order,
and the SentencePiece vocabulary that holds every word as one piece.

Concepts are English glosses that are never written out: nouns in four categories
(`NOUNS`), adjectives of positive / negative / neutral polarity, verbs, numerals, function
words (the copula "is", "and", the object marker) and the instruction words task templates
are written with (`INSTRUCTION_WORDS`: also the category and polarity label words and one
name per language). Each language (`LANGUAGE_SPECS`) gives every concept one made-up word
built from its own syllables (the two languages share no letter, so a word tells its
language), drawn by `random.Random` seeded with `(seed, language)`, and has its own order:

- syna: subject verb object; noun phrase `[numeral] noun [adjective]`; `S is ADJ`;
- synb: subject object OBJ-MARKER verb; noun phrase `[adjective] noun [numeral]`; `S ADJ is`.

A `Clause` is made of concepts; `Language.render` writes it in one language, so translation
is reordering plus a word-for-word map (plus the object marker, which only synb has).

`vocabulary_model(words)` builds the SentencePiece model directly as a ModelProto (no
trainer, so its bytes depend only on the word list): a unigram model with T5's ids (pad 0,
eos 1, unk 2, no BOS); the UL2 mode tokens as user-defined pieces `▁[NLU]`, `▁[NLG]`,
`▁[S2S]` (like SeqIO's `▁<extra_id_N>` sentinels: one id for "[NLU]" at the start of a text
or after a space); every word one piece `▁word`; and `▁` plus each printable ASCII character
at much lower scores, so any other ASCII text still encodes without unk (character by
character).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import random
import string
import tempfile
from collections.abc import Iterable, Mapping, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

CATEGORIES = ("animal", "food", "tool", "place")
NOUNS = {
    "animal": ("cat", "dog", "horse", "bird", "fish", "goat", "mouse", "bear"),
    "food": ("bread", "rice", "apple", "milk", "egg", "soup", "cheese", "plum"),
    "tool": ("hammer", "knife", "rope", "saw", "spade", "needle", "axe", "brush"),
    "place": ("house", "river", "market", "forest", "village", "hill", "school", "road"),
}
ALL_NOUNS = tuple(noun for category in CATEGORIES for noun in NOUNS[category])
CATEGORY_OF = {noun: category for category in CATEGORIES for noun in NOUNS[category]}
POSITIVE = ("happy", "gentle", "bright", "clean", "sweet", "warm")
NEGATIVE = ("sad", "cruel", "dark", "dirty", "bitter", "cold")
NEUTRAL = ("big", "small", "old", "new")
ADJECTIVES = POSITIVE + NEGATIVE + NEUTRAL
VERBS = ("sees", "has", "finds", "takes", "makes", "carries", "holds", "follows")
NUMERALS = ("one", "two", "three", "four", "five", "six")
OBJECT_MARKER = "obj_marker"
FUNCTION_WORDS = ("is", "and", OBJECT_MARKER)
POLARITY_LABELS = ("good", "bad")
INSTRUCTION_WORDS = ("translate", "into", "say", "in", "what", "which", "who", "how", "many",
                     "kind", "topic", "about", "feeling", "of", "this", "text", "or", "count",
                     "words", "reverse") + POLARITY_LABELS + CATEGORIES
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
PUNCTUATION = (".", ",", ":", "?")


@dataclasses.dataclass(frozen=True)
class LanguageSpec:
  """Sound and word order of one synthetic language."""

  code: str
  onsets: str
  vowels: str
  codas: str
  verb_final: bool  # S O V (else S V O)
  adjective_first: bool  # adjective before the noun
  numeral_first: bool  # numeral before the noun
  object_marker: bool  # a particle after the object

  @property
  def syllables(self) -> list[str]:
    return sorted(o + v + c for o in self.onsets for v in self.vowels for c in ("", *self.codas))


LANGUAGE_SPECS = (
    LanguageSpec("syna", onsets="ptkmnls", vowels="aiu", codas="", verb_final=False,
                 adjective_first=False, numeral_first=True, object_marker=False),
    LanguageSpec("synb", onsets="bdgvzh", vowels="eo", codas="r", verb_final=True,
                 adjective_first=True, numeral_first=False, object_marker=True),
)
LANGUAGE_CODES = tuple(spec.code for spec in LANGUAGE_SPECS)
# Every concept, in the fixed order words are drawn in (language names are concepts too).
CONCEPTS = (FUNCTION_WORDS + ALL_NOUNS + ADJECTIVES + VERBS + NUMERALS + INSTRUCTION_WORDS
            + LANGUAGE_CODES)
_REPEATED = sorted({concept for concept in CONCEPTS if CONCEPTS.count(concept) > 1})
if _REPEATED:
  raise ValueError(f"concepts listed twice would share one word: {_REPEATED}")


@dataclasses.dataclass(frozen=True)
class NounPhrase:
  noun: str
  adjective: str | None = None
  numeral: str | None = None


@dataclasses.dataclass(frozen=True)
class Clause:
  """`subject verb object` (transitive) or `subject is predicate` (copula), as concepts."""

  subject: NounPhrase
  verb: str | None = None
  object: NounPhrase | None = None
  predicate: str | None = None

  @property
  def nouns(self) -> tuple[str, ...]:
    return (self.subject.noun,) + ((self.object.noun,) if self.object else ())


@dataclasses.dataclass(frozen=True)
class Language:
  """A language's rules and its lexicon (concept -> word, one word per concept)."""

  spec: LanguageSpec
  lexicon: Mapping[str, str]

  @property
  def code(self) -> str:
    return self.spec.code

  def words(self, concepts: Iterable[str]) -> list[str]:
    return [self.lexicon[concept] for concept in concepts]

  def noun_phrase_concepts(self, phrase: NounPhrase) -> list[str]:
    before, after = [], []
    if phrase.numeral:
      (before if self.spec.numeral_first else after).append(phrase.numeral)
    if phrase.adjective:
      (before if self.spec.adjective_first else after).append(phrase.adjective)
    return before + [phrase.noun] + after

  def clause_concepts(self, clause: Clause) -> list[str]:
    subject = self.noun_phrase_concepts(clause.subject)
    if clause.object is None:
      tail = [clause.predicate, "is"] if self.spec.verb_final else ["is", clause.predicate]
      return subject + tail
    obj = self.noun_phrase_concepts(clause.object)
    if self.spec.object_marker:
      obj.append(OBJECT_MARKER)
    return subject + (obj + [clause.verb] if self.spec.verb_final else [clause.verb] + obj)

  def render(self, clause: Clause) -> str:
    return " ".join(self.words(self.clause_concepts(clause)))


def _draw_lexicon(spec: LanguageSpec, seed: int) -> dict[str, str]:
  rng = random.Random(f"synthetic-lexicon/{seed}/{spec.code}")
  syllables = spec.syllables
  lexicon: dict[str, str] = {}
  used: set[str] = set()
  for concept in CONCEPTS:
    if concept in FUNCTION_WORDS:
      length = 1
    elif concept in INSTRUCTION_WORDS or concept in NUMERALS or concept in LANGUAGE_CODES:
      length = 2
    else:
      length = rng.choice((2, 2, 3))
    while (word := "".join(rng.choice(syllables) for _ in range(length))) in used:
      pass
    used.add(word)
    lexicon[concept] = word
  return lexicon


def build_languages(seed: int = 0) -> dict[str, Language]:
  """`{code: Language}` of every language in `LANGUAGE_SPECS`, lexicons drawn from `seed`."""
  return {spec.code: Language(spec, _draw_lexicon(spec, seed)) for spec in LANGUAGE_SPECS}


def sample_noun_phrase(rng: random.Random, nouns: Sequence[str],
                       adjectives: Sequence[str] = ADJECTIVES,
                       exclude: str | None = None) -> NounPhrase:
  """A noun from `nouns` (not `exclude`), with an adjective 35% and a numeral 20% of the time."""
  noun = rng.choice([n for n in nouns if n != exclude])
  adjective = rng.choice(adjectives) if adjectives and rng.random() < 0.35 else None
  numeral = rng.choice(NUMERALS[1:4]) if rng.random() < 0.2 else None
  return NounPhrase(noun, adjective, numeral)


def sample_clause(rng: random.Random, nouns: Sequence[str] = ALL_NOUNS,
                  adjectives: Sequence[str] = ADJECTIVES,
                  transitive: bool | None = None) -> Clause:
  """A random clause (transitive 60% unless `transitive` says), subject != object noun."""
  if transitive is None:
    transitive = rng.random() < 0.6
  subject = sample_noun_phrase(rng, nouns, adjectives)
  if not transitive:
    return Clause(subject, predicate=rng.choice(adjectives))
  return Clause(subject, verb=rng.choice(VERBS),
                object=sample_noun_phrase(rng, nouns, adjectives, exclude=subject.noun))


def sample_polar_clause(rng: random.Random, positive: bool) -> Clause:
  """A clause with exactly one polar adjective, positive or negative (the rest neutral)."""
  clause = sample_clause(rng, adjectives=NEUTRAL)
  polar = rng.choice(POSITIVE if positive else NEGATIVE)
  if clause.object is None:
    return dataclasses.replace(clause, predicate=polar)
  role = rng.choice(("subject", "object"))
  phrase = dataclasses.replace(getattr(clause, role), adjective=polar)
  return dataclasses.replace(clause, **{role: phrase})


def sample_paragraph(rng: random.Random, language: Language) -> str:
  """Sentences (a clause, or two joined by "and", of 3-17 words) ending in ".", 10-60 words."""
  goal, words = rng.randint(10, 44), []
  while len(words) < goal:
    sentence = language.render(sample_clause(rng))
    if rng.random() < 0.25:
      sentence += f" {language.lexicon['and']} {language.render(sample_clause(rng))}"
    words.extend(f"{sentence}.".split())
  return " ".join(words)


def vocabulary_words(languages: Mapping[str, Language]) -> list[str]:
  """Every word of every lexicon, sorted."""
  return sorted({word for language in languages.values() for word in language.lexicon.values()})


@functools.lru_cache(maxsize=None)
def _one_rule_charsmap() -> bytes:
  """SentencePiece's compiled normalisation table for the single rule U+3000 -> U+0020."""
  with tempfile.TemporaryDirectory() as tmp:
    rule = os.path.join(tmp, "rule.tsv")
    with open(rule, "w") as f:
      f.write("3000\t20\n")
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g"] * 10),
                                   model_writer=writer, vocab_size=20, num_threads=1,
                                   normalization_rule_tsv=rule, hard_vocab_limit=False,
                                   minloglevel=2)
  model = spm_pb2.ModelProto()
  model.ParseFromString(writer.getvalue())
  return model.normalizer_spec.precompiled_charsmap


def vocabulary_model(words: Iterable[str]) -> bytes:
  """Serialized SentencePiece unigram ModelProto: specials, mode tokens, `▁word`s, characters."""
  piece_type = spm_pb2.ModelProto.SentencePiece
  model = spm_pb2.ModelProto()

  def add(piece: str, kind: int, score: float = 0.0) -> None:
    model.pieces.add(piece=piece, type=kind, score=score)

  add("<pad>", piece_type.CONTROL)
  add("</s>", piece_type.CONTROL)
  add("<unk>", piece_type.UNKNOWN)
  for token in MODE_TOKENS:
    add(f"▁{token}", piece_type.USER_DEFINED)
  add("▁", piece_type.NORMAL, -10.0)
  for word in sorted(set(words)):
    if not word or any(ch.isspace() for ch in word):
      raise ValueError(f"vocabulary word {word!r} is empty or holds whitespace")
    add(f"▁{word}", piece_type.NORMAL, -1.0)
  characters = string.ascii_letters + string.digits + string.punctuation
  for ch in sorted(characters):
    add(ch, piece_type.NORMAL, -20.0)

  trainer = model.trainer_spec
  trainer.model_type = spm_pb2.TrainerSpec.UNIGRAM
  trainer.vocab_size = len(model.pieces)
  trainer.character_coverage = 1.0
  trainer.pad_id, trainer.eos_id, trainer.unk_id, trainer.bos_id = 0, 1, 2, -1
  trainer.pad_piece, trainer.eos_piece, trainer.unk_piece = "<pad>", "</s>", "<unk>"
  trainer.user_defined_symbols.extend(f"▁{token}" for token in MODE_TOKENS)
  normalizer = model.normalizer_spec
  normalizer.name = "identity"
  # A non-empty rule table, so SentencePiece (TF-text's copy included) does not log "precompiled
  # charsmap is empty" at every load; its one rule (U+3000 -> ' ') never fires on our text.
  normalizer.precompiled_charsmap = _one_rule_charsmap()
  normalizer.add_dummy_prefix = True
  normalizer.remove_extra_whitespaces = True
  normalizer.escape_whitespaces = True
  return model.SerializeToString(deterministic=True)
