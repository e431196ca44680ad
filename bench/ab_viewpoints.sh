#!/usr/bin/env bash
# Viewpoints A/B (issue 29): the 6 fixed viewpoints rendered once at prepare (`stored`, today's default) against
# fresh random viewpoints rendered in the pipeline every epoch (`fresh`: data.render.viewpoints=fresh), at the
# same budget (same epochs, steps, batch, objects, points), seeds 0 and 1 per arm, on two datasets:
#   builtin: the quickstart preset on the built-in set (shaded meshes; its shards hold renders and meshes);
#   mn40:    the modelnet40-cpu preset for 2 epochs on real ModelNet40 (depth splats of the 1024 stored points).
# Each run's monitor measures the clean-protocol SVM and kNN on the validation split against a random-init
# encoder (gains with their paired standard errors).
#   bash bench/ab_viewpoints.sh builtin:stored:0 builtin:fresh:0 mn40:stored:0 mn40:fresh:0 ...
#   python bench/ab_table.py bench/out/ab_viewpoints/builtin     (and .../mn40)
# A run that already finished is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/ab_viewpoints}"
SRC="${SRC:-../shared/data/modelnet40_1024}"
MN40="${MN40:-bench/out/mn40/shards}"
mkdir -p "$OUT"
for run in "$@"; do
  IFS=: read -r dataset arm seed <<<"$run"
  case "$arm" in
    stored) extra="data.render.viewpoints=stored" ;;
    fresh)  extra="data.render.viewpoints=fresh" ;;
    *) echo "unknown arm $arm (stored, fresh)" >&2; exit 2 ;;
  esac
  case "$dataset" in
    builtin) args=(--preset quickstart); sized="" ;;
    mn40)
      [[ -f "$MN40/manifest.json" ]] || crossmoco prepare "$SRC" --out "$MN40" --up-axis z --val-fraction 0.1
      args=(--preset modelnet40-cpu --data "$MN40"); sized="train.epochs=2 eval.eval_every=1" ;;
    *) echo "unknown dataset $dataset (builtin, mn40)" >&2; exit 2 ;;
  esac
  name="$arm-s$seed"
  mkdir -p "$OUT/$dataset"
  if [[ -f "$OUT/$dataset/$name.done" ]]; then echo "== $dataset $name: done already"; continue; fi
  echo "== $dataset $name: $extra train.seed=$seed"
  # shellcheck disable=SC2086
  /usr/bin/time -v crossmoco pretrain "${args[@]}" --storage "$OUT/$dataset" --name "$name" \
    $extra $sized "train.seed=$seed" train.deterministic=true 2>&1 | tee "$OUT/$dataset/$name.log"
  touch "$OUT/$dataset/$name.done"
done
