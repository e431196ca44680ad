#!/usr/bin/env bash
# Issue 15's fine-tuning acceptance (docs/results.md): `crossmoco finetune cls` on real ModelNet40 from the
# CPU-recipe checkpoint (bench/modelnet40.sh) and from random init of the same architecture (DGCNN k=10,
# emb 512), the same budget: the modelnet40-cpu fine-tuning preset (8 epochs, 512 points, 2 workers).
#   bash bench/finetune_mn40.sh [MODELNET40_DIR] [CHECKPOINT]
# Everything goes to bench/out/mn40_ft/; a finished run is skipped, an interrupted one resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="${1:-../shared/data/modelnet40_1024}"
CKPT="${2:-$(ls -d bench/out/mn40/runs/mn40-cpu/epoch_* | sort | tail -1)}"
OUT=bench/out/mn40_ft
mkdir -p "$OUT"
T() { /usr/bin/time -v "$@"; }

[[ -f "$OUT/runs/pretrained/report.json" ]] || T crossmoco finetune cls --data "$SRC" --up-axis z \
  --checkpoint "$CKPT" --preset modelnet40-cpu --storage "$OUT/runs" --name pretrained 2>&1 | tee "$OUT/pretrained.log"
[[ -f "$OUT/runs/random/report.json" ]] || T crossmoco finetune cls --data "$SRC" --up-axis z \
  --preset modelnet40-cpu model.k=10 model.emb_dims=512 --storage "$OUT/runs" --name random 2>&1 \
  | tee "$OUT/random.log"
python bench/finetune_table.py "$OUT/runs/pretrained/report.json" "$OUT/runs/random/report.json"
