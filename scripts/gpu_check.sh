#!/usr/bin/env bash
# One-GPU check of flashcomm (tp = 1 with forced collectives), and its CPU rehearsal.
#
#   scripts/gpu_check.sh [--quick] [--keep-going] [--dry-run]
#
# First contact with a GPU machine: `bash scripts/gpu_check.sh --quick --keep-going`, one
# command that builds, checks, measures and returns its report even when a step fails.
#
# GPU run (default): under the machine's python3 and torch, no network (PIP_NO_INDEX=1):
#   env            torch / CUDA / NCCL versions, the GPU, the CUDA toolkit (root, any
#                  libnvrtc*), CMake, first
#   build          CMake + ninja against this torch, TORCH_CUDA_ARCH_LIST=9.0, into
#                  build/cuda. The CUDA toolkit (CUDA_PATH, CUDA_HOME or /usr/local/cuda)
#                  goes first on PATH and CUDA_PATH is exported (scripts/cuda_env.sh):
#                  torch's CMake config needs both where the nvcc on PATH is a wrapper
#   build-fallback if CMake fails: the same CMakeLists.txt with
#                  -DFLASHCOMM_TORCH_FROM_PYTHON=ON (torch located through Python, without
#                  torch's CMake config and its CUDA detection) into build/cuda-fallback
#   probe          the library loads; with FLASHCOMM_DEBUG_FORCE_COLLECTIVES=1 the
#                  one-rank group takes the tp > 1 paths (pipelined / sharded)
#   checks         every op vs the dense reference, FP and W8A8 (every mode, m = 1..16, >= 17)
#   opcheck        torch.library.opcheck of every op, both paths
#   graphs         CUDA-graph capture + replay of every op with forced collectives
#   compile        torch.compile of the tiny DecoderModel (FP, W8A8): one graph for all n
#   bitwise-modes  FLASHCOMM_BITWISE_MODES: every sp_* op sharded == replicated, bitwise
#   bench-gemm     int8 vs bf16 GEMM, chunked-GEMM efficiency (n = 1K..16K, H = 4096/8192),
#                  W8A8 linear at m = 1, 16, 64 (CUDA events, medians)
#   bench-overlap  pipelined vs sequential gemm_rs / ag_gemm with forced collectives
#   report         gpu_check.json, gpu_check.txt and gpu_check_logs.tar.gz into $OUT
#
# Time: the whole run has a deadline (GPU_CHECK_DEADLINE_S, default 520 s, under the GPU
# machine's 10-minute command limit; dry run: 1200 s and 3x the step limits); each step
# runs under `timeout` with its own limit capped to what is left of the deadline (40 s
# kept for the report), and a step that cannot start in time is reported as skipped.
# Process groups time out after 90 s (init_process_group(timeout=...);
# GPU_CHECK_PG_TIMEOUT_S), not NCCL's 10 minutes. On SIGTERM / SIGINT (the command limit)
# the running step is killed and the report is still written; the report files are also
# brought up to date after every step.
#
# Failures: a failing step prints the end of its log; the run stops there unless
# --keep-going, which runs every step. Only a build failure (CMake and its fallback both
# failed: no library) stops a --keep-going run.
# --quick: fewer timing repeats; the checks are the same in both modes.
#
# Output: exactly three files in $OUT (default ./gpu_check_out): gpu_check.json (every
# step's results and the step table), gpu_check.txt (the summary and figures) and
# gpu_check_logs.tar.gz (every step's log and JSON). Logs, the process groups' file
# stores and the JSONs are written to a work directory under /tmp (GPU_CHECK_WORK).
#
# --dry-run: the same steps on CPU (gloo through the c10d transport, as NCCL on the GPU;
# CUDA events -> wall clock, graph capture -> eager re-run), with .venv's python when
# present. It compiles both builds the GPU run may use: CMake into build/gpu-dry-run and
# the fallback into build/gpu-dry-run-fallback (incremental; ccache when present), and
# probes the fallback's library too. FLASHCOMM_LIB is ignored: the library is always the
# one just built.
#
# Environment: OUT, PYTHON, GPU_CHECK_BUILD_DIR, GPU_CHECK_WORK, GPU_CHECK_DEADLINE_S,
# GPU_CHECK_PG_TIMEOUT_S, JOBS; GPU_CHECK_DEBUG_HANG=<step> makes that step hang (the
# rehearsal of a hang: scripts/gpu_check_hang_rehearsal.sh). Exit status 0 = all steps
# passed.
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

