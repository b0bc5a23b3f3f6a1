"""Multitask prompts: prompt bank, MPT, SPoT transfer, and task ids from SeqIO mixtures.

Acceptance: an example's logits are the same whether it is batched with examples of its own
task or of other tasks (one frozen backbone serving many prompts at once)."""

import dataclasses
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from ptuning import gin_setup, param_tree, sharding
from ptuning.checkpoints.train_state import read_trainable_params
from ptuning.data.batches import make_batch_iterator, make_eval_examples
from ptuning.data.jsonl import register_jsonl_task
from ptuning.prompts.method import prompted_logits
from ptuning.prompts.multitask import MPT, PromptBank, initialize_from_bank, source_prompt
from ptuning.prompts.vanilla import PromptTuning
from ptuning.sharding import to_global_batch
from ptuning.train import loop, losses
from ptuning.train.experiment import TrainConfig, build_experiment
from ptuning.train.step import loss_and_metrics
from ptuning.vocab import get_vocabulary

LENGTHS = {"inputs": 16, "targets": 4}
WORDS = {"alpha": ("even", "odd"), "beta": ("small", "big")}


def write_task(path: Path, word: str, n: int = 24) -> Path:
  """`{word} {a}` -> parity ('alpha') or size ('beta') of a, as words."""
  rng = np.random.default_rng(len(word))
  with open(path, "w") as f:
    for _ in range(n):
      a = int(rng.integers(0, 10))
      target = WORDS[word][a % 2] if word == "alpha" else WORDS[word][a >= 5]
      f.write(json.dumps({"inputs": f"{word} {a}", "targets": target}) + "\n")
  return path


def make_mixture(directory: Path, vocab) -> tuple[str, list[str]]:
  """A two-task SeqIO mixture over jsonl tasks 'alpha' and 'beta' (equal rates)."""
  tasks = [register_jsonl_task(write_task(directory / f"{w}.jsonl", w), vocab) for w in WORDS]
  name = "mix_" + hashlib.sha1(str(directory).encode()).hexdigest()[:8]
  if name not in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.add(name, [(t, 1.0) for t in tasks])
  return name, tasks


@pytest.fixture(scope="module")
def vocab_path(shared_data) -> str:
  return str(shared_data / "t5_vocab/spiece.model")


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, vocab_path):
  return make_mixture(tmp_path_factory.mktemp("mixture"), get_vocabulary(vocab_path))


def tiny_config(model_dir, mixture_name, vocab_path, method, **overrides) -> TrainConfig:
  fields = dict(model_dir=str(model_dir), mixture_or_task_name=mixture_name, model="tiny_t5_1_1",
                vocabulary_path=vocab_path, method=method, task_feature_lengths=LENGTHS,
                batch_size=8, mesh=sharding.MeshConfig(data=1, model=1))
  fields.update(overrides)
  return TrainConfig(**fields)


