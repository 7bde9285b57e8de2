#!/usr/bin/env bash
# One-GPU check of flashcomm (tp = 1 with forced collectives), and its CPU rehearsal.
#
#   scripts/gpu_check.sh [--quick] [--dry-run] [--keep-going]
#
# GPU run (default): under the machine's python3 and torch, no network (PIP_NO_INDEX=1):
#   env            torch / CUDA / NCCL versions and the GPU, first
#   build          CMake + ninja against this torch, TORCH_CUDA_ARCH_LIST=9.0, into
#                  build/cuda; if CMake fails, a direct ninja + g++ build
#                  (gpu_check.py build-direct) into build/cuda-direct
#   probe          the library loads; with FLASHCOMM_DEBUG_FORCE_COLLECTIVES=1 the
#                  one-rank group takes the tp > 1 paths (pipelined / sharded)
#   checks         every op vs the dense reference, FP and W8A8 (every mode, m = 1..16, >= 17)
#   opcheck        torch.library.opcheck of every op, both paths
#   graphs         CUDA-graph capture + replay of every op with forced collectives
#   compile        torch.compile of the tiny DecoderModel (FP, W8A8): one graph for all n
#   bench-gemm     int8 vs bf16 GEMM, chunked-GEMM efficiency (n = 1K..16K, H = 4096/8192),
#                  W8A8 linear at m = 1, 16, 64 (CUDA events, medians)
#   bench-overlap  pipelined vs sequential gemm_rs / ag_gemm with forced collectives
#   report         gpu_check.json + gpu_check.txt
# Every step runs under `timeout`, logs to $OUT/<step>.log, and the run stops at the
# first failing step, printing the end of its log (--keep-going: run every step).
# --quick: fewer timing repeats (the whole run fits in ~7 minutes on one H200 with the
# build); the checks are the same in both modes.
#
# --dry-run: the same steps on CPU (gloo through the c10d transport, as NCCL on the GPU;
# CUDA events -> wall clock, graph capture -> eager re-run), with .venv's python when
# present. It builds with CMake into build/gpu-dry-run and rehearses the direct build into
# build/gpu-dry-run-direct (both incremental); with FLASHCOMM_LIB set it uses that
# library, runs the CMake configure only and plans the direct build (ninja -n).
#
# Environment: OUT (default ./gpu_check_out) for logs and figures, PYTHON, GPU_CHECK_BUILD_DIR,
# JOBS. Exit status 0 = all steps passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

QUICK=0; DRY=0; KEEP_GOING=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --dry-run) DRY=1 ;;
    --keep-going) KEEP_GOING=1 ;;
    -h|--help) sed -n '2,/^set -uo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/*.log "$OUT"/*.json "$OUT"/gpu_check.txt "$OUT"/.store.*
export PIP_NO_INDEX=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
JOBS="${JOBS:-$(nproc)}"

if (( DRY )); then
  DEVICE=cpu
  # On CUDA the ops use the c10d transport (NCCL); on CPU auto would pick shared memory.
  export FLASHCOMM_TRANSPORT=c10d
  if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
  elif [[ -x .venv/bin/python ]]; then PY="$ROOT/.venv/bin/python"
  else PY=python3; fi
  BUILD_DIR="${GPU_CHECK_BUILD_DIR:-build/gpu-dry-run}"
else
  DEVICE=cuda
  PY="${PYTHON:-python3}"
  BUILD_DIR="${GPU_CHECK_BUILD_DIR:-build/cuda}"
  export TORCH_CUDA_ARCH_LIST=9.0
  # The CUDA toolkit for CMake's CUDA detection (torch's CMake config enables CUDA).
  if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH="/usr/local/cuda/bin:$PATH"
  fi
  command -v nvcc >/dev/null && export CUDACXX="${CUDACXX:-$(command -v nvcc)}"
fi
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
# Repeats of the timing steps: the figures need more on the GPU than the rehearsal.
if (( DRY )); then BENCH=(--repeats 3 --warmup 1)
elif (( QUICK )); then BENCH=(--repeats 10 --warmup 3)
else BENCH=(--repeats 50 --warmup 10); fi
COMMON=(--device "$DEVICE" --out "$OUT")

declare -a SUMMARY=()
STATUS=0
t_run=$SECONDS

# step [--has-fallback] NAME TIMEOUT_S COMMAND...: runs COMMAND under timeout, output to
# $OUT/NAME.log. A failure stops the run (unless --keep-going), except for a step with a
# fallback, which only reports.
step() {
  local fallback=0
  [[ "$1" == --has-fallback ]] && { fallback=1; shift; }
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc
  printf '== %-14s ' "$name"
  timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - t0)) verdict
  case $rc in
    0) verdict="passed" ;;
    3) verdict="FAILED: forced collective paths not taken (FLASHCOMM_DEBUG_FORCE_COLLECTIVES" ;
       verdict+=" not honoured by this library)" ;;
    124|137) verdict="FAILED: timed out after ${limit}s" ;;
    *) verdict="FAILED (exit $rc)" ;;
  esac
  (( rc != 0 && fallback )) && verdict+=", trying the fallback"
  printf '%-6s %s\n' "${took}s" "$verdict"
  SUMMARY+=("$(printf '%-14s %5ss  %s' "$name" "$took" "$verdict")")
  if (( rc != 0 )); then
    echo "---- end of $OUT/$name.log ----"
    tail -n 60 "$OUT/$name.log"
    echo "----"
    if (( ! fallback )); then
      STATUS=1
      (( KEEP_GOING )) || finish
    fi
  fi
  return $rc
}

