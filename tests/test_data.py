"""jsonl -> SeqIO task -> per-host batches -> global arrays, on the real T5 vocabulary and SST-2."""

import csv
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import seqio
from jax.sharding import Mesh, PartitionSpec

from ptuning.data import (BatchIterator, check_packing_compatible, make_batch_iterator,
                          make_eval_examples, register_jsonl_task, resolve_task)
from ptuning.sharding import to_global_batch
from ptuning.vocab import encode_field, get_vocabulary

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LENGTHS = {"inputs": 16, "targets": 8}
ONE_SHARD = seqio.ShardInfo(0, 1)


@pytest.fixture(scope="module")
def vocab():
  return get_vocabulary(str(SHARED / "t5_vocab" / "spiece.model"))


def write_jsonl(path: Path, rows: list) -> Path:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


def numbered_rows(n: int) -> list[dict]:
  return [{"inputs": f"example number {i}", "targets": f"label {i}", "idx": i} for i in range(n)]


def batches(it, n: int) -> list[dict]:
  return [next(it) for _ in range(n)]


def decode_rows(vocab, tokens: np.ndarray) -> list[str]:
  return [vocab.decode([int(t) for t in row if t > 1]) for row in tokens]


def test_shapes_dtypes_and_eos(tmp_path, vocab):
  rows = numbered_rows(10) + [{"inputs": "a very long input " * 10, "targets": "b " * 20}]
  path = write_jsonl(tmp_path / "small.jsonl", rows)
  it = make_batch_iterator(str(path), LENGTHS, 4, shuffle=False, shard_info=ONE_SHARD,
                           vocabulary=vocab)
  assert isinstance(it, BatchIterator)
  batch = next(it)
  assert set(batch) == {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                        "decoder_loss_weights"}
  for key, value in batch.items():
    assert value.dtype == np.int32, key
    assert value.shape == (4, LENGTHS["inputs"] if key.startswith("encoder") else 8), key
  inputs, targets = encode_field(rows[0]["inputs"], vocab), encode_field(rows[0]["targets"], vocab)
  assert inputs[-1] == 1 and targets[-1] == 1
  np.testing.assert_array_equal(batch["encoder_input_tokens"][0],
                                inputs + [0] * (16 - len(inputs)))
  np.testing.assert_array_equal(batch["decoder_target_tokens"][0],
                                targets + [0] * (8 - len(targets)))
  np.testing.assert_array_equal(batch["decoder_input_tokens"][0],
                                ([0] + targets + [0] * 8)[:8])  # shifted right, BOS = pad
  np.testing.assert_array_equal(batch["decoder_loss_weights"],
                                (batch["decoder_target_tokens"] > 0).astype(np.int32))
  next(it)
  long = next(it)  # rows 8, 9, 10: row 10 is trimmed, and EOS is kept as its last token
  assert long["encoder_input_tokens"][2, -1] == 1 and long["decoder_target_tokens"][2, -1] == 1
  assert (long["encoder_input_tokens"][2] > 0).all()


def test_deterministic_for_a_seed(tmp_path, vocab):
  name = register_jsonl_task(write_jsonl(tmp_path / "d.jsonl", numbered_rows(12)), vocab)
  first = batches(make_batch_iterator(name, LENGTHS, 4, seed=3, shard_info=ONE_SHARD), 5)
  again = batches(make_batch_iterator(name, LENGTHS, 4, seed=3, shard_info=ONE_SHARD), 5)
  other = batches(make_batch_iterator(name, LENGTHS, 4, seed=4, shard_info=ONE_SHARD), 5)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert any((a["encoder_input_tokens"] != b["encoder_input_tokens"]).any()
             for a, b in zip(first, other))