def test_parameter_counts():
  """Trainable parameters on T5-base width (E=768), K=8 tasks, P=100 (formulas in the doc)."""
  embedding = jax.ShapeDtypeStruct((32128, 768), jnp.float32)
  backbone = {"token_embedder": {"embedding": embedding}}
  k, p, e = 8, 100, 768
  cases = {
      "bank per_task  K*P*E": (PromptBank(k, p), k * p * e),
      "bank concat    Ps*E + K*P*E (Ps=20)": (PromptBank(k, p, 20, "concat"), 20 * e + k * p * e),
      "bank add       P*E + K*P*E": (PromptBank(k, p, combine="add"), p * e + k * p * e),
      "MPT r=1        P*E + K*r*(P+E)": (MPT(k, p, rank=1), p * e + k * (p + e)),
      "MPT r=4        P*E + K*r*(P+E)": (MPT(k, p, rank=4), p * e + k * 4 * (p + e)),
  }
  for label, (method, expected) in cases.items():
    tree = jax.eval_shape(method.init, jax.random.key(0), backbone)
    count = sum(leaf.size for leaf in jax.tree.leaves(tree))
    shapes = {path: leaf.shape for path, leaf in param_tree.flatten(tree).items()}
    print(f"{label:40s} {count:>9,d}  {shapes}")
    assert count == expected, label
    assert jax.tree.structure(tree) == jax.tree.structure(
        method.logical_axes(), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def test_mixture_batches_carry_task_ids(mixture, vocab_path):
  name, tasks = mixture
  vocab = get_vocabulary(vocab_path)
  it = make_batch_iterator(name, LENGTHS, 8, seed=3, vocabulary=vocab)
  seen = set()
  for _ in range(4):
    batch = next(it)
    assert batch["task_ids"].shape == (8,) and batch["task_ids"].dtype == np.int32
    for tokens, task_id in zip(batch["encoder_input_tokens"], batch["task_ids"]):
      assert vocab.decode([int(t) for t in tokens if t > 1]).split()[0] == list(WORDS)[task_id]
      seen.add(int(task_id))
  assert seen == {0, 1}
  assert it.state()["task_names"] == tasks  # the mixture's task list, sorted by name
  # An explicit list re-numbers the tasks; a saved state of another numbering does not restore.
  flipped = make_batch_iterator(name, LENGTHS, 8, seed=3, task_names=tasks[::-1])
  np.testing.assert_array_equal(next(flipped)["task_ids"], 1 - next(
      make_batch_iterator(name, LENGTHS, 8, seed=3))["task_ids"])
  with pytest.raises(ValueError, match="task_names"):
    flipped.restore(it.state())
  with pytest.raises(ValueError, match="not in task_names"):
    make_batch_iterator(name, LENGTHS, 8, task_names=tasks[:1])
  # A single task keeps the default stream: no task ids, unless a task list is given.
  assert "task_ids" not in next(make_batch_iterator(tasks[1], LENGTHS, 8))
  assert set(next(make_batch_iterator(tasks[1], LENGTHS, 8, task_names=tasks))["task_ids"]) == {1}
  # Evaluation: every example of every task, task after task, each with its id.
  examples = make_eval_examples(name, "validation", LENGTHS, vocab)
  assert [ex["task_id"] for ex in examples] == [0] * 24 + [1] * 24
  assert examples[30]["inputs_pretokenized"].startswith("beta")
  assert "task_id" not in make_eval_examples(tasks[0], "validation", LENGTHS, vocab)[0]


@pytest.mark.parametrize("method", [
    PromptBank(num_tasks=3, length=4, shared_length=2, combine="concat"),
    PromptBank(num_tasks=3, length=4, combine="add"),
    MPT(num_tasks=3, length=4, rank=2, task_init="normal", task_init_std=0.5),
], ids=["bank_concat", "bank_add", "mpt"])
def test_mixed_task_batches_give_identical_logits(tmp_path, mixture, vocab_path, method):
  exp = build_experiment(tiny_config(tmp_path, mixture[0], vocab_path, method),
                         devices=jax.devices()[:1])
  # Distinct task prompts (an 'add' bank starts with zero task rows).
  trainable = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(7), x.shape),
                           exp.trainable_init)
  params = param_tree.merge(trainable, exp.frozen)
  rng = np.random.default_rng(0)
  b = 9
  tokens = rng.integers(3, 2000, (b, 12)).astype(np.int32)
  tokens[::2, 9:] = 0  # some padding
  decoder = rng.integers(3, 2000, (b, 4)).astype(np.int32)
  mixed_ids = np.arange(b, dtype=np.int32) % 3
  logits = jax.jit(lambda p, x, d, t: prompted_logits(exp.model, method, p, x, d, None, t))
  mixed = np.asarray(logits(params, tokens, decoder, mixed_ids))
  for task in range(3):  # the same examples, all of one task
    alone = np.asarray(logits(params, tokens, decoder, np.full(b, task, np.int32)))
    np.testing.assert_array_equal(mixed[mixed_ids == task], alone[mixed_ids == task])
    # ... and equal to vanilla prompt tuning with that task's prompt.
    prompt = method.task_prompts(params, jnp.array([task]))[0]
    vanilla = PromptTuning(length=prompt.shape[0])
    ref = prompted_logits(exp.model, vanilla, {"backbone": params["backbone"],
                                               "prompt": {"prompt": prompt}}, tokens, decoder)
    np.testing.assert_allclose(mixed[mixed_ids == task], np.asarray(ref)[mixed_ids == task],
                               rtol=1e-5, atol=1e-5)
  perm = rng.permutation(b)  # order within the batch does not matter either
  shuffled = np.asarray(logits(params, tokens[perm], decoder[perm], mixed_ids[perm]))
  np.testing.assert_array_equal(shuffled, mixed[perm])
  if isinstance(method, MPT):  # the paper's Hadamard product, per task
    p = params["prompt"]
    np.testing.assert_allclose(method.task_prompts(params, jnp.array([2]))[0],
                               p["shared"] * (p["mpt_u"][2] @ p["mpt_v"][2]), rtol=1e-6)
  with pytest.raises(ValueError, match="task_ids"):
    prompted_logits(exp.model, method, params, tokens, decoder)


