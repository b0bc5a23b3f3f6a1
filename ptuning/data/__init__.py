"""Input pipeline: SeqIO tasks (registered ones or jsonl files) -> per-host batches -> global arrays.

- `jsonl`: `register_jsonl_task` / `resolve_task` turn a `{"inputs", "targets"}` jsonl file
  into a SeqIO task, validating every line (`ValueError("path:lineno: ...")`).
- `batches`: `make_batch_iterator` -> `BatchIterator` of per-host numpy batches from
  `seqio.get_dataset` with `EncDecFeatureConverter`, checkpointable by batch count
  (`state()` / `restore()`); `make_eval_examples` for ordered evaluation examples.
  (`ptuning.sharding.to_global_batch` then assembles `jax.Array`s sharded along the batch.)

Packing is not supported together with soft prompts: the prompt is prepended to every
example's encoder input, while a packed row concatenates several examples, so the prompt
would appear once per row (or would need per-segment insertion and re-packing to a longer
length). `check_packing_compatible(pack, uses_prompt)` raises for that combination; packing
stays available for runs without a prompt (e.g. fine-tuning baselines).

TensorFlow only runs the input pipeline: importing this package quiets its C++ logging
(unless `TF_CPP_MIN_LOG_LEVEL` is set) and hides GPUs from it so JAX owns the accelerators.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TensorFlow's runtime was already initialised by someone else.
  pass

from ptuning.data.batches import (  # noqa: E402
    BatchIterator, check_packing_compatible, make_batch_iterator, make_eval_examples)
from ptuning.data.jsonl import (  # noqa: E402
    JsonlDataSource, jsonl_task_name, parse_jsonl_line, read_jsonl, register_jsonl_task,
    resolve_task)

__all__ = [
    "BatchIterator", "JsonlDataSource", "check_packing_compatible", "jsonl_task_name",
    "make_batch_iterator", "make_eval_examples", "parse_jsonl_line", "read_jsonl",
    "register_jsonl_task", "resolve_task",
]
