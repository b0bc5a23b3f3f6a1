"""`ptuning score`: summed log-likelihood of each target given its input, for jsonl files.

Each line is `{"inputs": ..., "targets": ...}`; a field is text (tokenised, EOS appended, as
SeqIO does) or a list of token ids (used exactly as given). Output lines are the input lines
with `"score"` added, written to a temporary file and renamed at the end, so a failure never
leaves a truncated output or touches the input.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from typing import Any, Hashable, Iterable, Iterator, NamedTuple, Sequence

import jax
import numpy as np

from ptuning.model import decoding
from ptuning.model.config import T5Config
from ptuning.model.t5 import EncoderDecoder

LENGTH_BUCKET = 16  # pad lengths up to a multiple of this, so few shapes are compiled


def read_jsonl_examples(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(line number, example) for every line; errors name `file:line` and the field at fault."""
  # Imported here: `ptuning.data` loads TensorFlow and SeqIO, which scoring arrays (the rank
  # bench, rank tasks) does not need.
  from ptuning.data.jsonl import parse_jsonl_line
  examples = []
  with open(path, "rb") as f:
    for line_number, line in enumerate(f, start=1):
      example = parse_jsonl_line(line, path, line_number, allow_token_ids=True,
                                 keep_other_fields=True)
      if example is not None:
        examples.append((line_number, example))
  if not examples:
    raise ValueError(f"{path}: no examples")
  return examples


def tokenize_field(value: str | list[int], vocab, vocab_size: int, where: str) -> list[int]:
  """Text -> ids + EOS (needs `vocab`); id lists are checked against the model's vocabulary."""
  if isinstance(value, str):
    if vocab is None:
      raise ValueError(f"{where}: text field needs a vocabulary (--vocab spiece.model)")
    return list(vocab.encode(value)) + [1]
  bad = [t for t in value if not 0 <= t < vocab_size]
  if bad:
    raise ValueError(f"{where}: token ids {bad[:5]} outside the model vocabulary [0, {vocab_size})")
  return list(value)


def _pad(rows: list[list[int]], batch: int) -> np.ndarray:
  length = max(1, max(len(r) for r in rows))
  length = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
  out = np.zeros((batch, length), np.int32)
  for i, row in enumerate(rows):
    out[i, :len(row)] = row
  return out


# Candidate groups of different sizes are padded to the largest with empty rows (decoder work
# only, the encoder runs once per input either way) while that at most doubles the rows.
MAX_GROUP_PADDING = 2.0


def _runs(keys: Sequence[Hashable]) -> list[int]:
  """Lengths of the runs of consecutive equal keys."""
  return [sum(1 for _ in run) for _, run in itertools.groupby(keys)]


def candidate_group_size(keys: Sequence[Hashable]) -> int:
  """G > 1 when `keys` come in consecutive runs of equal keys (rows that are candidates of one
  input, as rank classification writes them), which then share one encoding: the longest run,
  the others padded to it, as long as padding at most doubles the rows
  (`MAX_GROUP_PADDING`); else 1 (every row on its own)."""
  return _group_size(_runs(keys))


def _group_size(runs: list[int]) -> int:
  group = max(runs, default=1)
  return group if group > 1 and group * len(runs) <= MAX_GROUP_PADDING * sum(runs) else 1


class CandidateBatch(NamedTuple):
  """One call's rows: `inputs` (a row index per input, its first candidate), `targets` (G slots
  per input, each a row index or -1 for a padding slot whose score is dropped), and the padded
  batch sizes `num_inputs` and `num_rows = num_inputs * G`, the same for every batch."""
  inputs: list[int]
  targets: list[int]
  num_inputs: int
  num_rows: int


def candidate_batches(keys: Sequence[Hashable], batch_size: int) -> Iterator[CandidateBatch]:
  """Batches of whole candidate groups of rows keyed by their input (`candidate_group_size`: G):
  `batch_size // G` inputs and their candidates each, every group padded to G slots, so that one
  compilation serves every batch."""
  runs = _runs(keys)
  group = _group_size(runs)
  if group == 1:
    runs = [1] * len(keys)
  starts = list(itertools.accumulate([0] + runs[:-1]))
  inputs_per_batch = max(1, batch_size // group)
  for first in range(0, len(runs), inputs_per_batch):
    chosen = range(first, min(first + inputs_per_batch, len(runs)))
    targets = [starts[g] + i if i < runs[g] else -1 for g in chosen for i in range(group)]
    yield CandidateBatch([starts[g] for g in chosen], targets, inputs_per_batch,
                         inputs_per_batch * group)


def scatter_scores(batches: Iterable[tuple[CandidateBatch, np.ndarray]], num_rows: int
                   ) -> np.ndarray:
  """Each batch's slot scores `[num_rows of the batch]` back to their rows `[num_rows]`."""
  out = np.full(num_rows, np.nan, np.float32)
  for batch, scores in batches:
    slots = [i for i, row in enumerate(batch.targets) if row >= 0]
    out[[batch.targets[i] for i in slots]] = np.asarray(scores)[slots]
  return out


def make_score_fn(cfg: T5Config):
  """jit-compiled `(params, inputs [N, L], targets [N * G, T]) -> summed log p(targets) [N * G]`;
  targets `i * G ... i * G + G - 1` are scored against input `i`, encoded once."""
  model = EncoderDecoder(cfg)

  @jax.jit
  def score(params, inputs, targets):
    logits = model.apply({"params": params}, inputs, decoding.shift_right(targets))
    return decoding.sequence_log_likelihood(logits, targets)
  return score


def score_token_ids(cfg: T5Config, params: Any, inputs: list[list[int]], targets: list[list[int]],
                    batch_size: int = 16) -> np.ndarray:
  """Scores of tokenised examples `[num_examples]` (float32). Consecutive examples with the same
  input (`candidate_group_size`: G) share one encoding: each call scores `batch_size // G`
  inputs' candidates."""
  score = make_score_fn(cfg)

  def run(batch: CandidateBatch):
    rows_tgt = [targets[r] if r >= 0 else [] for r in batch.targets]
    return batch, score(params, _pad([inputs[r] for r in batch.inputs], batch.num_inputs),
                        _pad(rows_tgt, batch.num_rows))
  return scatter_scores(map(run, candidate_batches([tuple(r) for r in inputs], batch_size)),
                        len(inputs))


def write_jsonl_atomically(path: str, rows: Iterable[dict[str, Any]]) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".jsonl")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def score_file(cfg: T5Config, params: Any, inputs_path: str, output_path: str, vocab=None,
               batch_size: int = 16) -> np.ndarray:
  if os.path.abspath(inputs_path) == os.path.abspath(output_path):
    raise ValueError(f"--output {output_path!r} would overwrite the input file")
  examples = read_jsonl_examples(inputs_path)
  tokenized = {field: [tokenize_field(ex[field], vocab, cfg.vocab_size, f"{inputs_path}:{line}")
                       for line, ex in examples] for field in ("inputs", "targets")}
  scores = score_token_ids(cfg, params, tokenized["inputs"], tokenized["targets"], batch_size)
  write_jsonl_atomically(output_path,
                         ({**ex, "score": float(s)} for (_, ex), s in zip(examples, scores)))
  return scores