finish() {
  if [[ -f "$OUT/env.json" ]]; then
    timeout 120 "$PY" scripts/gpu_check.py report "${COMMON[@]}" > "$OUT/report.log" 2>&1
    [[ -f "$OUT/gpu_check.txt" ]] && sed -n '/^GEMM\|^W8A8\|^Pipelined/,$p' "$OUT/gpu_check.txt"
  fi
  echo "== summary ($( ((DRY)) && echo "dry run on CPU" || echo "$DEVICE");" \
    "$((SECONDS - t_run)) s; logs and figures in $OUT)"
  printf '  %s\n' "${SUMMARY[@]}"
  echo "gpu_check: $( ((STATUS == 0)) && echo passed || echo FAILED)"
  exit $STATUS
}

# build_cmake [configure-only]
build_cmake() {
  local prefix generator=()
  prefix="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" || return 1
  command -v ninja >/dev/null && generator=(-G Ninja)
  echo "cmake configure against torch at $prefix (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-})"
  cmake -S . -B "$BUILD_DIR" "${generator[@]}" --no-warn-unused-cli -DCMAKE_BUILD_TYPE=Release \
    -DFLASHCOMM_BUILD_TESTS=OFF -DCMAKE_PREFIX_PATH="$prefix" \
    -DPython_EXECUTABLE="$(command -v "$PY")" || return 1
  [[ "${1:-}" == configure-only ]] && return 0
  cmake --build "$BUILD_DIR" -j "$JOBS" || return 1
  test -f "$BUILD_DIR/libflashcomm_ops.so"
}
export -f build_cmake
export PY BUILD_DIR JOBS

echo "gpu_check: $( ((DRY)) && echo "DRY RUN on CPU" || echo "GPU run") with $PY," \
  "$( ((QUICK)) && echo quick || echo full) mode, output in $OUT"

step env 120 "$PY" scripts/gpu_check.py env "${COMMON[@]}"
sed '/^$/d; /^env: /d; s/^/   /' "$OUT/env.log" | head -20

# --- build -------------------------------------------------------------------------------
if (( DRY )) && [[ -n "${FLASHCOMM_LIB:-}" ]]; then
  # A prebuilt library: the build steps are rehearsed without compiling.
  echo "   FLASHCOMM_LIB=$FLASHCOMM_LIB: CMake configure only, direct build planned (ninja -n)"
  step build 300 bash -c "build_cmake configure-only"
  step build-direct 300 "$PY" scripts/gpu_check.py build-direct "${COMMON[@]}" \
    --build-dir "$BUILD_DIR-direct" --plan-only
  LIB="$FLASHCOMM_LIB"
else
  if step --has-fallback build 900 bash -c build_cmake; then
    LIB="$ROOT/$BUILD_DIR/libflashcomm_ops.so"
    if (( DRY )); then  # rehearse the fallback the GPU run takes when CMake fails
      step build-direct 900 "$PY" scripts/gpu_check.py build-direct "${COMMON[@]}" \
        --build-dir "$BUILD_DIR-direct" --jobs "$JOBS"
      step probe-direct 300 env FLASHCOMM_LIB="$ROOT/$BUILD_DIR-direct/libflashcomm_ops.so" \
        "$PY" scripts/gpu_check.py probe "${COMMON[@]}"
    fi
  else
    step build-direct 900 "$PY" scripts/gpu_check.py build-direct "${COMMON[@]}" \
      --build-dir "$BUILD_DIR-direct" --jobs "$JOBS" \
      && LIB="$ROOT/$BUILD_DIR-direct/libflashcomm_ops.so"
  fi
fi
export FLASHCOMM_LIB="${LIB:-}"
[[ -n "$FLASHCOMM_LIB" ]] || { STATUS=1; finish; }

# --- checks (forced collectives) and figures -------------------------------------------------
export FLASHCOMM_DEBUG_FORCE_COLLECTIVES=1
step probe 300 "$PY" scripts/gpu_check.py probe "${COMMON[@]}"
step checks 600 "$PY" scripts/gpu_check.py checks "${COMMON[@]}"
step opcheck 600 "$PY" scripts/gpu_check.py opcheck "${COMMON[@]}"
step graphs 600 "$PY" scripts/gpu_check.py graphs "${COMMON[@]}"
step compile 900 "$PY" scripts/gpu_check.py compile "${COMMON[@]}"
step bench-gemm 900 env FLASHCOMM_DEBUG_FORCE_COLLECTIVES=0 \
  "$PY" scripts/gpu_check.py bench-gemm "${COMMON[@]}" "${BENCH[@]}"
step bench-overlap 900 "$PY" scripts/gpu_check.py bench-overlap "${COMMON[@]}" "${BENCH[@]}"
finish
