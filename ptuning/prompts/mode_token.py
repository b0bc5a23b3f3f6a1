"""UL2 mode (paradigm) tokens, e.g. "[NLU]", "[NLG]", "[S2S]", placed relative to the soft prompt.

UL2 was pre-trained with a paradigm token in front of the encoder input text ("[NLU] sentence");
downstream runs keep it. With a soft prompt of P rows the encoder input is, for k mode ids,

  'before_prompt' (default):  [mode k] [prompt P] inputs
  'after_prompt':             [prompt P] [mode k] inputs

and without a method (full fine-tuning, zero-shot) both are `[mode] inputs`: the tokens of the
text "[NLU] " + inputs (SentencePiece splits at spaces), i.e. UL2's own text prefix.

The text is tokenised once with the run's vocabulary (`vocab.encode`, no EOS) into a static,
hashable `ModeToken(ids, position)` carried by `StepSpec.mode_token`; `prompted_encode`
(ptuning/prompts/method.py) embeds the ids with the frozen token embedding and inserts them
(mask 1) after the method has run. Every path built on it (train and eval steps, decoding,
rank scoring via `evaluation.make_logits_fn`) therefore sees the same encoder input, and the ids
never pass through a method's own transforms.

Methods. The method's prompt must be a prefix of its output (`placement='prefix'`, the default);
other placements raise NotImplementedError. P = rows the method added (output length - input
length):
  vanilla, prompt bank, MPT: the mode rows go at row 0 or at row P.
  DePT, EPT: likewise; the low-rank update still covers the L input rows only, rows of A aligned
      with input positions as without a mode token (the mode rows are not updated).
  deep prompts ('replace' and 'add'): 'before_prompt' moves the per-layer prompt rows to
      `[k:k+P]` of every layer's input (the encoder's `layer_prompt_offset`), 'after_prompt' keeps
      them at `[:P]`; the mode rows are ordinary hidden states in every layer.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
POSITIONS = ("before_prompt", "after_prompt")


def check_position(position: str) -> None:
  if position not in POSITIONS:
    raise ValueError(f"mode_token_position must be one of {POSITIONS}, got {position!r}")


@dataclasses.dataclass(frozen=True)
class ModeToken:
  """The mode token's ids `[k]` (empty: none) and where they go relative to the prompt."""

  ids: tuple[int, ...] = ()
  position: str = "before_prompt"

  def __post_init__(self):
    check_position(self.position)
    ids = tuple(int(i) for i in self.ids)
    if any(i <= 0 for i in ids):
      raise ValueError(f"mode token ids must be positive (0 is padding), got {ids}")
    object.__setattr__(self, "ids", ids)

  @property
  def layer_prompt_offset(self) -> int:
    """Where per-layer (deep) prompt rows start: k before the prompt, else 0."""
    return len(self.ids) if self.position == "before_prompt" else 0


def tokenize(text: str, position: str = "before_prompt",
             vocabulary_path: str | os.PathLike | None = None) -> ModeToken:
  """`ModeToken` of `text` tokenised with the SentencePiece model at `vocabulary_path` (no EOS);
  empty `text`: no mode token (no vocabulary needed)."""
  check_position(position)
  if not text:
    return ModeToken((), position)
  if not vocabulary_path:
    raise ValueError(f"mode_token={text!r} needs vocabulary_path (gin: VOCABULARY_PATH) to be "
                     "tokenised; set it, or set MODE_TOKEN = '' for no mode token")
  from ptuning.vocab import get_vocabulary  # seqio (TensorFlow) only when a mode token is set
  ids = tuple(get_vocabulary(vocabulary_path).encode(text))
  if not ids:
    raise ValueError(f"mode_token={text!r} tokenises to no ids with {os.fspath(vocabulary_path)!r}")
  return ModeToken(ids, position)


def check_method(method: Any) -> None:
  """NotImplementedError for a method whose prompt is not a prefix of its output."""
  placement = getattr(method, "placement", "prefix")
  if placement != "prefix":
    raise NotImplementedError(
        f"a mode token needs the prompt as a prefix (placement='prefix'); "
        f"{getattr(method, 'name', type(method).__name__)} has placement={placement!r}")


def insert_rows(embeds: Array, mask: Array, mode_embeds: Array, at: int) -> tuple[Array, Array]:
  """`embeds [B, L, E]`, `mask [B, L]`, `mode_embeds [B, k, E]` -> `[B, k + L, E]`,
  `[B, k + L]` with the mode rows (mask 1) at rows `[at:at+k]`."""
  mode_mask = jnp.ones(mode_embeds.shape[:2], mask.dtype)
  return (jnp.concatenate([embeds[:, :at], mode_embeds.astype(embeds.dtype), embeds[:, at:]], 1),
          jnp.concatenate([mask[:, :at], mode_mask, mask[:, at:]], 1))
