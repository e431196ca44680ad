#!/usr/bin/env bash
# Renders A/B on the built-in set (issue 16): the quickstart recipe on views that are shaded mesh renders
# (`mesh`, the default since the built-in objects are meshes) against splats of the same objects' points
# (`points`: data.render.points_only=true, depth splats, the views every source got before meshes).
# Same objects, same points, same seed; only the images differ. Each run's per-epoch monitor measures the
# clean-protocol SVM and kNN on the validation split against a random-init encoder, and the run ends with
# the clean SVM on the test split.
#   bash bench/ab_renders.sh mesh points
#   python bench/ab_table.py bench/out/ab_renders
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out/ab_renders}"
mkdir -p "$OUT"
for variant in "$@"; do
  case "$variant" in
    mesh)   extra="" ;;
    points) extra="data.render.points_only=true" ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  if [[ -f "$OUT/$variant.done" ]]; then echo "== $variant: done already"; continue; fi
  echo "== $variant: $extra"
  # shellcheck disable=SC2086
  /usr/bin/time -v crossmoco pretrain --preset quickstart --storage "$OUT" --name "$variant" $extra 2>&1 \
    | tee "$OUT/$variant.log"
  touch "$OUT/$variant.done"
done
