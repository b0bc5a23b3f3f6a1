"""`ptuning bench`: the analytic FLOP count, one tiny run against HF PEFT, and tiny decode /
score runs against transformers (without TensorFlow)."""

import json
import re
import subprocess
import sys

import pytest

from ptuning.bench import prompt_tuning_step_flops
from ptuning.model.config import T5Config, get_preset


def _hand_count_config(feed_forward: str) -> T5Config:
  return T5Config(vocab_size=10, d_model=4, d_kv=2, num_heads=2, d_ff=6, num_encoder_layers=1,
                  num_decoder_layers=1, feed_forward=feed_forward)


@pytest.mark.parametrize("feed_forward, per_example", [("gated-gelu", 2144), ("relu", 1904)])
def test_flops_match_a_hand_count(feed_forward, per_example):
  # d=4, h=heads*d_kv=4, f=6, V=10; S = prompt 1 + inputs 2 = 3 encoder tokens, T = 2.
  # Encoder: Q/K/V/O 4 * 2*3*4*4 = 384; scores + weighted sum 2 * (2 heads * 2*3*3*2) = 144;
  #   MLP wi_0/wi_1/wo 3 * 2*3*4*6 = 432 (relu: 2 matmuls, 288)      -> 960 (816)
  # Decoder: self Q/K/V/O 4 * 2*2*4*4 = 256; self scores + sum 2 * (2 * 2*2*2*2) = 64;
  #   cross Q/O 2 * 2*2*4*4 = 128; cross K/V on S 2 * 2*3*4*4 = 192;
  #   cross scores + sum 2 * (2 * 2*2*3*2) = 96; MLP 3 * 2*2*4*6 = 288 (relu 192)
  #                                                                   -> 1024 (928)
  # LM head 2*2*4*10 = 160.
  flops = prompt_tuning_step_flops(_hand_count_config(feed_forward), batch=3, inputs=2,
                                   targets=2, prompt=1)
  assert flops == {"forward": 3 * per_example, "backward": 3 * per_example,
                   "total": 6 * per_example}


def test_flops_of_the_t5_1_1_small_reference():
  # The figure: T5 1.1 small, batch 8, inputs 256, prompt 100, targets 8 ~ 286 GFLOP.
  flops = prompt_tuning_step_flops(get_preset("t5_1_1_small"), 8, 256, 8, 100)
  assert flops["forward"] == pytest.approx(143e9, rel=0.01)
  assert flops["total"] == pytest.approx(286e9, rel=0.01)


def _row(output: str, name: str) -> list[str]:
  lines = [line.split() for line in output.splitlines() if line.startswith(name + " ")]
  assert len(lines) == 1, output
  return lines[0]


def test_bench_tiny_against_peft(tmp_path, capsys):
  from ptuning.cli import main
  out_json = tmp_path / "bench.json"
  # conftest fakes 8 CPU devices: batch 2 shards over data=2 (the tiny model's 4 heads over 4).
  assert main(["bench", "--model", "tiny_t5_1_1", "--batch", "2", "--inputs", "16",
               "--targets", "4", "--prompt", "4", "--steps", "2", "--warmup", "1",
               "--mesh", "data=2,model=4", "--vs", "peft", "--json", str(out_json)]) == 0
  output = capsys.readouterr().out
  result = json.loads(out_json.read_text())
  assert "hardware: jax" in output and "analytic FLOPs/step" in output
  assert result["config"]["prompt"] == 4 and result["flops"]["total"] > 0
  assert result["hardware"]["peak_flops"] > 0
  # the XLA flags of the run are part of its record (here conftest's 8 fake devices)
  assert "--xla_force_host_platform_device_count=8" in result["hardware"]["xla_flags"]
  assert "--xla_gpu_cudnn_gemm_fusion_level=2" in result["hardware"]["xla_flags"]  # the CLI's
  assert "XLA_FLAGS: " in output
  # ... and whether float32 attention ran the fused CPU kernel
  assert result["hardware"]["cpu_attention_kernel"] is True
  assert "fused CPU attention kernel (float32): on" in output
  for name in ("ours", "peft"):
    cells = _row(output, name)
    step_s, fraction = float(cells[1]), cells[6]
    assert step_s > 0
    assert re.fullmatch(r"\d+\.\d%", fraction), cells
    assert step_s == pytest.approx(result[name]["step_s_median"], abs=1e-4)
    assert float(fraction[:-1]) == pytest.approx(
        100 * result[name]["flops_per_s"] / result["hardware"]["peak_flops"], abs=0.05)
    assert len(result[name]["step_s_all"]) == 2 and result[name]["peak_rss"] > 0
    # The steps' own peak (VmHWM restarted after build and compile) is within the process's.
    assert 0 < result[name]["steps_peak_rss"] <= result[name]["peak_rss"]
    assert float(cells[8]) == pytest.approx(result[name]["steps_peak_rss"] / 2**30, abs=0.006)
  assert result["ours"]["compiled_memory"]["argument"] > 0
  match = re.search(r"^speedup vs peft: (\d+\.\d\d)$", output, re.M)
  assert match and float(match.group(1)) > 0
  assert float(match.group(1)) == pytest.approx(result["speedup_vs_peft"], abs=0.005)
  assert result["speedup_vs_peft"] == pytest.approx(
      result["peft"]["step_s_median"] / result["ours"]["step_s_median"])


