#!/usr/bin/env bash
# The README's main job: prompt-tune the real tiny T5X checkpoint in ../shared on SST-2 sentences
# (2,000 training rows, 200 held-out dev rows from ../shared/data/glue) and print held-out metrics.
# Finishes in a few minutes on 2 CPU cores. Usage: bash launch/demo.sh [extra --gin.NAME=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
OUT=${OUT:-runs/demo}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" - "$SHARED/glue/SST-2" "$OUT" <<'PYEOF'
import csv, json, sys
src, out = sys.argv[1], sys.argv[2]
for split, tsv, limit in (("train", "train.tsv", 2000), ("validation", "dev.tsv", 200)):
  with open(f"{src}/{tsv}", newline="") as f, open(f"{out}/sst2_{split}.jsonl", "w") as g:
    for i, row in enumerate(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
      if i == limit:
        break
      label = "positive" if row["label"] == "1" else "negative"
      g.write(json.dumps({"inputs": "sst2 sentence: " + row["sentence"], "targets": label}) + "\n")
PYEOF
rm -rf "$OUT/model"
"$PY" -m ptuning train --gin_file=runs/train.gin --gin_file=methods/prompt_tuning.gin \
  --gin_file=partitioning/data_parallel.gin --gin_file=runs/demo.gin \
  --gin.MODEL_DIR="$OUT/model" \
  --gin.MIXTURE_OR_TASK_NAME="$OUT/sst2_train.jsonl" \
  --gin.EVAL_MIXTURE_OR_TASK_NAME="$OUT/sst2_validation.jsonl" \
  --gin.INITIAL_CHECKPOINT_PATH="$SHARED/t5x_checkpoints/t5_1_1_tiny/checkpoint_3" \
  --gin.VOCABULARY_PATH="$SHARED/t5_vocab/spiece.model" "$@"
