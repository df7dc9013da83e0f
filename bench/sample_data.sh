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
rm -rf "$OUT/heatmaps" "$OUT/all_heatmaps"  # an earlier run ranked other images first
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
# Do the heat maps point at the defects? The hottest pixel of each map against the drawn box.
"${PYTHON:-.venv/bin/python}" - "$work/model.anomon" <<'PY' | tee "$OUT/localisation.txt"
import json, sys
from pathlib import Path
import numpy as np
from anomon.detector import Detector
from anomon.images import load_image
det = Detector.load(sys.argv[1])
boxes = json.loads(Path("sample_data/anomalous/defects.json").read_text())["images"]  # box: x0, y0, x1, y1
hits, margin = 0, 8
for name, d in sorted(boxes.items()):
    img = load_image(Path("sample_data/anomalous") / name)
    _, maps = det.score_with_maps(det.preprocess(img)[None])
    m = np.asarray(maps[0])
    y, x = np.unravel_index(np.argmax(m), m.shape)
    sy, sx = img.height / m.shape[0], img.width / m.shape[1]
    x0, y0, x1, y1 = d["box"]
    inside = x0 - margin <= x * sx <= x1 + margin and y0 - margin <= y * sy <= y1 + margin
    hits += inside
    if not inside:
        print(f"  hottest pixel outside the box: {name} at ({x * sx:.0f}, {y * sy:.0f}), box {d['box']}")
print(f"heat maps: hottest pixel on the defect (box + {margin} px) in {hits} of {len(boxes)} images")
PY