INFERENCE_ARGS = ["bench", "--model", "tiny_t5_1_1", "--batch", "4", "--inputs", "24",
                  "--targets", "6", "--steps", "2", "--warmup", "1"]


def _check_inference_report(output: str, result: dict, mode: str) -> None:
  assert result["config"]["mode"] == mode and "hardware: jax" in output
  assert f"tokens/s = {result['tokens_per_s_definition']}" in output
  for name in ("ours", "transformers"):
    cells = _row(output, name)
    batch_s, tokens_per_s = float(cells[1]), float(cells[3].replace(",", ""))
    assert batch_s == pytest.approx(result[name]["batch_s_median"], abs=1e-4)
    assert tokens_per_s == pytest.approx(result[name]["tokens_per_s"], rel=0.01, abs=1)
    assert len(result[name]["batch_s_all"]) == 2 and result[name]["peak_rss"] > 0
  match = re.search(r"^speed ratio ours / transformers: (\d+\.\d\d)$", output, re.M)
  assert match and float(match.group(1)) == pytest.approx(
      result["ratio_ours_over_transformers"], abs=0.005)
  assert result["ratio_ours_over_transformers"] == pytest.approx(
      result["transformers"]["batch_s_median"] / result["ours"]["batch_s_median"])
  paired = result["ratio_ours_over_transformers_paired"]
  if not result["config"]["paired"]:
    assert paired is None and "paired rounds" not in output
    return
  ratios = [a / b for a, b in zip(result["transformers"]["batch_s_all"],
                                  result["ours"]["batch_s_all"])]
  assert paired == pytest.approx(sum(ratios) / 2)  # the median of two rounds
  match = re.search(r"^speed ratio, median of 2 paired rounds \(alternating order\): "
                    r"(\d+\.\d{3})$", output, re.M)
  assert match and float(match.group(1)) == pytest.approx(paired, abs=5e-4)