def test_restore_continues_the_stream(tmp_path, vocab):
  name = register_jsonl_task(write_jsonl(tmp_path / "r.jsonl", numbered_rows(10)), vocab)
  make = lambda: make_batch_iterator(name, LENGTHS, 4, seed=7,  # noqa: E731
                                     shard_info=ONE_SHARD)
  stream = batches(make(), 8)  # 32 examples: crosses epoch boundaries of the 10 rows
  interrupted = make()
  batches(interrupted, 5)
  state = json.loads(json.dumps(interrupted.state()))
  assert state["batches_consumed"] == 5 and state["seed"] == 7
  resumed = make()
  resumed.restore(state)
  for expected in stream[5:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  assert resumed.state()["batches_consumed"] == 8


def test_restore_rejects_another_stream(tmp_path, vocab):
  name = register_jsonl_task(write_jsonl(tmp_path / "s.jsonl", numbered_rows(4)), vocab)
  state = make_batch_iterator(name, LENGTHS, 2, seed=1, shard_info=ONE_SHARD).state()
  with pytest.raises(ValueError, match="seed"):
    make_batch_iterator(name, LENGTHS, 2, seed=2, shard_info=ONE_SHARD).restore(state)


def test_missing_field_names_file_and_line(tmp_path, vocab):
  rows = numbered_rows(2) + [{"inputs": "no target here"}] + numbered_rows(2)
  path = write_jsonl(tmp_path / "missing.jsonl", rows)
  it = make_batch_iterator(str(path), LENGTHS, 2, shuffle=False, shard_info=ONE_SHARD,
                           vocabulary=vocab)
  with pytest.raises(ValueError, match=re.escape(f"{path}:3: missing required field 'targets'")):
    batches(it, 3)


def test_invalid_json_and_wrong_type_name_file_and_line(tmp_path, vocab):
  bad_json = write_jsonl(tmp_path / "bad_json.jsonl", numbered_rows(1) + ['{"inputs": "x",'])
  it = make_batch_iterator(str(bad_json), LENGTHS, 1, shuffle=False, shard_info=ONE_SHARD,
                           vocabulary=vocab)
  with pytest.raises(ValueError, match=re.escape(f"{bad_json}:2: invalid JSON")):
    batches(it, 2)
  bad_type = write_jsonl(tmp_path / "bad_type.jsonl", [{"inputs": "x", "targets": 1}])
  examples = lambda: make_eval_examples(str(bad_type), "validation", LENGTHS, vocab)  # noqa: E731
  with pytest.raises(ValueError, match=re.escape(f"{bad_type}:1: field 'targets' must be")):
    examples()


@pytest.mark.parametrize("content, repeat", [("", True), ("\n  \n", True), ("", False)])
def test_empty_file_is_a_clear_error(tmp_path, vocab, content, repeat):
  path = tmp_path / "empty.jsonl"
  path.write_text(content)
  it = make_batch_iterator(str(path), LENGTHS, 2, repeat=repeat, shard_info=ONE_SHARD,
                           vocabulary=vocab)
  with pytest.raises(ValueError, match=rf"{it.mixture_or_task_name}.*'train'.*no examples"):
    next(it)


def test_too_few_examples_for_a_batch(tmp_path, vocab):
  path = write_jsonl(tmp_path / "three.jsonl", numbered_rows(3))
  it = make_batch_iterator(str(path), LENGTHS, 4, repeat=False, shard_info=ONE_SHARD,
                           vocabulary=vocab)
  with pytest.raises(ValueError, match="gave no batch of 4"):
    next(it)
  short = make_batch_iterator(str(path), LENGTHS, 4, repeat=False, drop_remainder=False,
                              shard_info=ONE_SHARD, vocabulary=vocab)
  assert next(short)["encoder_input_tokens"].shape == (3, 16)
  with pytest.raises(StopIteration):
    next(short)


def test_two_shards_partition_the_data(tmp_path, vocab):
  rows = numbered_rows(11)
  name = register_jsonl_task(write_jsonl(tmp_path / "shards.jsonl", rows), vocab)
  seen = []
  for index in range(2):
    it = make_batch_iterator(name, LENGTHS, 2, shuffle=False, repeat=False, drop_remainder=False,
                             shard_info=seqio.ShardInfo(index, 2))
    assert it.per_host_batch_size == 1
    seen.append([text for batch in it for text in decode_rows(vocab, batch["encoder_input_tokens"])])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(r["inputs"] for r in rows)
  with pytest.raises(ValueError, match="multiple"):
    make_batch_iterator(name, LENGTHS, 3, shard_info=seqio.ShardInfo(0, 2))


def test_to_global_batch_shards_over_data_axis(tmp_path, vocab):
  assert jax.device_count() == 8, "tests/conftest.py must force 8 host devices"
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
  name = register_jsonl_task(write_jsonl(tmp_path / "g.jsonl", numbered_rows(8)), vocab)
  local = next(make_batch_iterator(name, LENGTHS, 4, shard_info=ONE_SHARD))
  global_batch = to_global_batch(local, mesh)
  assert set(global_batch) == set(local)
  for key, array in global_batch.items():
    assert array.sharding.spec == PartitionSpec("data")
    assert array.shape == local[key].shape and array.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(array), local[key])
    assert {shard.data.shape for shard in array.addressable_shards} == {(2, local[key].shape[1])}


