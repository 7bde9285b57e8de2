#!/usr/bin/env bash
# Reproduces the CPU figures of BENCHMARKS.md: tune the crossovers on this machine,
# then bench with the tuned table loaded (auto policy vs best fixed strategy), and a
# short run with 2 intra-op threads per rank (threads check). Results go to
# benchmarks/results/ (JSON, PNG, tuning table). About 6-8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT=benchmarks/results
mkdir -p "$OUT"
"$PY" -m flashcomm tune -o "$OUT/tuning_cpu2.json"
"$PY" -m flashcomm bench --table "$OUT/tuning_cpu2.json" --pipe-sweep 2x16,8x16,4x128 \
  --json "$OUT/bench_cpu2.json" --plot "$OUT/bench_cpu2.png"
"$PY" -m flashcomm bench --threads 2 --ops gemm_rs,ag_gemm --tokens 1024,8192 --no-model \
  --no-gemm --no-chunks --json "$OUT/bench_cpu2_threads2.json" --plot ''
