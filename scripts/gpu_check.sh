#!/usr/bin/env bash
# GPU check of flashcomm on a single-GPU CUDA machine (tp = 1).
#
#   scripts/gpu_check.sh [--quick]
#
# 1. builds the extension against the torch already installed on this machine
#    (pip install --no-build-isolation -e .; no torch is downloaded: --no-deps);
# 2. runs scripts/gpu_check.py: every op on CUDA against the dense reference,
#    torch.library.opcheck, CUDA-graph capture + replay of each op, torch.compile
#    (aot_eager and inductor, one graph across token counts);
# 3. measures int8 GEMM vs bf16 GEMM and chunked-GEMM efficiency at
#    n = 1K..16K, H = 4096 / 8192, and prints a table (--quick: H = 4096, n <= 4K);
# 4. runs the CPU test suite's fast files as a sanity check of the build.
#
# Environment: PYTHON (default: python3), OUT (default: gpu_check_out) for logs/JSON.
# Not run in the CPU-only development session this was written in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"

"$PY" - <<'EOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device (torch %s)" % torch.__version__)
print("torch", torch.__version__, "CUDA", torch.version.cuda, "device", torch.cuda.get_device_name())
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

echo "== build (against this machine's torch)"
"$PY" -m pip install --quiet "setuptools>=64" wheel cmake ninja pytest hypothesis numpy
FLASHCOMM_BUILD_DIR=build/cuda "$PY" -m pip install --quiet --no-build-isolation --no-deps -e . \
  2>&1 | tee "$OUT/build.log"

ARGS=()
if [[ "${1:-}" == "--quick" ]]; then ARGS=(--hidden 4096 --tokens 1024,2048,4096 --repeats 10); fi

echo "== checks and GEMM timings on CUDA"
status=0
"$PY" scripts/gpu_check.py --json "$OUT/gpu_check.json" "${ARGS[@]}" 2>&1 | tee "$OUT/gpu_check.log" \
  || status=1

echo "== CPU op tests against the same build (sanity)"
"$PY" -m pytest -q tests/test_opcheck.py tests/test_gemm_rs.py tests/test_ag_gemm.py \
  tests/test_w8a8.py 2>&1 | tail -5 | tee "$OUT/pytest.log" || status=1

echo "gpu_check: $([[ $status == 0 ]] && echo passed || echo FAILED); logs in $OUT/"
exit $status
