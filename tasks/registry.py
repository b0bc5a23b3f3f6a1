"""Registering tasks by name from gin: `@tasks.xp3_mixture()`, `@tasks.benchmark_task()`,
`@tasks.ul2_mixture()`, `@tasks.mixture()` (a mixture of registered tasks and mixtures).

Each function registers what it needs (idempotently) and returns a SeqIO name, so a gin
file can write `MIXTURE_OR_TASK_NAME = @tasks.xp3_mixture()` (see
`gin_configs/runs/xp3_mixture.gin`) or `MIXTURE_OR_TASK_NAME = @tasks.benchmark_task()`
with `tasks.benchmark_task.name = 'super_glue_cb'`. A gin file makes them available with
the line `import tasks.registry` (importing this module registers them with gin).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import gin
import seqio

from ptuning.vocab import get_vocabulary
from tasks.glue import GLUE_TASKS, register_glue_tasks
from tasks.superglue import SUPERGLUE_TASKS, register_superglue_tasks
from tasks.ul2 import register_ul2_tasks, text_file_source, ul2_denoisers
from tasks.xp3 import register_xp3_directory, register_xp3_mixture


def _vocabulary(vocabulary_path: str | None, caller: str):
  if not vocabulary_path:
    raise ValueError(f"{caller} needs a SentencePiece model: set VOCABULARY_PATH")
  return get_vocabulary(vocabulary_path)


def xp3_mixture(root: str | os.PathLike, vocabulary_path: str | None = None,
                name: str = "xp3_mixture", per: str = "file", strategy: str = "proportional",
                cap: int | None = None, temperature: float = 1.0,
                language_weights: Mapping[str, float] | None = None,
                name_prefix: str = "xp3") -> str:
  """Registers the tasks of the xP3 directory `root` and a mixture over all of them; its name."""
  vocabulary = _vocabulary(vocabulary_path, "xp3_mixture")
  task_names = register_xp3_directory(root, vocabulary, per=per, name_prefix=name_prefix)
  register_xp3_mixture(name, task_names, strategy, cap=cap, temperature=temperature,
                       language_weights=language_weights or None)
  return name


def benchmark_task(name: str, vocabulary_path: str | None = None,
                   glue_dir: str | None = None, superglue_dir: str | None = None) -> str:
  """Registers the GLUE/SuperGLUE task `name` (or `{name}` ending in `_rank`); returns `name`.

  Data: `glue_dir`/`superglue_dir` (original files), else TFDS, else `$PTUNING_GLUE_DIR` /
  `$PTUNING_SUPERGLUE_DIR` (see `tasks.benchmark`).
  """
  base = name.removesuffix("_rank")
  vocabulary = _vocabulary(vocabulary_path, "benchmark_task")
  if base in GLUE_TASKS:
    names = register_glue_tasks(glue_dir, vocabulary=vocabulary, tasks=[base])
  elif base in SUPERGLUE_TASKS:
    names = register_superglue_tasks(superglue_dir, vocabulary=vocabulary, tasks=[base])
  else:
    raise ValueError(f"unknown benchmark task {name!r}; known: "
                     f"{sorted(GLUE_TASKS) + sorted(SUPERGLUE_TASKS)} (and their _rank variants)")
  if name not in names:
    raise ValueError(f"no data found for {name!r} (TFDS or original files; see tasks.benchmark)")
  return name


def ul2_mixture(text_files: Sequence[str] | str, vocabulary_path: str | None = None,
                name: str = "ul2", rates: Mapping[str, float] | None = None,
                inputs_length: int = 512, targets_length: int = 512,
                use_mode_tokens: bool = True, merge_texts: int = 1) -> str:
  """Registers UL2's denoiser tasks over `.txt`/`.jsonl` text files and their mixture; its name.

  `rates`: denoiser name (`tasks.ul2.UL2_DENOISERS`) -> rate, replacing UL2's default for
  those named (0 drops one). `merge_texts`: lines joined per token stream (see
  `tasks.ul2.ul2_denoise`).
  """
  vocabulary = _vocabulary(vocabulary_path, "ul2_mixture")
  return register_ul2_tasks(name, text_file_source(text_files), vocabulary,
                            denoisers=ul2_denoisers(rates or None), inputs_length=inputs_length,
                            targets_length=targets_length, use_mode_tokens=use_mode_tokens,
                            merge_texts=merge_texts)


def mixture(name: str, parts: Mapping[str, float] | Sequence[tuple[str, float]]) -> str:
  """Registers the SeqIO mixture `name` over registered tasks or mixtures `parts` (name ->
  rate, or (name, rate) pairs, which gin can fill with `@tasks.ul2_mixture()` calls), e.g. UL2
  denoising plus supervised multitask data for pretraining; returns `name`."""
  parts = dict(parts)
  if not parts or any(rate < 0 for rate in parts.values()) or not sum(parts.values()) > 0:
    raise ValueError(f"mixture {name!r} needs parts with non-negative rates summing to > 0, "
                     f"got {dict(parts)}")
  unknown = [part for part in parts if part not in seqio.TaskRegistry.names()
             and part not in seqio.MixtureRegistry.names()]
  if unknown:
    raise ValueError(f"mixture {name!r}: {unknown} are neither registered tasks nor mixtures")
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(part, float(rate)) for part, rate in parts.items()])
  return name


for _fn in (xp3_mixture, benchmark_task, ul2_mixture, mixture):
  gin.external_configurable(_fn, module="tasks")
