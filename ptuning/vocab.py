"""The T5 SentencePiece vocabulary (via SeqIO) and tokenisation of one example field.

T5, T5 1.1, Flan-T5 and UL2 share one 32,000-piece SentencePiece model; SeqIO appends
`extra_ids` sentinels counted down from the top (`<extra_id_0>` = 32099 ... `<extra_id_99>`
= 32000), so the vocabulary has 32,100 ids (models pad their embedding to 32,128).
Ids: pad = 0, eos = 1, unk = 2; there is no BOS.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from numbers import Integral

# Importing seqio imports TensorFlow: keep its C++ logging quiet unless the user asked otherwise.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import seqio  # noqa: E402

DEFAULT_EXTRA_IDS = 100


def get_vocabulary(spm_path: str | os.PathLike, extra_ids: int = DEFAULT_EXTRA_IDS
                   ) -> seqio.SentencePieceVocabulary:
  """SeqIO vocabulary of a SentencePiece model file with `extra_ids` sentinel ids appended."""
  spm_path = os.fspath(spm_path)
  if not os.path.isfile(spm_path):
    raise FileNotFoundError(f"SentencePiece model not found: {spm_path!r}")
  return seqio.SentencePieceVocabulary(spm_path, extra_ids=extra_ids)


def encode_field(value: str | Sequence[int], vocab: seqio.Vocabulary,
                 append_eos: bool = True) -> list[int]:
  """Token ids `[length]` of one example field.

  A `str` is tokenised and, with `append_eos`, gets `vocab.eos_id` (1) appended, as SeqIO's
  `tokenize` + `append_eos_after_trim` do (no trimming here). A sequence of ints is taken as
  already tokenised and returned unchanged (no EOS added); every id must lie in
  `[0, vocab.vocab_size)`.
  """
  if isinstance(value, str):
    ids = list(vocab.encode(value))
    return ids + [vocab.eos_id] if append_eos else ids
  if isinstance(value, (bytes, bytearray)) or not isinstance(value, Sequence):
    raise TypeError(f"field must be a str or a list of token ids, got {type(value).__name__}")
  ids = []
  for token in value:
    if isinstance(token, bool) or not isinstance(token, Integral):
      raise ValueError(f"token id {token!r} in field {list(value)!r} is not an int")
    if not 0 <= token < vocab.vocab_size:
      raise ValueError(f"token id {token} in field {list(value)!r} is outside "
                       f"[0, {vocab.vocab_size})")
    ids.append(int(token))
  return ids
