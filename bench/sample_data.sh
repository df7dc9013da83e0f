#!/usr/bin/env bash
# The shipped sample set as a user meets it, with nothing scored that the model trained on:
# every 5th normal image is held back (as `anomon demo` does), the model trains on the other 120
# with `anomon train` defaults (target false-alarm rate 10%: 12 held-out images cannot back 5%),
# then `anomon evaluate` scores the 30 held-back normals and the 30 defective images and writes
# the report (ROC curve, score histogram, heat maps of the highest scores) and every heat map.
set -euo pipefail
cd "$(dirname "$0")/.."
ANOMON=${ANOMON:-.venv/bin/anomon}
OUT=${1:-bench/results/sample_data}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/train" "$work/normal" "$OUT"
i=0
for f in sample_data/normal/*.png; do
  if (( i % 5 == 0 )); then cp "$f" "$work/normal/"; else cp "$f" "$work/train/"; fi
  i=$((i + 1))
done
start=$(date +%s)
"$ANOMON" train "$work/train" -o "$work/model.anomon" --target-fpr 0.1 2>&1 | tail -1
echo "train wall: $(( $(date +%s) - start )) s"
"$ANOMON" evaluate "$work/model.anomon" --normal "$work/normal" --anomalous sample_data/anomalous --report "$OUT"
"$ANOMON" score "$work/model.anomon" sample_data/anomalous --format table --heatmaps "$OUT/all_heatmaps" > "$OUT/anomalous_scores.txt" || true
