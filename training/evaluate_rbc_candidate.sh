#!/usr/bin/env bash
# Measure a red-cell training run as a bundle candidate, side by side with the bundled red-cell model:
# export -> calibration cells (train half, 80 a class) -> calibrate (grading, domain) -> held-out Chula fields.
#   bash training/evaluate_rbc_candidate.sh runs/rbc-fine /tmp/rbc_cand [THREADS]
# Writes OUT (the candidate bundle) and OUT.logs/ (each step's output; bench.md the side-by-side table).
set -euo pipefail
RUN=${1:?training run folder}
OUT=${2:?candidate bundle folder to write}
THREADS=${3:-2}
PY=${PYTHON:-.venv/bin/python}
CHULA=${CHULA:-../shared/data/chula_rbc12}
CAL=${RBC_CAL:-.cache/rbc-cal}
LOGS="$OUT.logs"
rm -rf "$OUT" "$LOGS" && mkdir -p "$LOGS"
"$PY" -m cytoedge.export.make_bundle --run "$RUN" --out "$OUT" --name "$(basename "$RUN")-candidate" > "$LOGS/make_bundle.log" 2>&1
# The bundle's calibration cells: the same 80 training-half cells a class every red-cell bundle is calibrated on.
[ -d "$CAL" ] || "$PY" -m cytoedge.training.rbc_data --data "$CHULA" --half train --per-class 80 --seed 1 --out "$CAL" > "$LOGS/rbc_cal.log" 2>&1
"$PY" -m cytoedge.runtime.cli calibrate --data "$CAL" --half all --model "$OUT" --threads "$THREADS" > "$LOGS/calibrate.log" 2>&1
"$PY" benchmarks/bench_rbc_model.py --data "$CHULA" --model "$OUT" --model models/rbc32-ddpm --threads "$THREADS" > "$LOGS/bench.md" 2>&1
echo "candidate: $OUT; held-out Chula fields, candidate vs bundled: $LOGS/bench.md"
