"""Soft-prompt initialisers: `fn(rng, embedding [vocab, embed], shape (P, E)) -> [P, E]` float32.

As in google-research/prompt-tuning: random uniform (scale 0.5), a sample of the embeddings of
the 5,000 most frequent pieces (SentencePiece ids are ordered by frequency), class labels (mean
of each label's sub-token embeddings, remaining rows sampled), text, and a file (`.npy`, or the
prompt of a previous run's checkpoint: SPoT-style transfer).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, jax.Array, tuple[int, int]], jax.Array]


def random_uniform(scale: float = 0.5) -> Initializer:
  def init(rng, embedding, shape):
    del embedding
    return jax.random.uniform(rng, shape, jnp.float32, -scale, scale)
  return init


def sampled_vocab(population: int = 5000, offset: int = 3) -> Initializer:
  """Rows of the frozen embedding for distinct ids drawn from `[offset, offset + population)`
  (ids 0-2 are pad/eos/unk); a vocabulary smaller than that is sampled whole."""
  def init(rng, embedding, shape):
    size = min(population, embedding.shape[0] - offset)
    if size < 1:
      raise ValueError(f"sampled_vocab: the embedding has {embedding.shape[0]} rows, none after "
                       f"the first {offset}")
    ids = offset + jax.random.permutation(rng, size)[:shape[0]]
    if shape[0] > size:
      ids = offset + jax.random.randint(rng, (shape[0],), 0, size)
    return jnp.take(embedding, ids, axis=0).astype(jnp.float32)
  return init


def _fill_rest(first_rows: jax.Array, rng, embedding, shape, fallback: Initializer) -> jax.Array:
  first_rows = first_rows[:shape[0]]
  rest = shape[0] - first_rows.shape[0]
  if rest == 0:
    return first_rows
  return jnp.concatenate([first_rows, fallback(rng, embedding, (rest, shape[1]))], axis=0)


def class_labels(label_token_ids: Sequence[Sequence[int]],
                 fallback: Initializer | None = None) -> Initializer:
  """Row i = mean embedding of label i's sub-tokens (EOS excluded); later rows from `fallback`."""
  fallback = fallback or sampled_vocab()
  if not label_token_ids or any(len(ids) == 0 for ids in label_token_ids):
    raise ValueError(f"class-label init needs a non-empty token list per label: {label_token_ids}")

  def init(rng, embedding, shape):
    rows = jnp.stack([jnp.take(embedding, jnp.asarray(ids), axis=0).mean(axis=0)
                      for ids in label_token_ids]).astype(jnp.float32)
    return _fill_rest(rows, rng, embedding, shape, fallback)
  return init


def from_token_ids(token_ids: Sequence[int], fallback: Initializer | None = None) -> Initializer:
  """Embeddings of a tokenised text fill the first rows (truncated); the rest from `fallback`."""
  fallback = fallback or sampled_vocab()

  def init(rng, embedding, shape):
    rows = jnp.take(embedding, jnp.asarray(list(token_ids)), axis=0).astype(jnp.float32)
    return _fill_rest(rows, rng, embedding, shape, fallback)
  return init


def from_text(text: str, vocabulary, fallback: Initializer | None = None) -> Initializer:
  return from_token_ids(list(vocabulary.encode(text)), fallback)


def load_prompt_array(path: str | os.PathLike, key: str = "prompt/prompt") -> np.ndarray:
  """A prompt `[P, E]` from a `.npy` file, a previous run's MODEL_DIR or its checkpoints dir."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"prompt file {path!r} does not exist")
  if path.endswith(".npy"):
    return np.load(path, allow_pickle=False)
  from ptuning.checkpoints.train_state import read_trainable_params
  if os.path.isdir(os.path.join(path, "checkpoints")):  # a run's MODEL_DIR
    path = os.path.join(path, "checkpoints")
  params = read_trainable_params(path)
  if key not in params:
    raise KeyError(f"checkpoint {path!r} has no {key!r}; it holds {sorted(params)}")
  return np.asarray(params[key])


def from_file(path: str | os.PathLike, key: str = "prompt/prompt") -> Initializer:
  """Loads a stored prompt; its shape must equal the configured one exactly."""
  array = load_prompt_array(path, key)

  def init(rng, embedding, shape):
    del rng, embedding
    if tuple(array.shape) != tuple(shape):
      raise ValueError(f"prompt file {os.fspath(path)!r} holds shape {tuple(array.shape)}, but the "
                       f"configured prompt is {tuple(shape)} (PROMPT_LENGTH x model width)")
    return jnp.asarray(array, jnp.float32)
  return init


def by_name(name: str, **kwargs) -> Initializer:
  """Gin-friendly selection: 'random_uniform' | 'sampled_vocab' | 'file' | 'text' | 'class_labels'."""
  table = {"random_uniform": random_uniform, "sampled_vocab": sampled_vocab, "file": from_file,
           "text": from_text, "class_labels": class_labels, "token_ids": from_token_ids}
  if name not in table:
    raise ValueError(f"unknown prompt initialiser {name!r}; choose from {sorted(table)}")
  return table[name](**kwargs)
