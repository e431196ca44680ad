#!/usr/bin/env bash
# A/B runs of the modelnet40-cpu recipe on real ModelNet40 (issue: a CPU recipe that learns). Each variant is a
# short pretraining (train.epochs=2 unless the variant says otherwise) whose per-epoch monitor measures the
# clean-protocol SVM and kNN on the validation split against a random-init encoder of the same architecture.
#   bash bench/ab_modelnet40.sh VARIANT [VARIANT ...]     (default shards: bench/out/mn40/shards)
#   python bench/ab_table.py bench/out/ab                 (the table of every run so far)
# Variants are named override sets (below) on the preset as it was during the A/B, with CrossPoint's spin about
# the up axis (ROT); `norot` is the preset as it is now, `shaded` the same on splats shaded by normals estimated
# from the points (`prepare --render-mode shaded`) instead of depth splats. A run that already finished is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS="${SHARDS:-bench/out/mn40/shards}"
SRC="${SRC:-../shared/data/modelnet40_1024}"
OUT="${OUT:-bench/out/ab}"
mkdir -p "$OUT"
SHADED="${SHADED:-bench/out/mn40-shaded/shards}"

# The shards a variant trains on: depth splats (the default render) unless the variant says otherwise.
shards() {
  case "$1" in
    shaded*) echo "$SHADED" ;;
    *)       echo "$SHARDS" ;;
  esac
}
prepare() {
  local out="$1"; shift
  [[ -f "$out/manifest.json" ]] || crossmoco prepare "$SRC" --out "$out" --up-axis z --val-fraction 0.1 "$@"
}

overrides() {
  case "$1" in
    base)        echo "" ;;                                         # the preset during the A/B (512 points)
    pts1024)     echo "data.num_points=1024" ;;                     # train on what is evaluated
    pts1024-lr2) echo "data.num_points=1024 optim.lr=0.002" ;;
    pts1024-t02) echo "data.num_points=1024 objective.temperature=0.2 objective.cross_temperature=0.2" ;;
    pts1024-m999) echo "data.num_points=1024 objective.momentum=0.999" ;;
    pts1024-k4096) echo "data.num_points=1024 objective.queue_length=4096" ;;
    pts1024-img64) echo "data.num_points=1024 data.image_size=64" ;;
    pts1024-weak) echo "data.num_points=1024 data.point_augment.translate=0.1 data.point_augment.scale_low=0.8 data.point_augment.scale_high=1.25 data.point_augment.dropout_max=0.5" ;;
    pts1024-strong) echo "data.num_points=1024 data.point_augment.dropout_max=0.875 data.point_augment.jitter_std=0.02" ;;
    pts1024-k20) echo "data.num_points=1024 model.k=20" ;;
    norot)       echo "" ;;                                         # ModelNet40 is aligned: no spin about up
    shaded)      echo "" ;;                          # norot on splats shaded by PCA normals (issue 16)
    lr2)         echo "optim.lr=0.002" ;;
    lr05)        echo "optim.lr=0.0005" ;;
    t02)         echo "objective.temperature=0.2 objective.cross_temperature=0.2" ;;
    weak)        echo "data.point_augment.translate=0.1 data.point_augment.scale_low=0.8 data.point_augment.scale_high=1.25 data.point_augment.dropout_max=0.5" ;;
    m999)        echo "objective.momentum=0.999" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

for variant in "$@"; do
  extra="$(overrides "$variant")"
  [[ "$variant" == norot || "$variant" == shaded* ]] || extra="data.point_augment.rotate=true $extra"
  data="$(shards "$variant")"
  if [[ "$data" == "$SHADED" ]]; then prepare "$data" --render-mode shaded; else prepare "$data"; fi
  if compgen -G "$OUT/$variant/epoch_*/history.json" > /dev/null && [[ -f "$OUT/$variant.done" ]]; then
    echo "== $variant: done already"; continue
  fi
  echo "== $variant: $extra"
  # shellcheck disable=SC2086
  /usr/bin/time -v crossmoco pretrain --preset modelnet40-cpu --data "$data" --storage "$OUT" --name "$variant" \
    train.epochs=2 eval.final=false $extra 2>&1 | tee "$OUT/$variant.log"
  touch "$OUT/$variant.done"
done