t_run=$SECONDS
# The dry run on 2 shared CPU cores compiles and checks slower than the GPU machine (16
# cores): its deadline and step limits are longer (x3); the mechanism is the same.
if (( DRY )); then DEADLINE_S="${GPU_CHECK_DEADLINE_S:-1200}"; LIMIT_SCALE=3
else DEADLINE_S="${GPU_CHECK_DEADLINE_S:-520}"; LIMIT_SCALE=1; fi
REPORT_RESERVE_S=40
OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/*.log "$OUT"/*.json "$OUT"/gpu_check.txt "$OUT"/.store.* \
  "$OUT"/gpu_check_logs.tar.gz
WORK="${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}"
LOGS="$WORK/logs"
rm -rf "$LOGS" "$WORK/stores" && mkdir -p "$LOGS" "$WORK/stores"
export PIP_NO_INDEX=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
JOBS="${JOBS:-$(nproc)}"
unset FLASHCOMM_LIB  # the library is the one this run builds

if (( DRY )); then
  DEVICE=cpu; MODE="dry run on CPU"
  # On CUDA the ops use the c10d transport (NCCL); on CPU auto would pick shared memory.
  export FLASHCOMM_TRANSPORT=c10d
  if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
  elif [[ -x .venv/bin/python ]]; then PY="$ROOT/.venv/bin/python"
  else PY=python3; fi
  BUILD_DIR="${GPU_CHECK_BUILD_DIR:-build/gpu-dry-run}"
  # Both builds of the rehearsal through ccache, with paths relative to the checkout, so
  # the fallback (same sources and flags, another build dir) mostly hits the cache.
  if command -v ccache >/dev/null; then
    LAUNCHER=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); export CCACHE_BASEDIR="$ROOT"
  else LAUNCHER=(); fi
else
  DEVICE=cuda; MODE="GPU run"
  PY="${PYTHON:-python3}"
  BUILD_DIR="${GPU_CHECK_BUILD_DIR:-build/cuda}"
  LAUNCHER=()
  export TORCH_CUDA_ARCH_LIST=9.0
  # shellcheck source=cuda_env.sh
  source scripts/cuda_env.sh
  cuda_env || echo "gpu_check: no CUDA toolkit found (CUDA_PATH, CUDA_HOME, /usr/local/cuda);" \
    "CMake will likely fail and the fallback build is used"
fi
[[ "$PY" == */* ]] && PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
# Repeats of the timing steps: the figures need more on the GPU than the rehearsal.
if (( DRY )); then BENCH=(--repeats 3 --warmup 1)
elif (( QUICK )); then BENCH=(--repeats 10 --warmup 3)
else BENCH=(--repeats 50 --warmup 10); fi
COMMON=(--device "$DEVICE" --out "$LOGS" --store-dir "$WORK/stores")
MODE+=", $( ((QUICK)) && echo quick || echo full)$( ((KEEP_GOING)) && echo ", keep-going")"

declare -a ROWS=()   # "name|seconds|verdict" per step, in order
STATUS=0
CUR_PID=""; CUR_STEP=""; CUR_T0=0; STOPPED=""

json_str() { local s="${1//\\/\\\\}"; s="${s//\"/\\\"}"; printf '"%s"' "$s"; }

# The report as far as the run has got: run.json (the step table) into the logs, a copy as
# $OUT/gpu_check.json, the table as $OUT/gpu_check.txt and the logs' tarball. Cheap; runs
# after every step, so even a run killed without warning returns what it had.
write_partial() {
  local verdict="$1" row name secs what sep="" steps=""
  for row in "${ROWS[@]}"; do
    IFS='|' read -r name secs what <<<"$row"
    steps+="$sep{\"step\": $(json_str "$name"), \"seconds\": $secs, \"verdict\": $(json_str "$what")}"
    sep=", "
  done
  printf '{"mode": %s, "verdict": %s, "seconds": %d, "deadline_s": %s, "work_dir": %s, "steps": [%s]}\n' \
    "$(json_str "$MODE")" "$(json_str "$verdict")" "$((SECONDS - t_run))" "$DEADLINE_S" \
    "$(json_str "$WORK")" "$steps" > "$LOGS/run.json"
  cp "$LOGS/run.json" "$OUT/gpu_check.json"
  { echo "gpu_check ($MODE): $verdict after $((SECONDS - t_run)) s (deadline ${DEADLINE_S} s)"
    for row in "${ROWS[@]}"; do
      IFS='|' read -r name secs what <<<"$row"
      printf '  %-14s %5ss  %s\n' "$name" "$secs" "$what"
    done; } > "$OUT/gpu_check.txt"
  tar -czf "$WORK/logs.tar.gz" -C "$WORK" logs 2>/dev/null \
    && mv -f "$WORK/logs.tar.gz" "$OUT/gpu_check_logs.tar.gz"
}

