"""UL2's mixture of denoisers (Tay et al., 2022) as SeqIO preprocessors, tasks and a mixture.

A `Denoiser` turns a tokenized text `[n]` into `inputs` = mode tokens + the text with each
noise span replaced by one sentinel, and `targets` = (sentinel + span tokens) per span, in
T5's span-corruption format (`<extra_id_0>` = `vocab_size - 1`, `<extra_id_1>`, ... numbered
in order), or, for the S-denoiser (prefix LM), `inputs` = mode tokens + a prefix and
`targets` = the rest. Mode tokens are `vocabulary.encode(mode_token)`, prepended to the inputs
as UL2 does ("[NLU]" for R, "[NLG]" for X, "[S2S]" for S: the google/ul2 model card).

Span corruption draws, per chunk of n tokens, `n·density` noise tokens and `noise/mean`
spans, each rounded up or down at random so that both are right in expectation (T5's
`random_spans_noise_mask` rounds to nearest, which for long spans is far off: 15% of 512
tokens in spans of 64 gives one span of 77); at least one span, at least one token kept.
The spans are placed uniformly at random (the first and last run may be noise or not).
Chunks: a text longer than fits is split into near-equal chunks, each small enough that its
worst case (every rounding up where it costs room) fits `inputs`/`targets` with mode tokens
and EOS, and has no more spans than the vocabulary has sentinels: nothing is ever truncated.
Texts of fewer than 2 tokens are dropped. The S-denoiser takes chunks of up to one more
token than the longer of inputs and targets holds and splits each at a uniform point among
those where both parts fit (both non-empty): with equal lengths anywhere, as T5's `prefix_lm`.
Randomness is stateless, seeded per example by SeqIO (`seqio.map_over_dataset(num_seeds=1)`),
so a task's examples are a function of its seed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import zlib
from collections.abc import Iterator, Mapping, Sequence

import seqio
import tensorflow as tf

from ptuning.data.jsonl import DEFAULT_SPLITS
from tasks.sources import RecordsDataSource

_NAME = re.compile(r"^\w+$")


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One UL2 denoiser: span corruption (mean span length, noise density) or prefix LM."""

  name: str
  mode_token: str
  mean_span_length: float | None
  noise_density: float | None
  prefix_lm: bool = False
  rate: float = 1.0

  def __post_init__(self):
    if not isinstance(self.name, str) or not _NAME.match(self.name):
      raise ValueError(f"Denoiser.name={self.name!r}: use letters, digits and '_'")
    if not isinstance(self.mode_token, str):
      raise ValueError(f"Denoiser.mode_token={self.mode_token!r} must be a string")
    if not (isinstance(self.rate, (int, float)) and math.isfinite(self.rate) and self.rate >= 0):
      raise ValueError(f"Denoiser {self.name}: rate={self.rate!r} must be a finite number >= 0")
    if self.prefix_lm:
      if self.mean_span_length is not None or self.noise_density is not None:
        raise ValueError(f"Denoiser {self.name}: a prefix-LM denoiser takes no "
                         "mean_span_length/noise_density (set them to None)")
      return
    density, mean = self.noise_density, self.mean_span_length
    if not (isinstance(density, (int, float)) and 0 < density < 1):
      raise ValueError(f"Denoiser {self.name}: noise_density={density!r} must lie in (0, 1)")
    if not (isinstance(mean, (int, float)) and math.isfinite(mean) and mean >= 1):
      raise ValueError(f"Denoiser {self.name}: mean_span_length={mean!r} must be a number >= 1")


