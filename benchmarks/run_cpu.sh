#!/usr/bin/env bash
# Reproduces the CPU figures of BENCHMARKS.md: tune the crossovers on this machine,
# bench with the tuned table loaded (auto policy vs best fixed strategy), a short run
# with 2 intra-op threads per rank (threads check), and flashcomm inside vLLM vs vLLM
# alone (when the vllm extra is installed). Results go to benchmarks/results/ (JSON,
# PNG, tuning table). About 12 minutes on 2 cores; run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT=benchmarks/results
mkdir -p "$OUT"
"$PY" -m flashcomm tune --repeats 7 --margin 0.05 -o "$OUT/tuning_cpu2.json"
"$PY" -m flashcomm bench --repeats 7 --table "$OUT/tuning_cpu2.json" \
  --pipe-sweep 2x16,8x16,4x128 --json "$OUT/bench_cpu2.json" --plot "$OUT/bench_cpu2.png"
"$PY" -m flashcomm bench --threads 2 --ops gemm_rs,ag_gemm --tokens 1024,8192 --no-model \
  --no-gemm --no-chunks --json "$OUT/bench_cpu2_threads2.json" --plot ''
if "$PY" -c "import vllm" 2>/dev/null; then
  "$PY" benchmarks/vllm_bench.py layers --json "$OUT/vllm_layers_cpu2.json"
  "$PY" benchmarks/vllm_bench.py e2e --json "$OUT/vllm_e2e_cpu2.json"
else
  echo "vLLM not installed (make install-vllm): skipping benchmarks/vllm_bench.py" >&2
fi