left() { echo $((DEADLINE_S - REPORT_RESERVE_S - (SECONDS - t_run))); }

# step [--has-fallback] NAME LIMIT_S COMMAND...: runs COMMAND under timeout (LIMIT_S capped
# to what is left of the deadline), output to $LOGS/NAME.log. A failure stops the run
# (unless --keep-going), except for a step with a fallback, which only reports.
step() {
  local fallback=0
  [[ "$1" == --has-fallback ]] && { fallback=1; shift; }
  local name="$1" limit=$(($2 * LIMIT_SCALE)); shift 2
  local t0=$SECONDS rc verdict remaining
  remaining=$(left)
  printf '== %-14s ' "$name"
  if (( remaining < 5 )); then
    verdict="SKIPPED: deadline (${DEADLINE_S} s) reached"
    printf '%-6s %s\n' "0s" "$verdict"
    ROWS+=("$name|0|$verdict"); STATUS=1; write_partial running
    return 125
  fi
  (( limit > remaining )) && limit=$remaining
  # In the background with `wait`, so that the TERM trap runs at once (bash defers traps
  # while a foreground command runs). timeout puts the command in its own process group.
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1 &
  CUR_PID=$!; CUR_STEP="$name"; CUR_T0=$t0
  wait "$CUR_PID"
  rc=$?
  CUR_PID=""; CUR_STEP=""
  local took=$((SECONDS - t0))
  case $rc in
    0) verdict="passed" ;;
    3) verdict="FAILED: forced collective paths not taken (FLASHCOMM_DEBUG_FORCE_COLLECTIVES" ;
       verdict+=" not honoured by this library)" ;;
    124|137) verdict="FAILED: timed out after ${limit}s" ;;
    *) verdict="FAILED (exit $rc)" ;;
  esac
  (( rc != 0 && fallback )) && verdict+=", trying the fallback"
  printf '%-6s %s\n' "${took}s" "$verdict"
  ROWS+=("$name|$took|$verdict")
  if (( rc != 0 )); then
    echo "---- end of $LOGS/$name.log ----"
    tail -n 60 "$LOGS/$name.log"
    echo "----"
    (( fallback )) || STATUS=1
  fi
  write_partial running
  if (( rc != 0 && ! fallback && ! KEEP_GOING )); then
    STOPPED="stopped after $name (no --keep-going)"; finish
  fi
  return $rc
}

# finish: the full report (gpu_check.py report merges the step JSONs and run.json; it gets
# what is left of the reserve), the summary, exit. Never interrupted by a second signal.
finish() {
  trap '' TERM INT
  local verdict; verdict="$( ((STATUS == 0)) && echo passed || echo FAILED)"
  [[ -n "$STOPPED" ]] && verdict+=" ($STOPPED)"
  write_partial "$verdict"
  local budget=$((DEADLINE_S - (SECONDS - t_run) - 5))
  (( budget > 30 )) && budget=30
  (( budget < 10 )) && budget=10
  if [[ -f "$LOGS/env.json" || -f "$LOGS/run.json" ]]; then
    timeout -k 3 "$budget" "$PY" scripts/gpu_check.py report "${COMMON[@]}" \
      > "$LOGS/report.log" 2>&1 && cp "$LOGS/gpu_check.json" "$LOGS/gpu_check.txt" "$OUT/" \
      || echo "gpu_check: the report step failed (see report.log in the tarball);" \
              "gpu_check.json / .txt hold the step table only"
    rm -f "$LOGS/gpu_check.json" "$LOGS/gpu_check.txt"
    tar -czf "$WORK/logs.tar.gz" -C "$WORK" logs 2>/dev/null \
      && mv -f "$WORK/logs.tar.gz" "$OUT/gpu_check_logs.tar.gz"
    [[ -f "$OUT/gpu_check.txt" ]] && sed -n '/^GEMM\|^W8A8\|^Pipelined/,$p' "$OUT/gpu_check.txt"
  fi
  echo "== summary ($MODE; $((SECONDS - t_run)) s of ${DEADLINE_S} s; in $OUT:" \
    "$(cd "$OUT" && ls gpu_check.json gpu_check.txt gpu_check_logs.tar.gz 2>/dev/null | paste -sd' ');" \
    "work dir $WORK)"
  local row name secs what
  for row in "${ROWS[@]}"; do
    IFS='|' read -r name secs what <<<"$row"
    printf '  %-14s %5ss  %s\n' "$name" "$secs" "$what"
  done
  echo "gpu_check: $verdict"
  exit $STATUS
}

