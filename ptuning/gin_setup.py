"""Gin at the edges: registers the configurables and parses `--gin_file` / `--gin.NAME=value`.

Core code never imports gin; this module registers dataclasses and factories as external
configurables so that gin files in gin_configs/ can bind them (macros use T5X's names).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Sequence

import gin

from ptuning import sharding
from ptuning.prompts import initializers
from ptuning.prompts.deep import DeepPrompt
from ptuning.prompts.dept import DePT
from ptuning.prompts.ept import EPT
from ptuning.prompts.multitask import MPT, PromptBank, initialize_from_bank
from ptuning.prompts.vanilla import PromptTuning
from ptuning.train.experiment import TrainConfig

GIN_CONFIGS = Path(__file__).resolve().parents[1] / "gin_configs"


def prompt_initializer(name: str = "sampled_vocab", file: str | None = None,
                       text: str | None = None, labels: Sequence[str] | None = None,
                       vocabulary_path: str | None = None, scale: float = 0.5,
                       population: int = 5000) -> initializers.Initializer:
  """The initialiser named by gin. `file` (PROMPT_INIT_FILE) wins when set."""
  if file:
    return initializers.from_file(file)
  if name == "random_uniform":
    return initializers.random_uniform(scale)
  if name == "sampled_vocab":
    return initializers.sampled_vocab(population)
  if name in ("text", "class_labels"):
    from ptuning.vocab import get_vocabulary
    if not vocabulary_path:
      raise ValueError(f"prompt initialiser {name!r} needs prompt_initializer.vocabulary_path")
    vocab = get_vocabulary(vocabulary_path)
    if name == "text":
      return initializers.from_text(text or "", vocab)
    return initializers.class_labels([list(vocab.encode(label)) for label in labels or ()])
  raise ValueError(f"unknown prompt initialiser {name!r}; choose from random_uniform, "
                   "sampled_vocab, text, class_labels (or set PROMPT_INIT_FILE)")


_CONFIGURABLES: dict = {}


def register() -> None:
  if _CONFIGURABLES:
    return
  for fn in (TrainConfig, PromptTuning, DePT, EPT, DeepPrompt, sharding.MeshConfig,
             prompt_initializer, PromptBank, MPT, initialize_from_bank):
    _CONFIGURABLES[fn] = gin.external_configurable(fn, module="ptuning")
  gin.add_config_file_search_path(str(GIN_CONFIGS))


def _binding(flag: str) -> str:
  """'--gin.MODEL_DIR=/tmp/x' -> "MODEL_DIR = '/tmp/x'" (bare words become strings)."""
  name, _, value = flag[len("--gin."):].partition("=")
  try:
    ast.literal_eval(value)
  except (ValueError, SyntaxError):
    if not (value.startswith(("@", "%")) or value in ("None", "True", "False")):
      value = repr(value)
  return f"{name} = {value}"


def parse(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
  """Splits argv into (gin files, gin bindings, remaining args)."""
  files, bindings, rest = [], [], []
  args = list(argv)
  while args:
    arg = args.pop(0)
    if arg.startswith("--gin_file="):
      files.append(arg.split("=", 1)[1])
    elif arg == "--gin_file" and args:
      files.append(args.pop(0))
    elif arg.startswith("--gin."):
      bindings.append(_binding(arg))
    elif arg.startswith("--gin_bindings="):
      bindings.append(arg.split("=", 1)[1])
    else:
      rest.append(arg)
  return files, bindings, rest


def load_config(gin_files: Sequence[str], bindings: Sequence[str]) -> TrainConfig:
  """Parses gin files + bindings and returns the bound TrainConfig (errors name the binding)."""
  register()
  gin.clear_config()
  resolved = []
  for path in gin_files:
    if not os.path.exists(path):
      if not (GIN_CONFIGS / path).exists():
        raise FileNotFoundError(f"gin file {path!r} not found (searched . and {GIN_CONFIGS})")
      path = str(GIN_CONFIGS / path)
    resolved.append(path)
  gin.parse_config_files_and_bindings(resolved, [], finalize_config=False)
  known_macros = {scope for (scope, selector) in gin.config._CONFIG if selector == "gin.macro"}
  for binding in bindings:
    name = binding.split("=", 1)[0].strip()
    if "." not in name and "/" not in name and name not in known_macros:
      raise ValueError(f"unknown gin binding {name!r}: no gin file defines that macro; "
                       f"known macros: {', '.join(sorted(known_macros))}")
  gin.parse_config_files_and_bindings([], list(bindings), finalize_config=False)
  return _CONFIGURABLES[TrainConfig]()
