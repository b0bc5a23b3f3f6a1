#!/usr/bin/env bash
# Reproduces the README's performance tables: writes benchmarks/<name>.json and prints each run.
# Usage: bash benchmarks/run.sh [cpu|methods|inference|memory|profile]   (run on a quiet machine; timings are
# medians; --paired: the peer steps in rounds with ours, so drift does not enter the ratio).
# memory: prompt tuning vs full fine-tuning with attention kept / recomputed and
# with scan + full remat. inference: greedy decoding and rank scoring against transformers (same weights).
# GPU figures (T5 1.1 XL on one H100 / H200): benchmarks/gpu.sh, run on the GPU machine.
# GPU program without a GPU (kernel counts, layouts): benchmarks/gpu_hlo.py, with JAX's CUDA plugin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
what=${1:-cpu}
case "$what" in
  cpu|methods|inference|memory|profile) ;;
  *) echo "usage: bash benchmarks/run.sh [cpu|methods|inference|memory|profile]" >&2; exit 2 ;;
esac
if [ "$what" = cpu ]; then
  "$PY" -m ptuning bench --model t5_1_1_small --batch 8 --inputs 256 --targets 8 --prompt 100 \
    --steps 7 --warmup 2 --vs peft --paired --json benchmarks/cpu_t5_1_1_small.json
  "$PY" -m ptuning bench --model t5_1_1_base --batch 4 --inputs 256 --targets 8 --prompt 100 \
    --steps 5 --warmup 1 --vs peft --paired --json benchmarks/cpu_t5_1_1_base.json
  # bfloat16 activations (float32 parameters) against PEFT under torch.autocast(bfloat16).
  "$PY" -m ptuning bench --model t5_1_1_small --batch 8 --inputs 256 --targets 8 --prompt 100 \
    --steps 7 --warmup 2 --dtype bfloat16 --vs peft --paired --json benchmarks/cpu_t5_1_1_small_bf16.json
  "$PY" -m ptuning bench --model t5_1_1_base --batch 4 --inputs 256 --targets 8 --prompt 100 \
    --steps 5 --warmup 1 --dtype bfloat16 --vs peft --paired --json benchmarks/cpu_t5_1_1_base_bf16.json
  # ... and with our frozen backbone stored in bfloat16 (no per-step casts of the weights).
  "$PY" -m ptuning bench --model t5_1_1_small --batch 8 --inputs 256 --targets 8 --prompt 100 \
    --steps 7 --warmup 2 --dtype bfloat16 --param_dtype bfloat16 --vs peft --paired \
    --json benchmarks/cpu_t5_1_1_small_bf16_params.json
  "$PY" -m ptuning bench --model t5_1_1_base --batch 4 --inputs 256 --targets 8 --prompt 100 \
    --steps 5 --warmup 1 --dtype bfloat16 --param_dtype bfloat16 --vs peft --paired \
    --json benchmarks/cpu_t5_1_1_base_bf16_params.json
fi
if [ "$what" = profile ]; then  # where the float32 small step's time goes, by kind of op
  "$PY" -m ptuning bench --model t5_1_1_small --batch 8 --inputs 256 --targets 8 --prompt 100 \
    --steps 3 --warmup 1 --profile /tmp/ptuning_profile --json benchmarks/profile_t5_1_1_small.json
fi
if [ "$what" = methods ]; then
  for method in prompt_tuning dept ept deep_prompt prompt_bank mpt promot_stage2 full_finetuning; do
    "$PY" -m ptuning bench --model t5_1_1_base --batch 4 --inputs 256 --targets 8 --prompt 100 \
      --steps 3 --warmup 1 --method "$method" --json "benchmarks/methods_t5_1_1_base_$method.json"
  done
  # Each method against prompt tuning in one process, in alternating rounds (drift-free ratio);
  # target 3 (DePT) also at inputs 128.
  for method in dept ept deep_prompt prompt_bank mpt promot_stage2 full_finetuning; do
    "$PY" -m ptuning bench --model t5_1_1_base --batch 4 --inputs 256 --targets 8 --prompt 100 \
      --steps 7 --warmup 1 --method "$method" --vs prompt_tuning \
      --json "benchmarks/methods_t5_1_1_base_${method}_vs_prompt_tuning_inputs256.json"
  done
  "$PY" -m ptuning bench --model t5_1_1_base --batch 4 --inputs 128 --targets 8 --prompt 100 \
    --steps 7 --warmup 1 --method dept --vs prompt_tuning \
    --json "benchmarks/methods_t5_1_1_base_dept_vs_prompt_tuning_inputs128.json"
fi
if [ "$what" = inference ]; then
  "$PY" -m ptuning bench --mode decode --model t5_1_1_small --batch 8 --inputs 256 --targets 32 \
    --steps 7 --warmup 2 --paired --json benchmarks/inference_decode_t5_1_1_small.json
  "$PY" -m ptuning bench --mode score --model t5_1_1_small --batch 8 --inputs 256 --targets 4 \
    --candidates 2 --steps 10 --warmup 2 --paired --json benchmarks/inference_score_t5_1_1_small.json
fi
if [ "$what" = memory ]; then
  for method in prompt_tuning full_finetuning; do
    for variant in "plain:--attention plain" "recompute:" "scan_full:--scan_layers --remat full"; do
      # shellcheck disable=SC2086
      "$PY" -m ptuning bench --model t5_1_1_base --batch 4 --inputs 256 --targets 8 --prompt 100 \
        --steps 2 --warmup 1 --method "$method" ${variant#*:} \
        --json "benchmarks/memory_t5_1_1_base_${method}_${variant%%:*}.json"
    done
  done
fi
