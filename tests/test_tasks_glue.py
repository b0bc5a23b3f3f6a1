"""GLUE SST-2 and SuperGLUE CB/RTE from the shared original files: T5 formats and metrics."""

from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from ptuning.data.batches import make_eval_examples
from ptuning.vocab import get_vocabulary
from tasks import metrics, rank
from tasks.glue import register_glue_tasks
from tasks.superglue import register_superglue_tasks

LENGTHS = {"inputs": 256, "targets": 8}


@pytest.fixture(scope="module")
def names(shared_data) -> list[str]:
  vocab = get_vocabulary(shared_data / "t5_vocab" / "spiece.model")
  glue = register_glue_tasks(shared_data / "glue", vocabulary=vocab)
  superglue = register_superglue_tasks(shared_data / "superglue", vocabulary=vocab)
  # Registering again with the same files and vocabulary is a no-op.
  assert register_glue_tasks(shared_data / "glue", vocabulary=vocab) == glue
  return glue + superglue


@functools.lru_cache(maxsize=None)
def _text(task: str, split: str = "validation") -> list[dict]:
  """The split's examples in order (cached: building a pipeline costs about a second)."""
  return make_eval_examples(task, split, LENGTHS)


def _evaluate(task_name: str, predictions: list[str]) -> dict[str, float]:
  """What ptuning.train.evaluation.evaluate does with a task's postprocess_fn and metrics."""
  task = seqio.get_mixture_or_task(task_name)
  examples = _text(task_name)
  targets = [task.postprocess_fn(ex["targets_pretokenized"], is_target=True) for ex in examples]
  preds = [task.postprocess_fn(p, is_target=False) for p in predictions]
  results = {}
  for metric_fn in task.metric_fns:
    results.update(metric_fn(targets[:len(preds)], preds))
  return results


def test_registered_names(names):
  # Only SST-2 of GLUE, and CB/RTE of SuperGLUE, are in ../shared/data.
  assert names == ["glue_sst2", "glue_sst2_rank", "super_glue_cb", "super_glue_cb_rank",
                   "super_glue_rte", "super_glue_rte_rank"]


def test_sst2_t5_format(names):
  examples = _text("glue_sst2")
  assert len(examples) == 872
  # dev.tsv keeps the trailing space of each sentence, as TFDS does.
  assert examples[0]["inputs_pretokenized"] == (
      "sst2 sentence: it 's a charming and often affecting journey . ")
  assert examples[0]["targets_pretokenized"] == "positive"
  assert examples[1]["inputs_pretokenized"] == "sst2 sentence: unflinchingly bleak and desperate "
  assert examples[1]["targets_pretokenized"] == "negative"
  assert [int(ex["idx"]) for ex in examples[:3]] == [0, 1, 2]
  assert list(examples[1]["targets"]) == [2841, 1]  # "negative" + EOS


def test_superglue_t5_formats(names):
  cb = _text("super_glue_cb")
  assert len(cb) == 56
  assert cb[0]["inputs_pretokenized"] == (
      "cb hypothesis: Valence was helping premise: Valence the void-brain, Valence the "
      "virtuous valet. Why couldn't the figger choose his own portion of titanic anatomy to "
      "shaft? Did he think he was helping?")
  assert cb[0]["targets_pretokenized"] == "contradiction"
  assert cb[1]["inputs_pretokenized"] == (
      "cb hypothesis: there is a shipment premise: ``Who knows? The point is, do we go with "
      "it or not?'' Do we assume there is a shipment?")
  assert cb[1]["targets_pretokenized"] == "neutral"
  rte = _text("super_glue_rte")
  assert len(rte) == 277
  assert rte[0]["inputs_pretokenized"] == (
      "rte hypothesis: Christopher Reeve had an accident. premise: Dana Reeve, the widow of "
      "the actor Christopher Reeve, has died of lung cancer at age 44, according to the "
      "Christopher Reeve Foundation.")
  assert rte[0]["targets_pretokenized"] == "not_entailment"
  assert rte[1]["targets_pretokenized"] == "entailment"
  train = seqio.get_mixture_or_task("super_glue_rte").source.get_dataset("train", shuffle=False)
  assert sum(1 for _ in train) == 2490


def test_metrics_all_correct(names):
  for task_name, keys in [("glue_sst2", ["accuracy"]), ("super_glue_rte", ["accuracy"]),
                          ("super_glue_cb", ["mean_3class_f1", "accuracy"])]:
    predictions = [ex["targets_pretokenized"] for ex in _text(task_name)]
    results = _evaluate(task_name, predictions)
    assert sorted(results) == sorted(keys)
    assert all(value == pytest.approx(100.0) for value in results.values()), (task_name, results)


