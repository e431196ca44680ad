#!/usr/bin/env bash
# Reproduce docs/results.md: CrossMoCo pretraining on real ModelNet40 on CPU (the modelnet40-cpu preset), then
# the papers' evaluations of the pretrained encoder and of random-init encoders of the same architecture.
#   bash bench/modelnet40.sh [MODELNET40_DIR]      (default ../shared/data/modelnet40_1024; about 2.5 h on 2 cores)
# Everything goes to bench/out/mn40/. Steps that already produced their output are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="${1:-../shared/data/modelnet40_1024}"
OUT=bench/out/mn40
mkdir -p "$OUT"
T() { /usr/bin/time -v "$@"; }

# 1. Shards: train (with a validation split carved from it, seed 0) and test; 6 depth views per object.
[[ -f "$OUT/shards/manifest.json" ]] || T crossmoco prepare "$SRC" --out "$OUT/shards" --up-axis z --val-fraction 0.1

# 2. Pretraining on the train split only (about 70 minutes on 2 cores); relaunching resumes.
T crossmoco pretrain --preset modelnet40-cpu --data "$OUT/shards" --storage "$OUT/runs" --name mn40-cpu \
  2>&1 | tee "$OUT/pretrain.log"
CKPT="$(ls -d "$OUT"/runs/mn40-cpu/epoch_* | sort | tail -1)"

# 3. Linear SVM (CrossPoint and clean protocols) and few-shot: pretrained vs random init (seed 0, the same
#    architecture), all 1024 points.
[[ -f "$OUT/svm/report.json" ]] || T crossmoco eval svm --data "$SRC" --up-axis z --checkpoint "$CKPT" --out "$OUT/svm"
[[ -f "$OUT/fewshot/report.json" ]] || \
  T crossmoco eval fewshot --data "$SRC" --up-axis z --checkpoint "$CKPT" --episodes 10 --out "$OUT/fewshot"

# 4. The spread of the random-init baseline over seeds (seed 0 is in step 3).
for s in 1 2; do
  [[ -f "$OUT/random_svm_seed$s/report.json" ]] || \
    T crossmoco eval svm --data "$SRC" --up-axis z --k 10 --emb-dims 512 --seed "$s" --out "$OUT/random_svm_seed$s"
done
# 5. Every frozen-feature protocol in one table (crossmoco eval report): pretrained vs random init.
[[ -f "$OUT/report/report.md" ]] || \
  T crossmoco eval report --data "$SRC" --up-axis z --checkpoint "$CKPT" --out "$OUT/report"
python bench/results_table.py "$OUT"
