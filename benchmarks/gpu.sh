#!/usr/bin/env bash
# GPU figures (issue 7, target 5): T5 1.1 XL prompt tuning, bfloat16, batch 32, inputs 512,
# prompt 100, targets 8, on one H100 / H200, against HF PEFT on the same GPU.
# Usage, on the GPU machine from the repository root (its python3 holding jax[cuda], flax, optax,
# torch, transformers, peft; gin and seqio are not needed):
#   OUT=/some/dir bash benchmarks/gpu.sh
# Writes OUT/gpu_t5_1_1_xl_*.json, the profiled step's trace and HLO (gzip), and prints each run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
"$PY" -c "import jax, flax, optax, torch, transformers, peft; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, jax.devices())"
XL=${XL:-"--model t5_1_1_xl --batch 32 --inputs 512 --targets 8 --prompt 100 --dtype bfloat16 \
  --steps 8 --warmup 2"}
# 1. cuDNN flash attention against float32 XLA attention, small shapes (seconds).
timeout 90 "$PY" benchmarks/gpu_attention_parity.py
# 2. The figure of record: cuDNN flash attention, bfloat16 backbone, layers unrolled; PEFT beside
# it; profiled (trace and HLO kept).
# shellcheck disable=SC2086
timeout 300 "$PY" -m ptuning.bench $XL --attention cudnn --param_dtype bfloat16 --vs peft \
  --profile /tmp/ptuning_gpu_profile --json "$OUT/gpu_t5_1_1_xl_cudnn_bf16_params.json"
trace=$(ls -t /tmp/ptuning_gpu_profile/plugins/profile/*/*.xplane.pb 2>/dev/null | head -1)
if [ -n "$trace" ]; then
  gzip -c "$trace" > "$OUT/gpu_profile.xplane.pb.gz"
  gzip -c /tmp/ptuning_gpu_profile/step.hlo.txt > "$OUT/gpu_profile.hlo.txt.gz"
fi
# 3. What each choice adds: the same with scan over layers; the defaults (XLA attention with
# recomputed probabilities, float32 backbone), scanned, against PEFT.
# shellcheck disable=SC2086
timeout 150 "$PY" -m ptuning.bench $XL --attention cudnn --param_dtype bfloat16 --scan_layers \
  --json "$OUT/gpu_t5_1_1_xl_cudnn_bf16_params_scan.json"
# shellcheck disable=SC2086
timeout 240 "$PY" -m ptuning.bench $XL --scan_layers --vs peft \
  --json "$OUT/gpu_t5_1_1_xl_defaults_scan.json"