# UL2's seven denoisers (paper §3.1.2). Rates: 20% S-denoising and 40% each for the R and the
# X family, split equally within a family, as the UL2 recipe of the Finnish-NLP t5x models does
# ("20% for S-denoising (suggested at the paper chapter 4.5)"); the `ul2_objective` code of the
# paper's appendix samples all denoisers uniformly when given no rates.
UL2_DENOISERS: tuple[Denoiser, ...] = (
    Denoiser("r3_15", "[NLU]", 3, 0.15, rate=0.2),
    Denoiser("r8_15", "[NLU]", 8, 0.15, rate=0.2),
    Denoiser("x3_50", "[NLG]", 3, 0.5, rate=0.1),
    Denoiser("x8_50", "[NLG]", 8, 0.5, rate=0.1),
    Denoiser("x64_15", "[NLG]", 64, 0.15, rate=0.1),
    Denoiser("x64_50", "[NLG]", 64, 0.5, rate=0.1),
    Denoiser("s", "[S2S]", None, None, prefix_lm=True, rate=0.2),
)


def ul2_denoisers(rates: Mapping[str, float] | None = None,
                  denoisers: Sequence[Denoiser] = UL2_DENOISERS) -> tuple[Denoiser, ...]:
  """`denoisers` with the rates named in `rates` replaced (0 leaves a denoiser out)."""
  rates = dict(rates or {})
  unknown = sorted(set(rates) - {d.name for d in denoisers})
  if unknown:
    raise ValueError(f"rates for unknown denoisers {unknown}; known: {[d.name for d in denoisers]}")
  return tuple(dataclasses.replace(d, rate=float(rates[d.name])) if d.name in rates else d
               for d in denoisers)


def _rounding(x: float) -> tuple[int, float]:
  """(floor(x), P(round up)) of rounding x up or down at random, right in expectation."""
  low = math.floor(x)
  return low, x - low


def _span_counts(n: int, denoiser: Denoiser) -> list[tuple[int, int]]:
  """Every (noise tokens, noise spans) a chunk of n >= 2 tokens can draw."""
  low, _ = _rounding(n * denoiser.noise_density)
  counts = []
  for noise in sorted({min(max(c, 1), n - 1) for c in (low, low + 1)}):
    spans_low, _ = _rounding(noise / denoiser.mean_span_length)
    top = min(noise, n - noise + 1)
    spans = {min(max(c, 1), top) for c in (spans_low, spans_low + 1)}
    counts += [(noise, s) for s in sorted(spans)]
  return counts


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
  """How a denoiser fits its examples: chunk size, mode-token ids, room per feature."""

  max_tokens: int  # longest chunk of text tokens
  mode_ids: tuple[int, ...]
  inputs_room: int  # inputs length less mode tokens and EOS
  targets_room: int  # targets length less EOS


def plan_chunks(denoiser: Denoiser, inputs_length: int, targets_length: int,
                vocabulary: seqio.Vocabulary, use_mode_tokens: bool = True,
                add_eos: tuple[bool, bool] = (True, True)) -> ChunkPlan:
  """The longest chunk n such that every chunk of 2..n tokens fits the lengths (ValueError if none).

  `add_eos`: whether EOS is appended to (inputs, targets) afterwards (room is kept for it).
  """
  mode_ids = (tuple(int(i) for i in vocabulary.encode(denoiser.mode_token))
              if use_mode_tokens else ())
  inputs_room = inputs_length - len(mode_ids) - int(add_eos[0])
  targets_room = targets_length - int(add_eos[1])
  num_sentinels = int(getattr(vocabulary, "extra_ids", 0) or 0)
  if denoiser.prefix_lm:
    max_tokens = max(inputs_room, targets_room) + 1 if min(inputs_room, targets_room) >= 1 else 0
  else:
    if num_sentinels < 1:
      raise ValueError(f"denoiser {denoiser.name}: the vocabulary has no sentinel (extra) ids")

    def fits(n: int) -> bool:
      return all(n - noise + spans <= inputs_room and noise + spans <= targets_room
                 and spans <= num_sentinels for noise, spans in _span_counts(n, denoiser))

    max_tokens = 1
    while fits(max_tokens + 1):
      max_tokens += 1
  if max_tokens < 2:
    raise ValueError(f"inputs_length={inputs_length}, targets_length={targets_length} leave no "
                     f"room for denoiser {denoiser.name} ({len(mode_ids)} mode token ids, EOS)")
  return ChunkPlan(max_tokens, mode_ids, inputs_room, targets_room)