# SIGTERM / SIGINT (the machine's command limit, ^C): kill the running step's process
# group, record it, write the report.
on_signal() {
  trap '' TERM INT
  local sig="$1"
  if [[ -n "$CUR_PID" ]]; then
    kill -TERM -- "-$CUR_PID" 2>/dev/null || kill -TERM "$CUR_PID" 2>/dev/null
    local i
    for i in 1 2 3 4 5 6; do kill -0 "$CUR_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$CUR_PID" 2>/dev/null
    ROWS+=("$CUR_STEP|$((SECONDS - CUR_T0))|FAILED: killed by SIG$sig")
    echo; echo "gpu_check: SIG$sig: killed step $CUR_STEP"
  fi
  STATUS=1; STOPPED="SIG$sig"
  finish
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

# build_cmake DIR [CMAKE ARGS...]: configure + build the library into DIR.
build_cmake() {
  local dir="$1" prefix generator=(); shift
  prefix="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" || return 1
  command -v ninja >/dev/null && generator=(-G Ninja)
  echo "cmake configure against torch at $prefix (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}," \
    "CUDA_PATH=${CUDA_PATH:-}, nvcc $(command -v nvcc || echo none))"
  cmake --version | head -1
  cmake -S . -B "$dir" "${generator[@]}" --no-warn-unused-cli -DCMAKE_BUILD_TYPE=Release \
    -DFLASHCOMM_BUILD_TESTS=OFF -DCMAKE_PREFIX_PATH="$prefix" \
    -DPython_EXECUTABLE="$(command -v "$PY")" "$@" || return 1
  cmake --build "$dir" -j "$JOBS" || return 1
  test -f "$dir/libflashcomm_ops.so"
}
export -f build_cmake
export PY JOBS

echo "gpu_check: $MODE with $PY, output in $OUT, logs in $LOGS, deadline ${DEADLINE_S} s"

step env 60 "$PY" scripts/gpu_check.py env "${COMMON[@]}"
sed '/^$/d; /^env: /d; s/^/   /' "$LOGS/env.log" | head -24

# --- build: CMake, and its fallback (same CMakeLists.txt, torch located through Python) ----
FALLBACK=(-DFLASHCOMM_TORCH_FROM_PYTHON=ON)
LIB=""
if step --has-fallback build 300 bash -c 'build_cmake "$@"' build_cmake "$BUILD_DIR" \
     "${LAUNCHER[@]}"; then
  LIB="$ROOT/$BUILD_DIR/libflashcomm_ops.so"
  if (( DRY )); then  # rehearse the fallback the GPU run takes when CMake fails
    step build-fallback 300 bash -c 'build_cmake "$@"' build_cmake "$BUILD_DIR-fallback" \
      "${LAUNCHER[@]}" "${FALLBACK[@]}"
    step probe-fallback 120 env FLASHCOMM_LIB="$ROOT/$BUILD_DIR-fallback/libflashcomm_ops.so" \
      "$PY" scripts/gpu_check.py probe "${COMMON[@]}"
  fi
else
  step build-fallback 300 bash -c 'build_cmake "$@"' build_cmake "$BUILD_DIR-fallback" \
    "${LAUNCHER[@]}" "${FALLBACK[@]}" && LIB="$ROOT/$BUILD_DIR-fallback/libflashcomm_ops.so"
fi
if [[ -z "$LIB" ]]; then
  STATUS=1; STOPPED="no library: the build failed or was skipped"; finish
fi
export FLASHCOMM_LIB="$LIB"

# --- checks (forced collectives) and figures -------------------------------------------------
export FLASHCOMM_DEBUG_FORCE_COLLECTIVES=1
step probe 120 "$PY" scripts/gpu_check.py probe "${COMMON[@]}"
step checks 240 "$PY" scripts/gpu_check.py checks "${COMMON[@]}"
step opcheck 180 "$PY" scripts/gpu_check.py opcheck "${COMMON[@]}"
step graphs 150 "$PY" scripts/gpu_check.py graphs "${COMMON[@]}"
step compile 240 "$PY" scripts/gpu_check.py compile "${COMMON[@]}"
step bitwise-modes 120 "$PY" scripts/gpu_check.py bitwise-modes "${COMMON[@]}"
step bench-gemm 180 env FLASHCOMM_DEBUG_FORCE_COLLECTIVES=0 \
  "$PY" scripts/gpu_check.py bench-gemm "${COMMON[@]}" "${BENCH[@]}"
step bench-overlap 150 "$PY" scripts/gpu_check.py bench-overlap "${COMMON[@]}" "${BENCH[@]}"
finish
