#!/usr/bin/env bash
# GPU figures (issue 7, target 5): T5 1.1 XL prompt tuning, bfloat16, batch 32, inputs 512,
# prompt 100, targets 8, on one H100 / H200, against HF PEFT on the same GPU.
# Usage, on the GPU machine from the repository root (its python3 holding jax[cuda], flax, optax,
# torch, transformers, peft; gin and seqio are not needed):
#   OUT=/some/dir bash benchmarks/gpu.sh            # FULL=1 adds the scan and default variants
# Writes OUT/gpu_<card>_t5_1_1_xl_*.json (card: h100, h200, ...), the profiled step's trace and
# HLO (gzip), and prints each run. PEFT needs about 118 GiB at batch 32 (measured on an H200): on
# a card with less, the figure of record runs ours alone (PEFT's out-of-memory attempt cost device
# time) and a second pair runs both at batch 16. About 6-7 minutes on an H100 without FULL=1.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -E 'h100|h200|a100|b200|gh200|l40s' | head -1 | tr 'A-Z' 'a-z')
memory_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
small_card=0
[ "${memory_mib:-0}" -lt 102400 ] && small_card=1
G="$OUT/gpu_${card:-gpu}_t5_1_1_xl"
"$PY" -c "import jax, flax, optax, torch, transformers, peft; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, jax.devices())"
XL="--model t5_1_1_xl --inputs 512 --targets 8 --prompt 100 --dtype bfloat16 --steps 8 --warmup 2"
FAST="--attention cudnn --param_dtype bfloat16"
# 1. cuDNN flash attention against float32 XLA attention, small shapes (seconds).
timeout 90 "$PY" benchmarks/gpu_attention_parity.py
# 2. The figure of record: cuDNN flash attention, bfloat16 backbone, layers unrolled; PEFT beside
# it where it fits; profiled (trace and HLO kept).
VS_PEFT="--vs peft"
[ "$small_card" = 1 ] && VS_PEFT=""
# shellcheck disable=SC2086
timeout 300 "$PY" -m ptuning.bench $XL --batch 32 $FAST $VS_PEFT \
  --profile /tmp/ptuning_gpu_profile --json "${G}_cudnn_bf16_params.json"
trace=$(ls -t /tmp/ptuning_gpu_profile/plugins/profile/*/*.xplane.pb 2>/dev/null | head -1)
if [ -n "$trace" ]; then
  gzip -c "$trace" > "$OUT/gpu_${card:-gpu}_profile.xplane.pb.gz"
  gzip -c /tmp/ptuning_gpu_profile/step.hlo.txt > "$OUT/gpu_${card:-gpu}_profile.hlo.txt.gz"
fi
# 3. Where PEFT cannot hold batch 32 (under 100 GiB), both at batch 16.
if [ "$small_card" = 1 ]; then
  # shellcheck disable=SC2086
  timeout 240 "$PY" -m ptuning.bench $XL --batch 16 $FAST --vs peft \
    --json "${G}_cudnn_bf16_params_batch16.json"
fi
[ "${FULL:-0}" = 1 ] || exit 0
# 4. What each choice adds: the same with scan over layers; the defaults (XLA attention with
# recomputed probabilities, float32 backbone), scanned, against PEFT.
# shellcheck disable=SC2086
timeout 150 "$PY" -m ptuning.bench $XL --batch 32 $FAST --scan_layers \
  --json "${G}_cudnn_bf16_params_scan.json"
# shellcheck disable=SC2086
timeout 240 "$PY" -m ptuning.bench $XL --batch 32 --scan_layers --vs peft \
  --json "${G}_defaults_scan.json"