def _random_parts(total: tf.Tensor, parts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Sizes `[parts]` (each >= 1, sum `total`) of a uniformly random composition of `total`."""
  order = tf.argsort(tf.random.stateless_uniform([total - 1], seed=seed))
  cuts = tf.sort(order[:parts - 1]) + 1
  bounds = tf.concat([[0], cuts, [total]], axis=0)
  return bounds[1:] - bounds[:-1]


def span_noise_mask(length: tf.Tensor, num_noise: tf.Tensor, num_spans: tf.Tensor,
                    seed: tf.Tensor) -> tf.Tensor:
  """Bool `[length]`: `num_spans` runs of noise holding `num_noise` tokens, placed at random.

  Needs 1 <= num_spans <= num_noise < length and num_spans <= length - num_noise + 1 (kept
  runs between spans are non-empty; the first and last may be empty). `seed`: int32 `[2]`.
  """
  seeds = tf.random.experimental.stateless_split(seed, 2)
  noise = _random_parts(num_noise, num_spans, seeds[0])
  keep = _random_parts(length - num_noise + 2, num_spans + 1, seeds[1])
  keep -= tf.one_hot(0, num_spans + 1, dtype=tf.int32) + tf.one_hot(num_spans, num_spans + 1,
                                                                      dtype=tf.int32)
  runs = tf.concat([tf.reshape(tf.stack([keep[:-1], noise], axis=1), [-1]), keep[-1:]], axis=0)
  return tf.repeat(tf.range(2 * num_spans + 1) % 2 == 1, runs)


def spans_to_sentinels(tokens: tf.Tensor, mask: tf.Tensor, vocab_size: int
                       ) -> tuple[tf.Tensor, tf.Tensor]:
  """(inputs, targets) of T5 span corruption of `tokens [n]` under the noise `mask [n]`.

  inputs: tokens with span i replaced by sentinel `vocab_size - 1 - i`; targets: sentinel i
  followed by span i's tokens, for each span in order.
  """
  follows_noise = tf.concat([[False], mask[:-1]], axis=0)
  first = mask & ~follows_noise
  sentinels = vocab_size - 1 - (tf.cumsum(tf.cast(first, tf.int32)) - 1)
  inputs = tf.boolean_mask(tf.where(first, sentinels, tokens), ~(mask & follows_noise))
  marked = tf.stack([tf.where(first, sentinels, -1), tokens], axis=1)
  pairs = tf.reshape(tf.boolean_mask(marked, mask), [-1])
  return inputs, tf.boolean_mask(pairs, pairs >= 0)


def _chunks(tokens: tf.Tensor, max_tokens: int) -> tf.data.Dataset:
  """`tokens [n]` split into ceil(n / max_tokens) chunks whose sizes differ by at most 1."""
  n = tf.size(tokens)
  count = (n + max_tokens - 1) // max_tokens
  sizes = n // count + tf.cast(tf.range(count) < n % count, tf.int32)
  starts = tf.cumsum(sizes, exclusive=True)
  return tf.data.Dataset.from_tensor_slices((starts, sizes)).map(
      lambda start, size: tokens[start:start + size])


def _corrupt(tokens: tf.Tensor, seed: tf.Tensor, denoiser: Denoiser, plan: ChunkPlan,
             vocab_size: int) -> dict[str, tf.Tensor]:
  """`{"inputs", "targets"}` of one chunk `tokens [n]`, n in [2, plan.max_tokens]."""
  n = tf.size(tokens)
  mode = tf.constant(plan.mode_ids, tf.int32, shape=[len(plan.mode_ids)])
  # Each denoiser draws its own numbers (a mixture's tasks get the same seeds from SeqIO).
  seed = tf.random.experimental.stateless_fold_in(seed, zlib.crc32(denoiser.name.encode()) >> 1)
  seeds = tf.random.experimental.stateless_split(seed, 3)
  if denoiser.prefix_lm:
    low = tf.maximum(1, n - plan.targets_room)
    high = tf.minimum(n - 1, plan.inputs_room)
    split = tf.random.stateless_uniform([], seeds[0], minval=low, maxval=high + 1, dtype=tf.int32)
    return {"inputs": tf.concat([mode, tokens[:split]], 0), "targets": tokens[split:]}
  table = [_rounding(k * denoiser.noise_density) for k in range(plan.max_tokens + 1)]
  spans_table = [_rounding(k / denoiser.mean_span_length) for k in range(plan.max_tokens + 1)]

  def draw(rounding, index, seed, low, high):
    floor = tf.gather(tf.constant([r[0] for r in rounding], tf.int32), index)
    p_up = tf.gather(tf.constant([r[1] for r in rounding], tf.float32), index)
    up = tf.cast(tf.random.stateless_uniform([], seed) < p_up, tf.int32)
    return tf.clip_by_value(floor + up, low, high)

  noise = draw(table, n, seeds[0], 1, n - 1)
  spans = draw(spans_table, noise, seeds[1], 1, tf.minimum(noise, n - noise + 1))
  mask = span_noise_mask(n, noise, spans, seeds[2])
  inputs, targets = spans_to_sentinels(tokens, mask, vocab_size)
  return {"inputs": tf.concat([mode, inputs], 0), "targets": targets}


def ul2_denoise(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                output_features: Mapping[str, seqio.Feature], *, denoiser: Denoiser,
                text_key: str = "targets", use_mode_tokens: bool = True,
                default_lengths: Mapping[str, int] | None = None,
                merge_texts: int = 1) -> tf.data.Dataset:
  """SeqIO preprocessor: tokenized texts `text_key [n]` -> `{"inputs", "targets"}` (int32).

  Place after `seqio.preprocessors.tokenize` (and `CacheDatasetPlaceholder`), before
  `append_eos_after_trim`. Chunks fit `sequence_length` (as SeqIO passes it), else
  `default_lengths`. `merge_texts`: consecutive texts joined into one token stream first
  (UL2 joins 128, `merge_examples_to_reduce_padding`), for corpora of short lines.
  Other features are dropped.
  """
  lengths = {key: (sequence_length or {}).get(key) or (default_lengths or {}).get(key)
             for key in ("inputs", "targets")}
  if None in lengths.values():
    raise ValueError(f"ul2_denoise needs inputs and targets lengths; got {sequence_length}")
  if merge_texts < 1:
    raise ValueError(f"merge_texts={merge_texts} must be >= 1")
  vocab = output_features["inputs"].vocabulary
  if output_features["targets"].vocabulary != vocab:
    raise ValueError("ul2_denoise needs the same vocabulary for inputs and targets")
  plan = plan_chunks(denoiser, lengths["inputs"], lengths["targets"], vocab, use_mode_tokens,
                     (output_features["inputs"].add_eos, output_features["targets"].add_eos))
  ds = dataset.map(lambda x: tf.cast(x[text_key], tf.int32))
  if merge_texts > 1:
    ds = ds.ragged_batch(merge_texts).map(lambda texts: texts.flat_values)
  ds = ds.filter(lambda tokens: tf.size(tokens) >= 2)
  ds = ds.flat_map(functools.partial(_chunks, max_tokens=plan.max_tokens))

  @seqio.map_over_dataset(num_seeds=1)
  def corrupt(tokens, seed):
    return _corrupt(tokens, seed, denoiser, plan, vocab.vocab_size)

  return corrupt(ds)


def read_text_file(path: str) -> Iterator[dict[str, str]]:
  """`{"text": str}` per non-blank line of a `.txt` file, or per `.jsonl` line's `text` field.

  A bad line raises `ValueError("{path}:{lineno}: ...")`.
  """
  is_jsonl = path.endswith(".jsonl")
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8: {e}") from None
      if not line.strip():
        continue
      if not is_jsonl:
        yield {"text": line.rstrip("\r\n")}
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
      if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{where}: expected a JSON object with a string field 'text'")
      yield {"text": record["text"]}


@functools.lru_cache(maxsize=None)
def _text_source(paths: tuple[str, ...], splits: tuple[str, ...]) -> RecordsDataSource:
  readers = [functools.partial(read_text_file, path) for path in paths]
  return RecordsDataSource({split: readers for split in splits},
                           {"text": tf.TensorSpec((), tf.string)},
                           shard_names={split: list(paths) for split in splits})


def text_file_source(paths: str | os.PathLike | Sequence[str | os.PathLike],
                     splits: Sequence[str] = DEFAULT_SPLITS) -> RecordsDataSource:
  """A source of `{"text"}` over `.txt`/`.jsonl` files (`read_text_file`), all in every split.

  The same files give the same source object, so registering them again is idempotent.
  """
  paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
  if not paths:
    raise ValueError("no text files given")
  resolved = tuple(os.path.abspath(os.fspath(p)) for p in paths)
  for path in resolved:
    if not path.endswith((".txt", ".jsonl")):
      raise ValueError(f"{path!r}: expected a .txt or .jsonl file")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"text file not found: {path!r}")
  return _text_source(resolved, tuple(splits))


# name -> what a task or mixture was registered from (to make re-registration idempotent).
_REGISTERED: dict[str, tuple] = {}


def register_ul2_tasks(name: str, source: seqio.DataSource, vocabulary: seqio.Vocabulary,
                       text_key: str = "text", denoisers: Sequence[Denoiser] = UL2_DENOISERS,
                       inputs_length: int = 512, targets_length: int = 512,
                       use_mode_tokens: bool = True, merge_texts: int = 1) -> str:
  """Registers task `{name}_{denoiser.name}` per denoiser of rate > 0 and mixture `name`.

  The mixture's rates are the denoisers' rates normalised to sum to 1. Tasks read `text_key`
  of `source`, emit `inputs`/`targets` with `vocabulary` and EOS, and fit `inputs_length`/
  `targets_length` unless SeqIO asks for other lengths (see `ul2_denoise`). Registering the
  same configuration (the same `source` object too) again returns `name`; a different one
  under a taken name raises.
  """
  if not re.match(r"^[\w.:]+$", name):
    raise ValueError(f"name={name!r}: a SeqIO name takes letters, digits, '_', '.' and ':'")
  denoisers = [d for d in denoisers if d.rate > 0]
  if not denoisers:
    raise ValueError("every denoiser has rate 0: nothing to mix")
  names = [d.name for d in denoisers]
  if len(set(names)) != len(names):
    raise ValueError(f"denoiser names repeat: {names}")
  lengths = {"inputs": inputs_length, "targets": targets_length}
  for denoiser in denoisers:  # fail early on lengths too small for a denoiser
    plan_chunks(denoiser, inputs_length, targets_length, vocabulary, use_mode_tokens)
  total = sum(d.rate for d in denoisers)
  tasks = {f"{name}_{d.name}": (source, vocabulary, text_key, dataclasses.replace(d, rate=1.0),
                                tuple(lengths.items()), use_mode_tokens, merge_texts)
           for d in denoisers}
  mixture = tuple(sorted((f"{name}_{d.name}", d.rate / total) for d in denoisers))
  taken = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  for key, spec in [*tasks.items(), (name, mixture)]:
    if key in taken and _REGISTERED.get(key) != spec:
      raise ValueError(f"a different task or mixture is already registered as {key!r}")
  features = {key: seqio.Feature(vocabulary=vocabulary, add_eos=True)
              for key in ("inputs", "targets")}
  for (task_name, spec), denoiser in zip(tasks.items(), denoisers):
    if task_name in taken:
      continue
    seqio.TaskRegistry.add(
        task_name, source=source, output_features=features, metric_fns=[],
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
            seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
            functools.partial(ul2_denoise, denoiser=denoiser, use_mode_tokens=use_mode_tokens,
                              default_lengths=lengths, merge_texts=merge_texts),
            seqio.preprocessors.append_eos_after_trim])
    _REGISTERED[task_name] = spec
  if name not in taken:
    seqio.MixtureRegistry.add(name, list(mixture))
    _REGISTERED[name] = mixture
  return name