def test_metrics_hand_computed(names):
  # Always "positive": 444 of the 872 SST-2 dev rows are positive.
  assert _evaluate("glue_sst2", ["positive"] * 872) == {
      "accuracy": pytest.approx(100 * 444 / 872)}
  # Always "entailment": 146 of the 277 RTE val rows.
  assert _evaluate("super_glue_rte", ["entailment"] * 277)["accuracy"] == pytest.approx(
      100 * 146 / 277)
  # CB's first 8 val targets: contradiction neutral entailment contradiction contradiction
  # contradiction entailment entailment. Predictions: 5 right; "maybe" is no label (-> -1).
  predictions = ["contradiction", "entailment", "entailment", "contradiction", "neutral",
                 "contradiction", "maybe", "entailment"]
  results = _evaluate("super_glue_cb", predictions)
  # F1: entailment P=2/3 R=2/3 -> 2/3; contradiction P=3/3 R=3/4 -> 6/7; neutral 0.
  assert results["accuracy"] == pytest.approx(100 * 5 / 8)
  assert results["mean_3class_f1"] == pytest.approx(100 * (2 / 3 + 6 / 7 + 0) / 3)


def test_glue_metric_functions():
  assert metrics.f1_score_with_invalid([1, 1, 0, 0], [1, -1, 1, 0]) == {
      "f1": pytest.approx(100 * 0.5)}  # invalid -> wrong: TP=1 FP=1 FN=1
  assert metrics.matthews_corrcoef([1, 1, 0, 0], [1, 1, 0, 0])["matthews_corrcoef"] == 100
  assert metrics.matthews_corrcoef([1, 0, 1, 0], [1, 1, 1, 1])["matthews_corrcoef"] == 0
  assert metrics.string_label_to_class_id("neutral", ["entailment", "contradiction", "neutral"]
                                          ) == 2
  assert metrics.string_to_float("3.8") == 3.8 and metrics.string_to_float("x") == -1.0


def test_rank_rows(names):
  rows = _text("super_glue_cb_rank")
  assert len(rows) == 3 * 56
  assert [r["targets_pretokenized"] for r in rows[:3]] == ["entailment", "contradiction",
                                                           "neutral"]
  assert [list(r["idx"]) for r in rows[:3]] == [[0, 0], [0, 1], [0, 2]]
  assert [bool(r["is_correct"]) for r in rows[:3]] == [False, True, False]  # contradiction
  assert rows[0]["inputs_pretokenized"] == _text("super_glue_cb")[0]["inputs_pretokenized"]


def test_rank_classification_metric():
  # Two binary examples (labels 1 and 0) and one where the model picks the wrong row.
  targets = [((0, 0), False, 1.0, 2), ((0, 1), True, 1.0, 2), ((1, 0), True, 1.0, 2),
             ((1, 1), False, 1.0, 2), ((2, 0), False, 1.0, 2), ((2, 1), True, 1.0, 2)]
  scores = [-3.0, -1.0, -0.5, -2.0, -0.1, -4.0]  # predictions: 1, 0, 0
  result = rank.rank_classification(targets, scores, num_classes=2)
  assert result["accuracy"] == pytest.approx(100 * 2 / 3)
  assert result["f1"] == pytest.approx(100 * 2 / 3)  # class 1: TP=1 FP=0 FN=1


def test_rank_scoring_with_sequence_log_likelihood(names, shared_data):
  """A fake model that always prefers "contradiction": scored end to end on CB val."""
  def logits_fn(inputs, decoder_inputs, vocab_size=32128):
    del inputs
    logits = jnp.zeros(decoder_inputs.shape + (vocab_size,))
    return logits.at[..., 27252].set(20.0).at[..., 1].set(20.0)  # "contradiction", EOS

  results = rank.evaluate_rank_task("super_glue_cb_rank", "validation", LENGTHS,
                                    logits_fn, batch_size=64)
  labels = [json.loads(line)["label"] for line in open(shared_data / "superglue/CB/val.jsonl")]
  share = labels.count("contradiction") / len(labels)  # 28 / 56
  assert results["accuracy"] == pytest.approx(100 * share)
  # Constant prediction: contradiction F1 = 2p/(1+p) with precision p and recall 1; others 0.
  assert results["mean_3class_f1"] == pytest.approx(100 * (2 * share / (1 + share)) / 3,
                                                    rel=1e-5)
  assert np.isfinite(list(results.values())).all()


