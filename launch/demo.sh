#!/usr/bin/env bash
# The README's main job: prompt tuning of a frozen backbone we pretrained ourselves.
# 1. Generates the synthetic multitask data (tasks/synthetic.py, seed 0) and takes its held-out
#    task topic_synb (topic of a sentence in language synb, asked with an instruction no
#    pretraining file uses; 4 balanced labels, chance 0.25).
# 2. Zero-shot: evaluates the committed nano backbone (launch/nano_t5/, made by
#    launch/nano_t5/pretrain.sh) on its 400 validation rows, no prompt.
# 3. Prompt tuning: trains a 20-token prompt on its 2,000 training rows (backbone frozen), then
#    evaluates on the same 400 rows.
# Prints both accuracies. A few minutes on 2 CPU cores.
# Usage: bash launch/demo.sh [extra --gin.NAME=value ... for the prompt-tuning run]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
NANO=${NANO:-launch/nano_t5}
rm -rf "$OUT"
"$PY" -m tasks.synthetic --out "$OUT/data" --seed 0
COMMON=(--gin_file=runs/train.gin --gin_file=partitioning/data_parallel.gin
        --gin.INITIAL_CHECKPOINT_PATH="$NANO" --gin.VOCABULARY_PATH="$NANO/spiece.model"
        --gin.MIXTURE_OR_TASK_NAME="$OUT/data/heldout/topic_synb_train.jsonl"
        --gin.EVAL_MIXTURE_OR_TASK_NAME="$OUT/data/heldout/topic_synb_validation.jsonl")
echo "== zero-shot: the nano backbone alone =="
"$PY" -m ptuning train "${COMMON[@]}" --gin_file=methods/prompt_tuning.gin \
  --gin_file=runs/demo.gin --gin_file=runs/zero_shot.gin --gin.MODEL_DIR="$OUT/zero_shot"
echo "== prompt tuning: 20-token prompt, backbone frozen =="
"$PY" -m ptuning train "${COMMON[@]}" --gin_file=methods/prompt_tuning.gin \
  --gin_file=runs/demo.gin --gin.MODEL_DIR="$OUT/prompt_tuning" "$@"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
def final_accuracy(model_dir):
  evals = [json.loads(l) for l in open(f"{model_dir}/metrics.jsonl") if '"eval/' in l]
  return evals[-1]["eval/exact_match"], int(evals[-1]["eval/examples"])
zero, n = final_accuracy(f"{sys.argv[1]}/zero_shot")
tuned, _ = final_accuracy(f"{sys.argv[1]}/prompt_tuning")
print(f"held-out task topic_synb, {n} validation examples, chance 0.25: "
      f"zero-shot accuracy {zero:.3f}, prompt-tuned accuracy {tuned:.3f}")
PYEOF