def test_resolve_task(tmp_path, vocab):
  path = write_jsonl(tmp_path / "weird name-1.jsonl", numbered_rows(2))
  name = resolve_task(str(path), vocab)
  assert re.fullmatch(r"jsonl_weird_name_1_[0-9a-f]{8}", name)
  assert resolve_task(name) == name
  assert register_jsonl_task(path, vocab) == name  # idempotent
  with pytest.raises(KeyError, match="registered: .*jsonl_"):  # lists registered names
    resolve_task("no_such_task")
  with pytest.raises(ValueError, match="vocabulary"):
    resolve_task(str(tmp_path / "other.jsonl"))
  with pytest.raises(FileNotFoundError, match="other.jsonl"):
    resolve_task(str(tmp_path / "other.jsonl"), vocab)


def test_split_mapping_and_eval_examples(tmp_path, vocab):
  train = write_jsonl(tmp_path / "train.jsonl", numbered_rows(4))
  dev_rows = [{"inputs": f"dev {i}", "targets": "yes" if i % 2 else "no"} for i in range(5)]
  dev = write_jsonl(tmp_path / "dev.jsonl", dev_rows)
  name = register_jsonl_task({"train": train, "validation": dev}, vocab, name="my_task")
  assert name == "my_task"
  examples = make_eval_examples(name, "validation", LENGTHS, vocab)
  assert len(examples) == 5  # in order, nothing dropped
  for example, row in zip(examples, dev_rows):
    assert example["inputs_pretokenized"] == row["inputs"]
    assert example["targets_pretokenized"] == row["targets"]
    assert example["targets"].tolist() == encode_field(row["targets"], vocab)
    assert example["inputs"].dtype == np.int32
  with pytest.raises(ValueError):
    register_jsonl_task(dev, vocab, name="my_task")  # a different task under a taken name


def test_packing(tmp_path, vocab):
  check_packing_compatible(pack=True, uses_prompt=False)
  check_packing_compatible(pack=False, uses_prompt=True)
  with pytest.raises(ValueError, match="packing is not supported with soft prompts"):
    check_packing_compatible(pack=True, uses_prompt=True)
  name = register_jsonl_task(write_jsonl(tmp_path / "p.jsonl", numbered_rows(8)), vocab)
  batch = next(make_batch_iterator(name, {"inputs": 32, "targets": 16}, 2, pack=True,
                                   shuffle=False, shard_info=ONE_SHARD))
  assert batch["encoder_segment_ids"].shape == (2, 32)
  assert batch["decoder_positions"].shape == (2, 16)
  assert batch["encoder_segment_ids"].max() > 1  # several examples in one row


def test_real_sst2_dev(tmp_path, vocab):
  with open(SHARED / "glue" / "SST-2" / "dev.tsv", newline="") as f:
    reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    rows = [{"inputs": f"sst2 sentence: {r['sentence']}",
             "targets": "positive" if r["label"] == "1" else "negative"}
            for _, r in zip(range(50), reader)]
  assert len(rows) == 50
  path = write_jsonl(tmp_path / "sst2_dev.jsonl", rows)
  it = make_batch_iterator(str(path), {"inputs": 64, "targets": 4}, 8, split="validation",
                           shuffle=False, repeat=False, shard_info=ONE_SHARD, vocabulary=vocab)
  got = list(it)
  assert len(got) == 6 and it.state()["batches_consumed"] == 6  # 48 of 50, remainder dropped
  labels = [label for b in got for label in decode_rows(vocab, b["decoder_target_tokens"])]
  assert labels == [r["targets"] for r in rows[:48]]
  first = got[0]["encoder_input_tokens"][0]
  expected = encode_field(rows[0]["inputs"], vocab)[:64]
  expected[-1:] = [1] if len(expected) == 64 else expected[-1:]
  np.testing.assert_array_equal(first[:len(expected)], expected)