def test_one_sharded_step_changes_only_prompts(tmp_path, mixture, vocab_path):
  method = PromptBank(num_tasks=3, length=4, shared_length=2, combine="concat")
  config = tiny_config(tmp_path, mixture[0], vocab_path, method,
                       mesh=sharding.MeshConfig(data=4, model=2), dropout_rate=0.1)
  exp = build_experiment(config)
  local = next(make_batch_iterator(mixture[0], LENGTHS, 8, vocabulary=get_vocabulary(vocab_path)))
  local["task_ids"] = (np.arange(8) % 2).astype(np.int32)  # tasks 0 and 1 only
  batch = to_global_batch(local, exp.mesh)
  # Task 2 has no examples in the batch: its prompt gets exactly zero gradient.
  factor, weights = losses.loss_normalizing_factor_and_weights(None, batch)
  grad_fn = jax.jit(lambda t, f, b, w: jax.grad(loss_and_metrics, has_aux=True)(
      t, f, b, None, exp.spec, factor, w))
  grads, _ = grad_fn(exp.trainable_init, exp.frozen, batch, weights)
  grads = np.asarray(grads["prompt"]["tasks"])
  assert not np.any(grads[2]) and np.any(grads[0]) and np.any(grads[1])
  state = exp.init_state()
  before = {k: np.array(v) for k, v in param_tree.flatten(state.params).items()}
  frozen_before = {k: np.array(v) for k, v in param_tree.flatten(exp.frozen).items()}
  state, metrics = exp.train_step_fn(batch)(state, exp.frozen, batch, jax.random.key(0))
  assert np.isfinite(float(metrics["loss"]))
  after = param_tree.flatten(state.params)
  assert set(after) == {"prompt/shared", "prompt/tasks"}
  for key in after:
    assert not np.array_equal(np.asarray(after[key]), before[key]), key
  for key, value in param_tree.flatten(exp.frozen).items():
    assert key.startswith("backbone/")
    np.testing.assert_array_equal(np.asarray(value), frozen_before[key], err_msg=key)


def _gin_config(model_dir, mixture_name, vocab_path, steps, *extra):
  bindings = [f"MODEL_DIR = '{model_dir}'", f"MIXTURE_OR_TASK_NAME = '{mixture_name}'",
              "MODEL = 'tiny_t5_1_1'", f"VOCABULARY_PATH = '{vocab_path}'",
              f"TRAIN_STEPS = {steps}", "BATCH_SIZE = 8", f"TASK_FEATURE_LENGTHS = {LENGTHS!r}",
              "PROMPT_LENGTH = 4", "NUM_TASKS = 2", "PROMPT_COMBINE = 'concat'",
              "SHARED_PROMPT_LENGTH = 2", "LOG_PERIOD = 5", "CHECKPOINT_PERIOD = 10",
              "EVAL_SPLIT = 'train'", "DROPOUT_RATE = 0.0", "PROMPT_INIT = 'random_uniform'",
              "ptuning.TrainConfig.eval_max_examples = 8", *extra]
  return gin_setup.load_config(["runs/train.gin", "methods/prompt_bank.gin"], bindings)


@pytest.fixture(scope="module")
def bank_run(tmp_path_factory, mixture, vocab_path):
  """A prompt-bank run on the two-task mixture via gin: 30 steps, then resumed to 40."""
  model_dir = tmp_path_factory.mktemp("bank_run")
  config = _gin_config(model_dir, mixture[0], vocab_path, 30)
  assert isinstance(config.method, PromptBank) and config.method.num_tasks == 2
  first = loop.train(config)
  resumed = loop.train(dataclasses.replace(config, train_steps=40))
  return config, model_dir, first, resumed


