#!/usr/bin/env bash
# Measure a white-cell training run as a bundle candidate, side by side with the bundled model:
# export -> crop scale -> calibrate (fit half of pbc/calib) -> evaluate (held-out half) -> site check (BCCD).
#   bash training/evaluate_candidate.sh runs/pbc32-robust2 /tmp/cand [THREADS]
# Writes OUT (the candidate bundle) and OUT.logs/ (each step's output; evaluate_*.json the metrics).
set -euo pipefail
RUN=${1:?training run folder}
OUT=${2:?candidate bundle folder to write}
THREADS=${3:-2}
PY=${PYTHON:-.venv/bin/python}
LOGS="$OUT.logs"
rm -rf "$OUT" "$LOGS" && mkdir -p "$LOGS"
"$PY" -m cytoedge.export.make_bundle --run "$RUN" --out "$OUT" --name "$(basename "$RUN")-candidate" > "$LOGS/make_bundle.log" 2>&1
"$PY" -m cytoedge.calibration.crop_scale --data ../shared/data/pbc/train --model "$OUT" > "$LOGS/crop_scale.log" 2>&1
"$PY" -m cytoedge.runtime.cli calibrate --data ../shared/data/pbc/calib --model "$OUT" --per-class 80 --threads "$THREADS" > "$LOGS/calibrate.log" 2>&1
"$PY" -m cytoedge.runtime.cli evaluate --data ../shared/data/pbc/calib --model "$OUT" --threads "$THREADS" --out "$LOGS/evaluate_candidate.json" > "$LOGS/evaluate_candidate.log" 2>&1
"$PY" -m cytoedge.runtime.cli evaluate --data ../shared/data/pbc/calib --threads "$THREADS" --out "$LOGS/evaluate_bundled.json" > "$LOGS/evaluate_bundled.log" 2>&1
"$PY" benchmarks/bench_site.py --model "$OUT" --per-class 60 --only domain --threads "$THREADS" > "$LOGS/site_domain.md" 2>&1
echo "candidate: $OUT; metrics: $LOGS/evaluate_candidate.json vs $LOGS/evaluate_bundled.json; BCCD: $LOGS/site_domain.md"
