#!/usr/bin/env bash
# Reproduces the README's performance tables: writes benchmarks/<name>.json and prints each run.
# Usage: bash benchmarks/run.sh [cpu|methods]   (run on a quiet machine; timings are medians)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
what=${1:-cpu}
if [ "$what" = cpu ]; then
  "$PY" -m ptuning bench --model t5_1_1_small --batch 8 --inputs 256 --targets 8 --prompt 100 \
    --steps 5 --warmup 2 --vs peft --json benchmarks/cpu_t5_1_1_small.json
  "$PY" -m ptuning bench --model t5_1_1_base --batch 4 --inputs 256 --targets 8 --prompt 100 \
    --steps 3 --warmup 1 --vs peft --json benchmarks/cpu_t5_1_1_base.json
fi
if [ "$what" = methods ]; then
  for method in prompt_tuning dept ept deep_prompt prompt_bank mpt promot_stage2 full_finetuning; do
    "$PY" -m ptuning bench --model t5_1_1_base --batch 4 --inputs 256 --targets 8 --prompt 100 \
      --steps 3 --warmup 1 --method "$method" --json "benchmarks/methods_t5_1_1_base_$method.json"
  done
fi