def test_two_task_training_lowers_loss_resumes_and_infers(bank_run, mixture):
  config, model_dir, first, resumed = bank_run
  logged = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
  train_losses = [m["train/loss"] for m in logged if "train/loss" in m]
  assert [m["step"] for m in logged if "train/loss" in m] == [5, 10, 15, 20, 25, 30, 35, 40]
  print("train losses", [round(x, 3) for x in train_losses])
  assert train_losses[-1] < train_losses[0] - 0.5
  assert "eval/exact_match" in first and "eval/exact_match" in resumed
  params = read_trainable_params(model_dir / "checkpoints")
  assert set(params) == {"prompt/shared", "prompt/tasks"}
  assert params["prompt/tasks"].shape == (2, 4, 32)
  # Inference over the whole mixture: both tasks, each example with its own prompt.
  infer_config = dataclasses.replace(config, eval_max_examples=0)
  out = model_dir / "pred.jsonl"
  assert loop.run_infer(infer_config, str(out)) == 48
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["inputs"].split()[0] for r in rows] == ["alpha"] * 24 + ["beta"] * 24
  # Inference on one task of the mixture uses that task's id from the training mixture.
  one = dataclasses.replace(infer_config, eval_mixture_or_task_name=mixture[1][1])
  assert loop.run_infer(one, str(model_dir / "beta.jsonl")) == 24
  assert (model_dir / "beta.jsonl").read_text().splitlines() == out.read_text().splitlines()[24:]


def test_spot_transfer_from_a_source_run(bank_run, mixture, vocab_path, tmp_path):
  _, source_dir, _, _ = bank_run
  source = read_trainable_params(source_dir / "checkpoints")
  # Through gin: task 1 of a new 3-task bank starts from task 0 of the source run.
  spot = ["NUM_TASKS = 3",
          "ptuning.PromptBank.task_initializers = {1: @ptuning.initialize_from_bank()}",
          f"ptuning.initialize_from_bank.path_or_array = '{source_dir}/checkpoints'",
          "ptuning.initialize_from_bank.task_index = 0"]
  config = _gin_config(tmp_path / "target", mixture[0], vocab_path, 1, *spot)
  exp = build_experiment(dataclasses.replace(config, mesh=sharding.MeshConfig(1, 1)),
                         devices=jax.devices()[:1])
  tasks = np.asarray(exp.trainable_init["prompt"]["tasks"])
  np.testing.assert_array_equal(tasks[1], source["prompt/tasks"][0])
  assert not np.array_equal(tasks[0], source["prompt/tasks"][0])
  # 'add' target: the task's *effective* prompt equals the source; a vanilla target takes the
  # concatenated [shared; task] prompt of the source bank.
  add = PromptBank(3, 4, combine="add", task_initializers={
      2: initialize_from_bank(source_dir / "checkpoints", task_index=1)})
  exp = build_experiment(tiny_config(tmp_path, mixture[0], vocab_path, add),
                         devices=jax.devices()[:1])
  effective = add.task_prompts(exp.trainable_init, jnp.array([2]))[0]
  np.testing.assert_allclose(effective, source["prompt/tasks"][1], atol=1e-6)
  init = initialize_from_bank(source_dir / "checkpoints", task_index=1, combine="concat")
  vanilla = init(None, None, (6, 32))
  np.testing.assert_array_equal(vanilla[:2], source["prompt/shared"])
  np.testing.assert_array_equal(vanilla[2:], source["prompt/tasks"][1])
  # A saved bank as .npy: one row; wrong shapes and missing rows fail clearly.
  np.save(tmp_path / "bank.npy", source["prompt/tasks"])
  row = initialize_from_bank(tmp_path / "bank.npy", 1)(None, None, (4, 32))
  np.testing.assert_array_equal(row, source["prompt/tasks"][1])
  with pytest.raises(ValueError, match=r"task_index in \[0, 2\)"):
    initialize_from_bank(tmp_path / "bank.npy")
  with pytest.raises(ValueError, match=r"\(4, 32\).*\(5, 32\)"):
    initialize_from_bank(tmp_path / "bank.npy", 0)(None, None, (5, 32))
  # MPT source: the task's effective prompt shared * (u_i @ v_i).
  rng = np.random.default_rng(0)
  mpt = {"prompt/shared": rng.normal(size=(4, 32)), "prompt/mpt_u": rng.normal(size=(2, 4, 1)),
         "prompt/mpt_v": rng.normal(size=(2, 1, 32))}
  expected = mpt["prompt/shared"] * (mpt["prompt/mpt_u"][1] @ mpt["prompt/mpt_v"][1])
  np.testing.assert_allclose(source_prompt(mpt, 1), expected)