def test_bench_decode_against_transformers_without_tensorflow(tmp_path):
  # A fresh process, so that TensorFlow (loaded by other tests) cannot hide an import of it.
  out_json = tmp_path / "decode.json"
  script = ("import sys; from ptuning.cli import main; rc = main(sys.argv[1:]); "
            "sys.exit(rc or 3 * ('tensorflow' in sys.modules))")
  proc = subprocess.run([sys.executable, "-c", script, *INFERENCE_ARGS, "--mode", "decode",
                         "--json", str(out_json)], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  result = json.loads(out_json.read_text())
  _check_inference_report(proc.stdout, result, "decode")
  assert result["ours"]["tokens_per_s"] == pytest.approx(
      4 * 6 / result["ours"]["batch_s_median"])
  check = result["check"]
  assert check["tokens_compared"] == 3 * 4 * 6 and check["token_mismatches"] == 0, check
  assert "check: 0 of 72 generated token ids differ (0 of 12 rows)" in proc.stdout


def test_bench_score_against_transformers_in_paired_rounds(tmp_path, capsys):
  """`--paired`: transformers stays in a running process and scores each batch in a round with
  ours; the outputs still match, and the paired ratio comes from the per-round times."""
  from ptuning.cli import main
  out_json = tmp_path / "score.json"
  assert main(INFERENCE_ARGS + ["--mode", "score", "--candidates", "3", "--paired", "--json",
                                str(out_json)]) == 0
  output = capsys.readouterr().out
  result = json.loads(out_json.read_text())
  _check_inference_report(output, result, "score")
  assert result["ours"]["tokens_per_s"] == pytest.approx(
      4 * (24 + 3 * 6) / result["ours"]["batch_s_median"])
  check = result["check"]
  assert check["max_abs_diff"] < 1e-3 and check["rank_agreement"] == check["examples"] == 12
  assert re.search(r"^check: max \|delta log-likelihood\| \d\.\d\de-\d\d; same top candidate in "
                   r"12 of 12 examples$", output, re.M), output


def test_bench_modules_do_not_import_tensorflow():
  modules = ("ptuning.cli", "ptuning.bench", "ptuning.bench_inference", "ptuning.sharding",
             "ptuning.param_tree", "ptuning.train.experiment", "ptuning.checkpoints.load",
             "ptuning.model.decoding", "ptuning.scoring", "ptuning.bench_methods")
  script = (f"import sys; import {', '.join(modules)}; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_bench_profile_accounts_for_the_matmul_flops(tmp_path, capsys):
  """`--profile`: a trace is written and the dots it finds in the executed ops add up to the
  analytic count (plus the attention recomputation, at most half again)."""
  from ptuning.cli import main
  out_json = tmp_path / "bench.json"
  # data=8: per-device batch 1, all 4 heads on each device, so attention dots keep a batch dim.
  assert main(["bench", "--model", "tiny_t5_1_1", "--batch", "8", "--inputs", "16",
               "--targets", "4", "--prompt", "4", "--steps", "1", "--warmup", "1",
               "--mesh", "data=8,model=1", "--profile", str(tmp_path / "trace"),
               "--dtype", "bfloat16", "--param_dtype", "bfloat16", "--no-norm_barrier",
               "--attention", "plain", "--json", str(out_json)]) == 0
  output = capsys.readouterr().out
  result = json.loads(out_json.read_text())
  profile = result["ours"]["profile"]
  # (run with a bfloat16 backbone and activations, without the barriers after the norms
  # (default on), and with XLA's attention (on CPU the default is the fused kernel, whose calls
  # are no matmuls): the profile covers that path too; progress is printed before the report)
  assert result["config"]["param_dtype"] == "bfloat16"
  assert result["config"]["norm_barrier"] is False
  from ptuning.bench_step import train_config
  from ptuning.train.experiment import build_experiment
  built = build_experiment(train_config(result["config"], str(tmp_path / "model")), abstract=True)
  assert not built.model.norm_barrier  # the model the bench built, run-level overrides applied
  assert output.index("ours: built and compiled in") < output.index("hardware:")
  assert profile["trace"].startswith(str(tmp_path / "trace")) and profile["steps"] == 2
  rows = {name: (ms, gflop) for name, ms, gflop, _ in profile["rows"]}
  assert rows["matmul (projections)"][1] > 0 and rows["matmul (attention)"][1] > 0
  assert all(ms > 0 for ms, _ in rows.values())
  matmul_flops = sum(g for name, (_, g) in rows.items() if name.startswith("matmul")) * 1e9
  assert 1.0 <= matmul_flops / result["flops"]["total"] <= 1.5
  assert re.search(r"^matmul \(projections\)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+$", output, re.M)
  # The occupancy split covers the ops' time: one-op time + 2 x (at least) the overlapped time.
  occ = profile["occupancy"]
  op_ms = sum(ms for ms, _ in rows.values())
  assert occ["one_ms"] > 0 and occ["one_ms"] + 2 * occ["two_or_more_ms"] <= op_ms * 1.0001
  assert abs(sum(occ["one_by_category_ms"].values()) - occ["one_ms"]) < 1e-6 * op_ms
  assert "ops running at once, ms/step: none" in output


def test_occupancy_splits_time_by_how_many_ops_run():
  """Two threads: [0, 10) a dot alone, [10, 14) dot and softmax, [14, 20) softmax alone,
  [20, 25) nothing, [25, 30) a transpose alone; two steps, so halved."""
  from ptuning.bench_profile import occupancy
  spans = [(0, 14, "dot"), (10, 20, "softmax"), (25, 30, "transpose")]
  occ = occupancy([(a * 1e6, b * 1e6, c) for a, b, c in spans], steps=2)
  assert occ["one_ms"] == (10 + 6 + 5) / 2 and occ["two_or_more_ms"] == 4 / 2
  assert occ["none_ms"] == 5 / 2
  assert occ["one_by_category_ms"] == {"dot": 5.0, "softmax": 3.0, "transpose": 2.5}


def test_profile_reads_gpu_library_calls_and_kernels():
  """GPU HLO: cuBLAS gemm custom-calls count as dots (dimension numbers from the backend config,
  tuple-shaped results), cuDNN flash attention is its own row with the kernels' products; GPU
  kernel names map back to their fusions ('gemm_fusion_dot_2' -> 'gemm_fusion_dot.2'), cuDNN's
  GEMM engines to the entry's cuDNN GEMM fusions."""
  from ptuning.bench_profile import (CUDNN_GEMMS, classify, classify_kernel, cudnn_gemm_flops,
                                     index_hlo)
  gemm_config = ('"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
                 '"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],'
                 '"rhs_batch_dimensions":[]}')
  hlo = "\n".join([
      "ENTRY %main (x: bf16[64,32]) -> bf16[64,48] {",
      "  %x = bf16[64,32]{1,0} parameter(0)",
      "  %w = bf16[32,48]{1,0} parameter(1)",
      "  %q = bf16[2,10,4,8]{3,2,1,0} parameter(2)",
      "  %k = bf16[2,12,4,8]{3,2,1,0} parameter(3)",
      "  %custom-call.1 = (bf16[64,48]{1,0}, s8[1024]{0}) custom-call(%x, %w), "
      f'custom_call_target="__cublas$lt$matmul", backend_config={{"gemm_backend_config":{{{gemm_config}}}}}',
      "  %custom-call.2 = (bf16[2,10,4,8]{3,2,1,0}, f32[2,4,10]{2,1,0}) custom-call(%q, %k, %k), "
      'custom_call_target="__cudnn$fmhaScaleBiasSoftmax", backend_config={}',
      "  %custom-call.3 = (bf16[2,10,4,8]{3,2,1,0}, bf16[2,12,4,8]{3,2,1,0}) custom-call(%q, %k), "
      'custom_call_target="__cudnn$fmhaScaleBiasSoftmaxBackward", backend_config={}',
      "  %gemm_fusion_dot.3 = bf16[64,48]{1,0} fusion(%x, %w), kind=kCustom, calls=%body, "
      'backend_config={"fusion_backend_config":{"kind":"__cudnn$fusion"}}',
      "  ROOT %gemm_fusion_dot.2 = bf16[64,48]{1,0} fusion(%x, %w), kind=kCustom, calls=%body, "
      'backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}',
      "}",
      "%body (a: bf16[64,32], b: bf16[32,48]) -> bf16[64,48] {",
      "  %a = bf16[64,32]{1,0} parameter(0)",
      "  %b = bf16[32,48]{1,0} parameter(1)",
      "  ROOT %dot.1 = bf16[64,48]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
      "}"])
  index = index_hlo(hlo)
  assert classify("custom-call.1", *index) == ("matmul (projections)", 2.0 * 64 * 48 * 32)
  forward = 4.0 * 2 * 4 * 10 * 12 * 8  # scores and weighted sum, [B, N, T, S] x H
  assert classify("custom-call.2", *index) == ("attention (cuDNN fused)", forward)
  assert classify("custom-call.3", *index) == ("attention (cuDNN fused)", 2.5 * forward)
  assert classify_kernel("gemm_fusion_dot_2", *index) == ("matmul (projections)", 2.0 * 64 * 48 * 32)
  assert classify_kernel("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", *index)[0] == \
      "attention (cuDNN fused)"
  assert classify_kernel("nvjet_sm90_tst_128x160", *index) == ("matmul (cuBLAS)", 0.0)
  # GEMM fusions given to cuDNN: its 'matMul' engines, counted with the entry's cuDNN fusions'
  # FLOPs (gemm_fusion_dot.3 here; the Triton one, .2, is its own kernel)
  assert classify_kernel("cudnn_generated_fort_native_sm90_matMul_pointwise_knob_3_128x128x64",
                         *index) == (CUDNN_GEMMS, 0.0)
  assert cudnn_gemm_flops(hlo, *index) == 2.0 * 64 * 48 * 32
  assert classify_kernel("memcpy128", *index) == ("copy: memcpy128", 0.0)


def test_bench_against_peft_in_paired_rounds(tmp_path, capsys):
  """`--vs peft --paired`: PEFT is built in its own process, then each round runs one step of
  each side, alternating order; each side's times are its own, and the paired speedup is the
  median of the per-round ratios."""
  from ptuning.cli import main
  out_json = tmp_path / "bench.json"
  assert main(["bench", "--model", "tiny_t5_1_1", "--batch", "8", "--inputs", "16", "--targets",
               "4", "--prompt", "4", "--steps", "3", "--warmup", "1", "--vs", "peft", "--paired",
               "--json", str(out_json)]) == 0
  output = capsys.readouterr().out
  result = json.loads(out_json.read_text())
  assert result["config"]["paired"] is True
  ours, peft = result["ours"]["step_s_all"], result["peft"]["step_s_all"]
  assert len(ours) == len(peft) == 3 and result["peft"]["trainable_params"] == 4 * 32
  assert 0 < result["peft"]["steps_peak_rss"] <= result["peft"]["peak_rss"]
  ratios = sorted(p / o for p, o in zip(peft, ours))
  assert result["speedup_vs_peft_paired"] == pytest.approx(ratios[1])
  match = re.search(r"^speedup vs peft, median of 3 paired rounds \(alternating order\): "
                    r"(\d+\.\d{3})$", output, re.M)
  assert match and float(match.group(1)) == pytest.approx(ratios[1], abs=5e-4)
  # Fractions of peak against the matmul timed in each round (bench_peak): one rate per timed
  # round, and each side's figure the median of its per-round fractions.
  rates, flops = result["ours"]["round_peak_flops"], result["flops"]["total"]
  assert len(rates) == 3 and all(r > 0 for r in rates)
  for name, times in (("ours", ours), ("peft", peft)):
    fractions = sorted(flops / t / r for t, r in zip(times, rates))
    assert result[name]["fraction_of_peak_paired"] == pytest.approx(fractions[1])
  match = re.search(r"^of peak, paired \(median over 3 rounds .*\): ours (\d+\.\d)%, "
                    r"peft (\d+\.\d)%$", output, re.M)
  assert match, output
  assert float(match.group(1)) == pytest.approx(
      100 * result["ours"]["fraction_of_peak_paired"], abs=0.05)
  assert float(match.group(2)) == pytest.approx(
      100 * result["peft"]["fraction_of_peak_paired"], abs=0.05)
  with pytest.raises(SystemExit, match="add --vs peft"):
    main(["bench", "--model", "tiny_t5_1_1", "--batch", "4", "--inputs", "16", "--targets", "4",
          "--prompt", "4", "--paired"])


def test_a_peer_that_fails_to_build_is_reported_with_its_error():
  from ptuning.bench_rounds import PeerProcess
  spec = {"model": "no_such_preset", "batch": 2, "inputs": 8, "targets": 4, "prompt": 2,
          "steps": 1, "warmup": 0, "dtype": "float32"}
  with pytest.raises(RuntimeError, match=r"(?s)--_peft_worker worker failed \(1\) before "
                     r"answering.*no_such_preset"):
    PeerProcess("ptuning.bench_peft", "--_peft_worker", spec)


def test_a_paired_worker_runs_steps_in_order_until_stdin_closes(monkeypatch, capsys):
  import io
  from ptuning.bench_rounds import DONE, READY, timed_steps
  ran = []
  monkeypatch.setattr("sys.stdin", io.StringIO("step 0\nstep 1\nstep 2\n"))
  assert len(timed_steps(ran.append, ["a", "b", "c"], warmup=1, paired=True)) == 2
  assert ran == ["a", "b", "c"]
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == READY and len(lines) == 4 and all(l.startswith(DONE + " ") for l in lines[1:])
  monkeypatch.setattr("sys.stdin", io.StringIO("step 1\n"))
  with pytest.raises(RuntimeError, match="asked for step 1, expected step 0"):
    timed_steps(ran.append, ["a", "b"], warmup=0, paired=True)
  monkeypatch.setattr("sys.stdin", io.StringIO("step 0\n"))
  with pytest.raises(RuntimeError, match="stdin closed after 1 of 2 steps"):
    timed_steps(ran.append, ["a", "b"], warmup=0, paired=True)


def test_a_failed_peer_is_reported_and_ours_still_measured(tmp_path, capsys, monkeypatch):
  """`--vs peft` whose worker fails (out of GPU memory, say): the error is printed and saved, and
  our step is still timed and written."""
  from ptuning import bench
  from ptuning.cli import main

  def failing_peer(spec):
    raise RuntimeError("--_peft_worker worker failed (1):\ntorch.OutOfMemoryError: CUDA out of memory")

  monkeypatch.setattr(bench, "run_peft", failing_peer)
  out_json = tmp_path / "bench.json"
  assert main(["bench", "--model", "tiny_t5_1_1", "--batch", "8", "--inputs", "8", "--targets",
               "4", "--prompt", "2", "--steps", "1", "--warmup", "1", "--vs", "peft",
               "--json", str(out_json)]) == 0
  output = capsys.readouterr().out
  assert "peft: FAILED" in output and "CUDA out of memory" in output
  result = json.loads(out_json.read_text())
  assert result["peft"] is None and result["speedup_vs_peft"] is None
  assert "OutOfMemoryError" in result["peft_error"] and result["ours"]["step_s_median"] > 0


def test_interleave_alternates_the_order_and_times_each_side():
  """Round i runs both sides on batch i, A B then B A; warm-up rounds are not timed, and each
  time is the clock around that side's own call."""
  from ptuning.bench_rounds import interleave, paired_ratio
  now, calls = [0.0], []

  def make_step(name, cost):
    def step(batch):
      calls.append((name, batch))
      now[0] += cost * (1 + batch)  # the machine slows down round by round
    return step

  times = interleave({"a": make_step("a", 1.0), "b": make_step("b", 2.0)},
                     {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}, warmup=1, clock=lambda: now[0])
  assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
  assert times == {"a": [2.0, 3.0, 4.0], "b": [4.0, 6.0, 8.0]}
  assert paired_ratio(times["a"], times["b"]) == 0.5
  with pytest.raises(ValueError, match="same number of batches"):
    interleave({"a": make_step("a", 1.0), "b": make_step("b", 1.0)}, {"a": [0], "b": [0, 1]}, 0)


def test_bench_two_methods_side_by_side(tmp_path, capsys):
  """`--method dept --vs prompt_tuning`: both steps built and timed in one invocation; the printed
  ratio is the median of the per-round ratios of the saved step times."""
  from ptuning.cli import main
  out_json = tmp_path / "methods.json"
  args = ["bench", "--model", "tiny_t5_1_1", "--batch", "8", "--inputs", "16", "--targets", "4",
          "--prompt", "8", "--steps", "3", "--warmup", "1", "--method", "dept"]
  assert main(args + ["--vs", "prompt_tuning", "--json", str(out_json)]) == 0
  output = capsys.readouterr().out
  result = json.loads(out_json.read_text())
  dept, vanilla = result["results"]["dept"], result["results"]["prompt_tuning"]
  # tiny_t5_1_1: d_model 32; DePT m=60, r=30, s=256 against an 8-token prompt.
  assert vanilla["trainable_parameters"] == 8 * 32
  assert dept["trainable_parameters"] == 60 * 32 + 256 * 30 + 30 * 32
  assert result["flops"]["dept"]["total"] > result["flops"]["prompt_tuning"]["total"]
  for name, r in result["results"].items():
    assert len(r["step_s_all"]) == 3 and r["compiled_memory"]["argument"] > 0
    assert float(_row(output, name)[2]) == pytest.approx(r["step_s_median"], abs=1e-4)
  ratios = sorted(a / b for a, b in zip(dept["step_s_all"], vanilla["step_s_all"]))
  assert result["step_time_ratio"] == pytest.approx(ratios[1])
  match = re.search(r"^step time dept / prompt_tuning: (\d+\.\d{3}) ", output, re.M)
  assert match and float(match.group(1)) == pytest.approx(result["step_time_ratio"], abs=5e-4)
  with pytest.raises(SystemExit, match="compares two methods"):
    main(args + ["--vs", "dept"])


def gpu_hlo_module():
  import importlib.util
  from pathlib import Path
  path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_hlo.py"
  spec = importlib.util.spec_from_file_location("gpu_hlo", path)
  gpu_hlo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gpu_hlo)
  return gpu_hlo


def test_gpu_hlo_counts_the_entry_kernels_by_kind():
  """`benchmarks/gpu_hlo.py` (the GPU program without a GPU) counts the entry computation's
  kernels by name stem: fusions, library calls (tuple results too) and copies; parameters,
  bitcasts and the bodies of fusions are not kernels."""
  gpu_hlo = gpu_hlo_module()
  hlo = "\n".join([
      "%fused_transpose.3 (p: bf16[4,6]) -> bf16[6,4] {",
      "  %p = bf16[4,6]{1,0} parameter(0)",
      "  ROOT %transpose.1 = bf16[6,4]{1,0} transpose(%p), dimensions={1,0}",
      "}",
      "",
      "ENTRY %main.9 (x: bf16[4,6]) -> bf16[6,4] {",
      "  %x = bf16[4,6]{1,0} parameter(0)",
      "  %input_transpose_fusion.3 = bf16[6,4]{1,0} fusion(%x), kind=kInput, calls=%t",
      "  %input_transpose_fusion.12 = bf16[6,4]{1,0} fusion(%x), kind=kInput, calls=%t",
      "  %loop_add_fusion = bf16[4,6]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_add",
      "  %custom-call.4 = (bf16[4,4]{1,0}, s8[64]{0}) custom-call(%x, %x), "
      'custom_call_target="__cublas$lt$matmul"',
      "  %bitcast.2 = bf16[24]{0} bitcast(%x)",
      "  %copy.1 = bf16[4,6]{0,1} copy(%x)",
      "  ROOT %input_add_transpose_fusion = bf16[6,4]{1,0} fusion(%x), kind=kInput, calls=%f",
      "}"])
  assert gpu_hlo.kernel_counts(hlo) == {"input_transpose_fusion": 2, "loop_add_fusion": 1,
                                        "custom-call": 1, "copy": 1,
                                        "input_add_transpose_fusion": 1}


def test_gpu_hlo_weighs_memory_bound_kernels_and_collectives_by_bytes():
  """Memory-bound kernels (fusions, copies; not library calls) move their operands' and results'
  bytes, tuples included; collectives are counted once per async start, with their results'
  bytes; the bodies of fused computations count for nothing."""
  gpu_hlo = gpu_hlo_module()
  assert gpu_hlo.shape_bytes("bf16[32,612]{1,0}") == 32 * 612 * 2
  assert gpu_hlo.shape_bytes("(f32[4]{0}, pred[8]{0}, s8[3])") == 16 + 8 + 3
  hlo = "\n".join([
      "%fused_add (p: f32[4,8]) -> f32[4,8] {",
      "  %p = f32[4,8]{1,0} parameter(0)",
      "  ROOT %add.9 = f32[4,8]{1,0} add(%p, %p)",
      "}",
      "",
      "ENTRY %main.3 (x: f32[4,8], w: bf16[8,8]) -> f32[4,8] {",
      "  %x = f32[4,8]{1,0} parameter(0)",
      "  %w = bf16[8,8]{1,0} parameter(1)",
      "  %loop_add_fusion.2 = f32[4,8]{1,0} fusion(%x, %x), kind=kLoop, calls=%fused_add",
      "  %loop_add_fusion.7.1 = (f32[4,8]{1,0}, bf16[4,8]{1,0}) fusion(%x), kind=kLoop, calls=%f",
      "  %custom-call.1 = (f32[4,8]{1,0}, s8[64]{0}) custom-call(%x, %w), "
      'custom_call_target="__cublas$gemm"',
      "  %copy.4 = bf16[8,8]{0,1} copy(%w)",
      "  %all-reduce-start = f32[4,8]{1,0} all-reduce-start(%loop_add_fusion.2), "
      "replica_groups={{0,1}}, to_apply=%sum",
      "  %all-reduce-done = f32[4,8]{1,0} all-reduce-done(%all-reduce-start)",
      "  %all-gather.3 = bf16[16,8]{1,0} all-gather(%w), dimensions={0}",
      "  ROOT %add.1 = f32[4,8]{1,0} add(%all-reduce-done, %x)",
      "}"])
  moved = gpu_hlo.memory_bound_bytes(hlo)
  assert moved == {"loop_add_fusion": (128 + 2 * 128) + (128 + 64 + 128), "copy": 128 + 128}
  assert gpu_hlo.collective_bytes(hlo) == {"all-reduce": (1, 128), "all-gather": (1, 256)}


def test_gpu_hlo_finds_work_fused_in_front_of_a_gemm():
  """`gemm_prologues`: a GEMM fusion whose dot reads an operand computed inside it (a norm's
  scaling) is counted by that op; one whose dot reads its parameters (through a bitcast) is not;
  other fusions are not GEMMs."""
  gpu_hlo = gpu_hlo_module()
  hlo = "\n".join([
      "%scaled_gemm (p0: bf16[4,8], p1: bf16[8], p2: bf16[8,8]) -> bf16[4,8] {",
      "  %p0 = bf16[4,8]{1,0} parameter(0)",
      "  %p1 = bf16[8]{0} parameter(1)",
      "  %b = bf16[4,8]{1,0} broadcast(%p1), dimensions={1}",
      "  %mul.3 = bf16[4,8]{1,0} multiply(%p0, %b)",
      "  %p2 = bf16[8,8]{1,0} parameter(2)",
      "  %dot.1 = f32[4,8]{1,0} dot(%mul.3, %p2), lhs_contracting_dims={1}, "
      "rhs_contracting_dims={0}",
      "  ROOT %c = bf16[4,8]{1,0} convert(%dot.1)",
      "}",
      "",
      "%plain_gemm (q0: bf16[4,8], q1: bf16[8,8]) -> bf16[4,8] {",
      "  %q0 = bf16[4,8]{1,0} parameter(0)",
      "  %q1 = bf16[8,8]{1,0} parameter(1)",
      "  %q2 = bf16[8,8]{1,0} bitcast(%q1)",
      "  %dot.2 = f32[4,8]{1,0} dot(%q0, %q2), lhs_contracting_dims={1}, rhs_contracting_dims={0}",
      "  ROOT %d = bf16[4,8]{1,0} convert(%dot.2)",
      "}",
      "",
      "ENTRY %main.3 (x: bf16[4,8], s: bf16[8], w: bf16[8,8]) -> bf16[4,8] {",
      "  %x = bf16[4,8]{1,0} parameter(0)",
      "  %s = bf16[8]{0} parameter(1)",
      "  %w = bf16[8,8]{1,0} parameter(2)",
      "  %gemm_fusion_dot.4 = bf16[4,8]{1,0} fusion(%x, %s, %w), kind=kCustom, "
      "calls=%scaled_gemm",
      "  %gemm_fusion_dot.5 = bf16[4,8]{1,0} fusion(%gemm_fusion_dot.4, %w), kind=kCustom, "
      "calls=%plain_gemm",
      "  ROOT %loop_multiply_fusion = bf16[4,8]{1,0} fusion(%gemm_fusion_dot.5, %x), kind=kLoop, "
      "calls=%scaled_gemm",
      "}"])
  assert gpu_hlo.gemm_prologues(hlo) == (2, {"multiply": 1})


def test_the_matmul_peak_probe_samples_each_round_it_is_given():
  from ptuning.bench_peak import SIZE, MatmulPeak, paired_fraction
  from ptuning.bench_rounds import time_with_peer
  probe = MatmulPeak("float32", repeats=2, per_round=1)
  assert probe.dtype == "float32" and probe.flops > 0 and f"{SIZE}^3 float32" in probe.source
  ran = []
  times = time_with_peer(ran.append, ["a", "b", "c"], warmup=1, probe=probe)
  assert ran == ["a", "b", "c"] and len(times) == 2
  assert sorted(probe.rounds) == [0, 1, 2] and all(r > 0 for r in probe.rounds.values())
  assert paired_fraction(12.0, [1.0, 2.0, 4.0], [2.0, 3.0, 1.0]) == pytest.approx(3.0)  # 6, 2, 3
