"""Our SeqIO vocabulary gives the same ids as Hugging Face's T5 tokenizer on the real T5 spiece model."""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ptuning.vocab import DEFAULT_EXTRA_IDS, encode_field, get_vocabulary  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SPM = SHARED / "t5_vocab" / "spiece.model"

# Sentinels are written with spaces around them: Hugging Face encodes the text between
# special tokens as separate segments with a leading "▁" each, so "<extra_id_1>." gives
# [32098, 3, 5] there but [32098, 5] in SentencePiece/SeqIO (what T5 was trained with).
SENTENCES = [
    "Hello world, this is T5.",
    "sst2 sentence: it 's a charming and often affecting journey . ",
    "translate English to German: That is good.",
    "x^2 + y^2 = 42; 3.14159 (pi) [1/2] {a} @user #tag 100% $5.00",
    "Zürich café – naïve résumé 123,456.78!",
    "Ünïcödé: 東京 and Ελληνικά, émigré — “quotes” ‘single’ …",
    "  multiple   spaces\tand a tab ",
    "<extra_id_0> fox <extra_id_1>",
    "The quick brown <extra_id_0> over the lazy <extra_id_1> and <extra_id_99> end",
]


@pytest.fixture(scope="module")
def vocab():
  return get_vocabulary(str(SPM))


@pytest.fixture(scope="module")
def hf_tokenizer():
  import transformers
  # A local directory holding only spiece.model: converted offline, nothing is downloaded.
  return transformers.T5Tokenizer.from_pretrained(str(SPM.parent), extra_ids=DEFAULT_EXTRA_IDS)


def test_sizes_and_special_ids(vocab):
  assert vocab.vocab_size == 32100
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.encode("<extra_id_0>") == [32099]
  assert vocab.encode("<extra_id_99>") == [32000]


def test_documented_example(vocab):
  assert vocab.encode("Hello world, this is T5.") == [8774, 296, 6, 48, 19, 332, 9125]
  assert encode_field("Hello world, this is T5.", vocab) == [8774, 296, 6, 48, 19, 332, 9125, 1]
  assert encode_field("Hello world, this is T5.", vocab, append_eos=False)[-1] == 9125


@pytest.mark.parametrize("sentence", SENTENCES)
def test_matches_hugging_face(vocab, hf_tokenizer, sentence):
  ours = encode_field(sentence, vocab)
  assert ours == vocab.encode(sentence) + [1]
  assert ours == hf_tokenizer(sentence).input_ids


def test_sentinels_match_hugging_face(vocab, hf_tokenizer):
  ids = encode_field("<extra_id_0> fox <extra_id_1>", vocab)
  assert ids == [32099, 3, 20400, 32098, 1]
  assert ids == hf_tokenizer("<extra_id_0> fox <extra_id_1>").input_ids
  assert hf_tokenizer.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_1>"]) == [32099, 32098]


def test_decode_round_trip(vocab):
  ids = vocab.encode(SENTENCES[0])
  assert vocab.decode(ids) == SENTENCES[0]


def test_token_id_lists_pass_through(vocab):
  assert encode_field([5, 6, 7], vocab) == [5, 6, 7]
  assert encode_field(np.array([5, 6, 7]).tolist(), vocab, append_eos=True) == [5, 6, 7]
  assert encode_field([np.int64(32099)], vocab) == [32099]
  assert encode_field([], vocab) == []


@pytest.mark.parametrize("bad", [[5, 32100], [-1], [1.5], ["3"], [True]])
def test_invalid_token_ids_are_named(vocab, bad):
  with pytest.raises(ValueError, match=re.escape(f"token id {bad[-1]!r}")):
    encode_field(bad, vocab)


def test_non_field_type_rejected(vocab):
  with pytest.raises(TypeError, match="int"):
    encode_field(7, vocab)


def test_missing_model_file(tmp_path):
  missing = tmp_path / "nope" / "spiece.model"
  with pytest.raises(FileNotFoundError, match="nope"):
    get_vocabulary(str(missing))
