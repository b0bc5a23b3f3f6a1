#!/usr/bin/env bash
# Pretrains the demo's nano backbone from scratch (the checkpoint committed beside this file):
# generates the synthetic multitask data (tasks/synthetic.py, seed 0), runs `ptuning pretrain`
# (UL2 denoisers + xP3-layout multitask, gin_configs/runs/nano_pretrain.gin) on nano_t5, then
# compares the run's logged losses and final eval with the committed pretrain_metrics.jsonl.
# INSTALL=1 copies the new backbone and its metrics over the committed ones.
# Usage: bash launch/nano_t5/pretrain.sh [--gin.NAME=value ...]    (~20 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/nano_pretrain}
HERE=launch/nano_t5
rm -rf "$OUT"
"$PY" -m tasks.synthetic --out "$OUT/data" --seed 0
"$PY" -m ptuning pretrain --gin_file=runs/train.gin --gin_file=runs/pretrain.gin \
  --gin_file=models/nano_t5.gin --gin_file=runs/nano_pretrain.gin \
  --gin.MODEL_DIR="$OUT/model" --gin.XP3_DIR="$OUT/data/xp3" \
  --gin.PRETRAIN_TEXT_FILES="['$OUT/data/text/syna.jsonl', '$OUT/data/text/synb.jsonl']" \
  --gin.VOCABULARY_PATH="$OUT/data/spiece.model" "$@"
"$PY" -m ptuning.train.compare_metrics "$HERE/pretrain_metrics.jsonl" "$OUT/model/metrics.jsonl" \
  || [ "${INSTALL:-0}" = 1 ]
if [ "${INSTALL:-0}" = 1 ]; then
  cp "$OUT/model/backbone/config.json" "$OUT/model/backbone/model.safetensors" \
    "$OUT/model/backbone/spiece.model" "$HERE/"
  "$PY" -m ptuning.train.compare_metrics --strip "$OUT/model/metrics.jsonl" \
    "$HERE/pretrain_metrics.jsonl"
  echo "installed the new backbone in $HERE"
fi
