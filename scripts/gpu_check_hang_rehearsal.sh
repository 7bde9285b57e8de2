#!/usr/bin/env bash
# Rehearsal of a hang in scripts/gpu_check.sh (issue 23.2), on CPU: a step forced to hang
# (GPU_CHECK_DEBUG_HANG=<step>) must still leave the report, exactly three files in $OUT.
#
#   scripts/gpu_check_hang_rehearsal.sh
#
# A. The deadline: `env` hangs under GPU_CHECK_DEADLINE_S=50; the step is capped to what is
#    left (50 s less the 40 s kept for the report), times out, the rest is skipped.
# B. The command limit: `checks` hangs; once it runs the script gets SIGTERM (as the GPU
#    machine's tool sends at its 10-minute limit); the trap kills the step and writes the
#    report. The builds are incremental (run after `make gpu-check-dry-run`, they are done).
# Each run's output is checked: gpu_check.json (valid JSON naming the step's verdict),
# gpu_check.txt and gpu_check_logs.tar.gz (with the hung step's log), nothing else.
#
# Environment: PYTHON (as gpu_check.sh), HANG_REHEARSAL_DIR (default
# build/gpu-check-hang-rehearsal).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
DIR="${HANG_REHEARSAL_DIR:-$ROOT/build/gpu-check-hang-rehearsal}"
rm -rf "$DIR" && mkdir -p "$DIR"
t_start=$SECONDS
FAILED=0
fail() { echo "gpu-check-hang-rehearsal: FAILED: $*"; FAILED=1; }

# check_out NAME OUT_DIR EXPECTED_VERDICT_TEXT
check_out() {
  local name="$1" out="$2" want="$3"
  local files; files="$(cd "$out" && ls -A | paste -sd' ')"
  [[ "$files" == "gpu_check.json gpu_check.txt gpu_check_logs.tar.gz" ]] \
    || fail "$name: $out holds '$files', not the three report files"
  python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$out/gpu_check.json" \
    || fail "$name: gpu_check.json is not valid JSON"
  grep -q "$want" "$out/gpu_check.json" || fail "$name: gpu_check.json does not say '$want'"
  grep -q "$want" "$out/gpu_check.txt" || fail "$name: gpu_check.txt does not say '$want'"
  local listing; listing="$(tar -tzf "$out/gpu_check_logs.tar.gz")"  # (grep -q | would SIGPIPE tar)
  grep -qx "logs/$4.log" <<<"$listing" || fail "$name: the tarball has no logs/$4.log"
  echo "   $name: $files; $(grep -m1 "$want" "$out/gpu_check.txt" | sed 's/^ *//')"
}

echo "== A. 'env' hangs, deadline 50 s"
t0=$SECONDS
GPU_CHECK_DEBUG_HANG=env GPU_CHECK_DEADLINE_S=50 OUT="$DIR/a-out" GPU_CHECK_WORK="$DIR/a-work" \
  timeout 170 bash scripts/gpu_check.sh --dry-run --quick --keep-going > "$DIR/a.log" 2>&1
rc=$?
echo "   exit $rc after $((SECONDS - t0)) s"
(( rc == 1 )) || { fail "A: exit $rc, expected 1"; tail -30 "$DIR/a.log"; }
(( SECONDS - t0 <= 80 )) || fail "A: took $((SECONDS - t0)) s, beyond its 50 s deadline + report"
check_out A "$DIR/a-out" "timed out" env

echo "== B. 'checks' hangs, SIGTERM to the script once it runs"
t0=$SECONDS
GPU_CHECK_DEBUG_HANG=checks OUT="$DIR/b-out" GPU_CHECK_WORK="$DIR/b-work" \
  bash scripts/gpu_check.sh --dry-run --quick --keep-going > "$DIR/b.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do  # up to 5 minutes for env, the (incremental) builds and probes
  [[ -f "$DIR/b-work/logs/checks.log" ]] && grep -q "hangs" "$DIR/b-work/logs/checks.log" \
    2>/dev/null && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
if kill -0 "$pid" 2>/dev/null; then
  sleep 2; kill -TERM "$pid"
  # The trap has the report's budget (30 s) and the step's kill (3 s) to finish.
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && { fail "B: still running 50 s after SIGTERM"; kill -KILL "$pid"; }
fi
wait "$pid"; rc=$?
echo "   exit $rc after $((SECONDS - t0)) s"
(( rc == 1 )) || { fail "B: exit $rc, expected 1"; tail -30 "$DIR/b.log"; }
check_out B "$DIR/b-out" "killed by SIGTERM" checks
sleep 1
# The hung step (its command line names the work dir) must be gone with the script.
left="$(pgrep -f -- "--store-dir $DIR/b-work/" || true)"
[[ -z "$left" ]] || fail "B: the hung step is still running (pids $left)"

if (( FAILED )); then
  echo "gpu-check-hang-rehearsal: FAILED (logs: $DIR/a.log, $DIR/b.log)"; exit 1
fi
echo "gpu-check-hang-rehearsal: passed: a hung step still leaves the report, three files" \
  "($((SECONDS - t_start)) s)"
