#!/usr/bin/env bash
# GPU figures (issue 7, target 5): T5 1.1 XL prompt tuning, bfloat16, batch 32, inputs 512,
# prompt 100, targets 8, on one H100 / H200, against HF PEFT on the same GPU.
# Usage, on the GPU machine from the repository root (its python3 holding jax[cuda], flax, optax,
# torch, transformers, peft; gin and seqio are not needed):
#   OUT=/some/dir STEPS="parity record" bash benchmarks/gpu.sh
# STEPS (default: parity record peer, in the order below):
#   parity      cuDNN flash attention against float32 XLA attention, small shapes (under a minute)
#   record      the figure of record: cuDNN attention, bfloat16 backbone, layers unrolled, norms
#               behind barriers (the default); PEFT beside it on cards that hold PEFT at batch 32
#               (about 118 GiB: an H200); profiled
#   nobarrier   the same with --no-norm_barrier (T5Config.norm_barrier off), ours, profiled
#   peer        on cards under 100 GiB (an H100): ours and PEFT at batch 16
#   flags       the record's configuration, ours alone, not profiled, once per XLA flag set in
#               FLAG_SETS (';'-separated, 'none' = no flag beyond ptuning/xla_flags.py's defaults,
#               which a set naming the same flag overrides; default: the GEMM and fusion choices
#               below), then one line per set; about 45 s each, longer with exhaustive tiling
#               (FLAG_TIMEOUT seconds each, default 150)
#   batches     the record's configuration, ours alone, not profiled, at each batch in BATCHES
#               (default "32 64"), then one line per batch
# and FULL=1 adds the scan and default variants. Writes OUT/gpu_<card>_t5_1_1_xl_*.json (card:
# h100, h200, ...), each profiled step's trace and HLO (gzip), and prints each run.
# Time: one bench run of ours took about 4 minutes on an H100 (2026-11-27: record, profiled; 3 of
# them building the random backbone, before `build.init_params` initialised the layers as one
# scan), and the batch-16 pair with PEFT more than 4; a device command is limited to 10 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-benchmarks}
STEPS=" ${STEPS:-parity record peer} "
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
want() { [[ "$STEPS" == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o -i -E 'h100|h200|a100|b200|gh200|l40s' | head -1 | tr 'A-Z' 'a-z')
memory_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
small_card=0
[ "${memory_mib:-0}" -lt 102400 ] && small_card=1
G="$OUT/gpu_${card:-gpu}_t5_1_1_xl"
"$PY" -c "import jax, flax, optax, torch, transformers, peft; print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, jax.devices())"
XL=${XL:-"--model t5_1_1_xl --inputs 512 --targets 8 --prompt 100 --dtype bfloat16 --steps 8 --warmup 2"}
FAST=${FAST-"--attention cudnn --param_dtype bfloat16"}  # XL, FAST: overridable for a dry run
# keep_profile DIR NAME: the newest trace under DIR and its HLO, gzipped into OUT.
keep_profile() {
  local trace
  trace=$(ls -t "$1"/plugins/profile/*/*.xplane.pb 2>/dev/null | head -1)
  if [ -n "$trace" ]; then
    gzip -c "$trace" > "$OUT/gpu_${card:-gpu}_$2.xplane.pb.gz"
    gzip -c "$1/step.hlo.txt" > "$OUT/gpu_${card:-gpu}_$2.hlo.txt.gz"
  fi
}
if want parity; then
  timeout 90 "$PY" benchmarks/gpu_attention_parity.py
fi
if want record; then
  VS_PEFT="--vs peft"
  [ "$small_card" = 1 ] && VS_PEFT=""
  # shellcheck disable=SC2086
  timeout 330 "$PY" -m ptuning.bench $XL --batch 32 $FAST $VS_PEFT \
    --profile /tmp/ptuning_gpu_profile --json "${G}_cudnn_bf16_params.json"
  keep_profile /tmp/ptuning_gpu_profile profile
fi
if want nobarrier; then
  # shellcheck disable=SC2086
  timeout 270 "$PY" -m ptuning.bench $XL --batch 32 $FAST --no-norm_barrier \
    --profile /tmp/ptuning_gpu_profile_nobarrier --json "${G}_cudnn_bf16_params_no_norm_barrier.json"
  keep_profile /tmp/ptuning_gpu_profile_nobarrier no_norm_barrier_profile
fi
if want peer && [ "$small_card" = 1 ]; then
  # shellcheck disable=SC2086
  timeout 420 "$PY" -m ptuning.bench $XL --batch 16 $FAST --vs peft \
    --json "${G}_cudnn_bf16_params_batch16.json"
fi
if want flags; then
  # H100, 2026-11-27 (s/step, one machine): none (then XLA's default, cuDNN GEMM fusion level 0)
  # 0.2687 / 0.2700 / 0.2693; cuDNN GEMM fusion level 2 0.2646 / 0.2664 / 0.2653 (now the
  # default, ptuning/xla_flags.py), level 3 0.2645; cuBLAS instead of Triton GEMMs 0.2779;
  # heroless Triton fusion 0.2777; CUDA graphs for cuDNN and cuBLASLt too 0.2688. Another
  # machine: none 0.2733, block-level fusion rewriting 0.2732. Exhaustive tiling search had not
  # finished compiling after 280 s (a third machine, 2026-11-27; FLAG_TIMEOUT=600 to wait longer).
  DEFAULT_SETS="none;--xla_gpu_cudnn_gemm_fusion_level=0;--xla_gpu_cudnn_gemm_fusion_level=3"
  IFS=';' read -r -a flag_sets <<< "${FLAG_SETS:-$DEFAULT_SETS}"
  i=0
  for flags in "${flag_sets[@]}"; do
    [ "$flags" = none ] && flags=""
    # shellcheck disable=SC2086
    XLA_FLAGS="$(echo ${XLA_FLAGS:-} $flags)" timeout "${FLAG_TIMEOUT:-150}" "$PY" -m ptuning.bench $XL --batch 32 \
      $FAST --json "${G}_cudnn_bf16_params_flags_$i.json" \
      || echo "flag set '${flags:-none}': exit status $? (124: not done in FLAG_TIMEOUT seconds)"
    i=$((i + 1))
  done
  "$PY" - "${G}"_cudnn_bf16_params_flags_*.json <<'PYEOF'
import json, os, sys
for path in filter(os.path.exists, sys.argv[1:]):
  r = json.load(open(path))
  flags = r["hardware"].get("xla_flags") or "(none)"
  print(f"{r['ours']['step_s_median']:.4f} s/step  {r['ours']['flops_per_s'] / r['hardware']['peak_flops']:.1%} MFU  {flags}")
PYEOF
fi
if want batches; then
  for b in ${BATCHES:-32 64}; do
    # shellcheck disable=SC2086
    timeout 200 "$PY" -m ptuning.bench $XL --batch "$b" $FAST --json "${G}_cudnn_bf16_params_batch_$b.json"
  done
  "$PY" - "${G}"_cudnn_bf16_params_batch_*.json <<'PYEOF'
import json, os, sys
for path in filter(os.path.exists, sys.argv[1:]):
  r = json.load(open(path))
  o, b = r["ours"], r["config"]["batch"]
  print(f"batch {b}: {o['step_s_median']:.4f} s/step  {o['step_s_median'] / b * 1e3:.2f} ms/example  "
        f"{o['flops_per_s'] / r['hardware']['peak_flops']:.1%} MFU  "
        f"{o.get('device_peak_bytes', 0) / 2**30:.1f} GiB")
PYEOF
fi
[ "${FULL:-0}" = 1 ] || exit 0
# What each choice adds: the same with scan over layers; the defaults (XLA attention with
# recomputed probabilities, float32 backbone), scanned, against PEFT.
# shellcheck disable=SC2086
timeout 270 "$PY" -m ptuning.bench $XL --batch 32 $FAST --scan_layers \
  --json "${G}_cudnn_bf16_params_scan.json"
# shellcheck disable=SC2086
timeout 420 "$PY" -m ptuning.bench $XL --batch 32 --scan_layers --vs peft \
  --json "${G}_defaults_scan.json"