def test_missing_data_dir_raises(tmp_path, shared_data):
  vocab = get_vocabulary(shared_data / "t5_vocab" / "spiece.model")
  with pytest.raises(ValueError, match="no task data"):
    register_glue_tasks(tmp_path, vocabulary=vocab, tasks=["glue_sst2"])


def test_data_location(tmp_path, shared_data, names, monkeypatch):
  from tasks.benchmark import prepared_tfds_name
  assert prepared_tfds_name("glue/sst2", str(tmp_path)) is None  # never downloads
  (tmp_path / "glue" / "sst2" / "2.0.0").mkdir(parents=True)
  assert prepared_tfds_name("glue/sst2", str(tmp_path)) is None  # not prepared
  (tmp_path / "glue" / "sst2" / "2.0.0" / "dataset_info.json").write_text("{}")
  assert prepared_tfds_name("glue/sst2", str(tmp_path)) is None  # unreadable: ignored
  # Without data_dir and TFDS data: $PTUNING_SUPERGLUE_DIR (same files -> same registration).
  monkeypatch.setenv("PTUNING_SUPERGLUE_DIR", str(shared_data / "superglue"))
  vocab = get_vocabulary(shared_data / "t5_vocab" / "spiece.model")
  assert register_superglue_tasks(vocabulary=vocab, tasks=["super_glue_cb"],
                                  tfds_data_dir=str(tmp_path)) == ["super_glue_cb",
                                                                   "super_glue_cb_rank"]


def test_benchmark_task_for_gin(shared_data, names):
  from tasks.registry import benchmark_task
  vocab_path = str(shared_data / "t5_vocab" / "spiece.model")
  assert benchmark_task("super_glue_rte_rank", vocab_path,
                        superglue_dir=str(shared_data / "superglue")) == "super_glue_rte_rank"
  with pytest.raises(ValueError, match="unknown benchmark task"):
    benchmark_task("glue_nope", vocab_path)


def test_rank_rows_share_one_encoding_and_score_as_row_by_row(names):
  """CB's rank rows (3 labels per example) are scored with each input encoded once: the model
  sees a third of the rows as inputs, and every score equals scoring the row on its own."""
  import jax
  from ptuning import sharding
  from ptuning.model import build
  from ptuning.model.config import get_preset
  from ptuning.model.t5 import EncoderDecoder

  examples = make_eval_examples("super_glue_cb_rank", "validation", LENGTHS)[:12]
  assert rank.candidates_per_input(examples) == 3
  cfg = get_preset("tiny_t5_1_1")
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1, model=1), jax.devices()[:1])
  params = build.init_params(cfg, jax.random.key(0), mesh)
  model, seen = EncoderDecoder(cfg), []

  @jax.jit
  def logits(inputs, decoder_inputs):
    encoded = model.apply({"params": params}, inputs, method=EncoderDecoder.encode)
    return model.apply({"params": params}, encoded, inputs > 0, decoder_inputs,
                       method=EncoderDecoder.decode_logits)

  def logits_fn(inputs, decoder_inputs):
    seen.append((inputs.shape[0], decoder_inputs.shape[0]))
    return logits(inputs, decoder_inputs)

  def repeated_inputs_fn(inputs, decoder_inputs):  # each row with its own copy of its input
    return logits(np.repeat(inputs, decoder_inputs.shape[0] // inputs.shape[0], axis=0),
                  decoder_inputs)

  grouped = rank.score_examples(examples, logits_fn, LENGTHS, batch_size=6)
  assert seen == [(2, 6)] * 2
  one_by_one = rank.score_examples(examples, repeated_inputs_fn, LENGTHS, batch_size=6)
  np.testing.assert_allclose(grouped, one_by_one, rtol=1e-5, atol=1e-5)
  assert len(set(np.round(grouped, 3))) > 3  # the scores differ between rows
  # Runs of 3, 2 and 1 rows: padded to 3 slots each, scored as row by row, in order.
  mixed = list(examples[:3]) + list(examples[4:7])
  assert rank.candidates_per_input(mixed) == 3
  seen.clear()
  np.testing.assert_allclose(rank.score_examples(mixed, logits_fn, LENGTHS, batch_size=6),
                             np.concatenate([one_by_one[:3], one_by_one[4:7]]), rtol=1e-5,
                             atol=1e-5)
  assert seen == [(2, 6), (2, 6)]
