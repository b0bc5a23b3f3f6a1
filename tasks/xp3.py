"""xP3-layout directories as SeqIO tasks, and xP3/mT0-style mixtures over them.

Layout (bigscience/xP3): `{root}/{lang}/xp3_{dataset}_{subset}_{split}_{template}.jsonl`
and/or `merged_{lang}.jsonl` (in `{root}/{lang}/` or `{root}/`); lines hold `inputs` and
`targets` (other fields are ignored) and are validated as they are read, by
`ptuning.data.jsonl.read_jsonl` (`ValueError("path:lineno: ...")`).

Tasks (`register_xp3_directory`):
- `per="file"`: one task per `xp3_*.jsonl` file, `{prefix}_{lang}_{file stem without
  "xp3_"}`; a language with only a merged file gets `{prefix}_{lang}_merged` (a merged file
  next to per-dataset files is skipped, as it repeats them).
- `per="language"`: one task per language, `{prefix}_{lang}`, over its merged file if there
  is one, else over all its `xp3_*` files.
Each task serves its file(s) as every split in `splits` (default train/validation/test,
as `ptuning.data.register_jsonl_task` does).

Mixtures (`mixture_rates` / `register_xp3_mixture`), rates normalised to sum to 1, with
`n_i` = examples of task i and `K` = `cap` (None: no cap):
- "proportional": r_i ∝ min(n_i, K) (T5's examples-proportional mixing);
- "temperature": r_i ∝ min(n_i, K)^(1/T) (T=1 is proportional, T->inf uniform);
- "language": r_i = w_lang(i) / Σ_l w_l · min(n_i, K) / Σ_{j in lang(i)} min(n_j, K), i.e. an
  explicit weight per language (e.g. BLOOMZ's language-proportional mix, the language's share
  of the pretraining corpus) split across its tasks in proportion to their size.
mT0 trained on such mixtures with loss normalised per sequence: see
`gin_configs/runs/xp3_mixture.gin`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from ptuning.data.jsonl import DEFAULT_SPLITS, JSONL_FIELDS, read_jsonl
from tasks.sources import RecordsDataSource

STRATEGIES = ("proportional", "temperature", "language")
_MERGED = re.compile(r"^merged_(?P<lang>.+)\.jsonl$")


@dataclasses.dataclass(frozen=True)
class Xp3Task:
  """What a registered xP3 task reads: its language, files and number of examples."""

  name: str
  language: str
  paths: tuple[str, ...]
  num_examples: int


# name -> (Xp3Task, splits, vocabulary) of the tasks registered here.
_TASKS: dict[str, tuple[Xp3Task, tuple[str, ...], seqio.Vocabulary]] = {}


@functools.lru_cache(maxsize=None)
def _count_lines(path: str, size: int, mtime: float) -> int:
  del size, mtime  # Cache keys: a changed file is counted again.
  with open(path, "rb") as f:
    return sum(1 for line in f if line.strip())


def count_examples(path: str | os.PathLike) -> int:
  """Number of non-blank lines of a jsonl file (cached per size and modification time)."""
  stat = os.stat(path)
  return _count_lines(os.path.abspath(os.fspath(path)), stat.st_size, stat.st_mtime)


def _safe(text: str) -> str:
  return re.sub(r"[^\w.:]", "_", text)


def discover_xp3_files(root: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
  """`{lang: {"files": [xp3_*.jsonl paths], "merged": [merged_{lang}.jsonl]}}`, sorted."""
  root = os.path.abspath(os.fspath(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"xP3 directory not found: {root!r}")
  found: dict[str, dict[str, list[str]]] = {}

  def add(lang: str, kind: str, path: str) -> None:
    found.setdefault(lang, {"files": [], "merged": []})[kind].append(path)

  for entry in sorted(os.listdir(root)):
    path = os.path.join(root, entry)
    if os.path.isfile(path) and (match := _MERGED.match(entry)):
      add(match["lang"], "merged", path)
    elif os.path.isdir(path):
      for name in sorted(os.listdir(path)):
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
          continue
        if name.startswith("xp3_") and name.endswith(".jsonl"):
          add(entry, "files", file_path)
        elif (match := _MERGED.match(name)) and match["lang"] == entry:
          add(entry, "merged", file_path)
  if not found:
    raise ValueError(f"no xP3 files under {root!r} (expected {{lang}}/xp3_*.jsonl or "
                     "merged_{lang}.jsonl)")
  return found


def _plan(found: Mapping[str, Mapping[str, list[str]]], per: str, prefix: str
          ) -> list[tuple[str, str, tuple[str, ...]]]:
  """(task name, language, paths) of every task to register."""
  plan = []
  for lang, kinds in found.items():
    files, merged = kinds["files"], kinds["merged"]
    if len(merged) > 1:
      raise ValueError(f"language {lang!r} has several merged files: {merged}")
    if per == "language":
      plan.append((f"{prefix}_{_safe(lang)}", lang, tuple(merged or files)))
    elif files:
      for path in files:
        stem = os.path.basename(path).removesuffix(".jsonl").removeprefix("xp3_")
        plan.append((f"{prefix}_{_safe(lang)}_{_safe(stem)}", lang, (path,)))
    else:
      plan.append((f"{prefix}_{_safe(lang)}_merged", lang, tuple(merged)))
  return plan


def _add_task(info: Xp3Task, splits: tuple[str, ...], vocabulary: seqio.Vocabulary) -> None:
  spec = (info, splits, vocabulary)
  if info.name in seqio.TaskRegistry.names():
    if _TASKS.get(info.name) == spec:
      return
    raise ValueError(f"a different task is already registered as {info.name!r}; pass another "
                     "name_prefix")
  readers = [functools.partial(read_jsonl, path) for path in info.paths]
  source = RecordsDataSource(
      {split: readers for split in splits},
      {key: tf.TensorSpec((), tf.string) for key in JSONL_FIELDS},
      shard_names={split: list(info.paths) for split in splits},
      num_input_examples={split: info.num_examples for split in splits})
  seqio.TaskRegistry.add(
      info.name, source=source,
      output_features={key: seqio.Feature(vocabulary=vocabulary, add_eos=True)
                       for key in JSONL_FIELDS},
      preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
                     seqio.preprocessors.append_eos_after_trim],
      metric_fns=[])
  _TASKS[info.name] = spec


def register_xp3_directory(root: str | os.PathLike, vocabulary: seqio.Vocabulary,
                           per: str = "file", name_prefix: str = "xp3",
                           splits: Sequence[str] = DEFAULT_SPLITS) -> list[str]:
  """Registers one SeqIO task per xP3 file (`per="file"`) or language; returns the names.

  Files are counted (non-blank lines) for the mixture rates; their lines are validated when
  read. Registering the same directory again returns the same names.
  """
  if per not in ("file", "language"):
    raise ValueError(f"per={per!r}: choose 'file' or 'language'")
  names = []
  for name, lang, paths in _plan(discover_xp3_files(root), per, _safe(name_prefix)):
    info = Xp3Task(name, lang, paths, sum(count_examples(p) for p in paths))
    _add_task(info, tuple(splits), vocabulary)
    names.append(name)
  return names


def xp3_task_info(name: str) -> Xp3Task:
  """The language, files and size of an xP3 task registered by `register_xp3_directory`."""
  if name not in _TASKS:
    raise KeyError(f"{name!r} is not an xP3 task registered here")
  return _TASKS[name][0]


def mixture_rates(num_examples: Mapping[str, int], strategy: str = "proportional", *,
                  cap: int | None = None, temperature: float = 1.0,
                  language_weights: Mapping[str, float] | None = None,
                  languages: Mapping[str, str] | None = None) -> dict[str, float]:
  """Sampling rate of each task (summing to 1) under `strategy`; see the module docstring.

  `num_examples`: task -> size; `languages`: task -> language (for "language", with
  `language_weights`: language -> weight >= 0, one for every language present).
  """
  if not num_examples:
    raise ValueError("no tasks to mix")
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy={strategy!r}: choose from {STRATEGIES}")
  if cap is not None and cap <= 0:
    raise ValueError(f"cap={cap} must be positive")
  sizes = {task: float(min(n, cap) if cap is not None else n) for task, n in num_examples.items()}
  if any(n < 0 for n in sizes.values()):
    raise ValueError(f"negative sizes in {dict(num_examples)}")
  if strategy == "temperature":
    if temperature <= 0:
      raise ValueError(f"temperature={temperature} must be positive")
    weights = {task: n ** (1.0 / temperature) for task, n in sizes.items()}
  elif strategy == "proportional":
    weights = sizes
  else:
    if not language_weights or languages is None:
      raise ValueError("strategy='language' needs language_weights and each task's language")
    by_lang: dict[str, float] = {}
    for task, n in sizes.items():
      by_lang[languages[task]] = by_lang.get(languages[task], 0.0) + n
    missing = sorted(set(by_lang) - set(language_weights))
    if missing:
      raise ValueError(f"no language_weights for languages {missing}")
    weights = {task: language_weights[languages[task]] * (n / by_lang[languages[task]]
                                                          if by_lang[languages[task]] else 0.0)
               for task, n in sizes.items()}
  total = sum(weights.values())
  if total <= 0:
    raise ValueError(f"all mixing weights are zero: {weights}")
  return {task: w / total for task, w in weights.items()}


def register_xp3_mixture(name: str, task_names: Sequence[str], strategy: str = "proportional",
                         *, cap: int | None = None, temperature: float = 1.0,
                         language_weights: Mapping[str, float] | None = None,
                         num_examples: Mapping[str, int] | None = None,
                         languages: Mapping[str, str] | None = None) -> dict[str, float]:
  """Registers `seqio.Mixture(name, [(task, rate)])` with `mixture_rates`; returns the rates.

  Sizes and languages of xP3 tasks come from their registration; other tasks (e.g. template
  tasks) need `num_examples` (and `languages` for "language"), else their source's
  `num_input_examples("train")`. Registering the same mixture again is a no-op.
  """
  sizes, langs = {}, dict(languages or {})
  for task in task_names:
    if num_examples and task in num_examples:
      sizes[task] = num_examples[task]
    elif task in _TASKS:
      sizes[task] = _TASKS[task][0].num_examples
    else:
      count = seqio.get_mixture_or_task(task).num_input_examples("train")
      if count is None:
        raise ValueError(f"size of task {task!r} unknown: pass num_examples={{{task!r}: n}}")
      sizes[task] = count
    if task in _TASKS:
      langs.setdefault(task, _TASKS[task][0].language)
  rates = mixture_rates(sizes, strategy, cap=cap, temperature=temperature,
                        language_weights=language_weights, languages=langs)
  entries = sorted(rates.items())
  if name in seqio.MixtureRegistry.names():
    existing = seqio.get_mixture_or_task(name)
    if sorted((t.name, existing.get_rate(t)) for t in existing.tasks) == entries:
      return rates
    raise ValueError(f"a different mixture is already registered as {name!r}")
  seqio.MixtureRegistry.add(name, entries)
  return rates
