#!/usr/bin/env bash
# Compiles every C++ source of flashcomm against the headers of another torch release
# (default 2.11.0, the GPU image's torch) with -fsyntax-only and the real build's flags.
#
#   scripts/check_torch_compat.sh [TORCH_VERSION]
#
# Supported torch range: 2.11 through 2.13 (development and CI use 2.13.0; the GPU image
# has 2.11.0). CI no longer runs this: tests/test_packaging.py builds the whole library
# (every translation unit, each ISA copy, every header) against an installed torch 2.11.0;
# this script remains the quick check without a 3 GB torch install. Only the header tree is needed: scripts/fetch_torch_wheel.sh downloads the
# release's wheel once (pip download --no-deps; 2.11.0 cp312 is a 507 MB CUDA build) and
# keeps its include/ (62 MB) and CMake config in
#   ${FLASHCOMM_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/flashcomm}/torch-<version>/
# later runs reuse that tree and need no network.
#
# Flags: CMake configures the library against the installed torch (.venv) with
# CMAKE_EXPORT_COMPILE_COMMANDS=ON; each compile command of compile_commands.json (the
# library sources and the per-ISA copies of csrc/kernels/cpu/*_kernel.cpp, each with its
# CPU_CAPABILITY defines) is rerun with the installed torch's include dirs replaced by
# the downloaded ones, plus one translation unit that includes every header under
# include/ and csrc/ (flags of the library target). Any failure is listed by file and
# fails the script. A warning is printed, not fatal.
#
# Environment: PYTHON (default .venv/bin/python, else python3), COMPAT_BUILD_DIR (the
# CMake configure dir, default build/torch-compat), DOWNLOAD_TIMEOUT_S (default 900),
# COMPILE_TIMEOUT_S (per translation unit, default 300), JOBS (default nproc).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

TORCH_VERSION="${1:-2.11.0}"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
BUILD_DIR="${COMPAT_BUILD_DIR:-build/torch-compat}"
COMPILE_TIMEOUT_S="${COMPILE_TIMEOUT_S:-300}"
JOBS="${JOBS:-$(nproc)}"
t_start=$SECONDS

die() { echo "check-torch-compat: FAILED: $*" >&2; exit 1; }

# --- 1. the header tree of torch $TORCH_VERSION (cached) ------------------------------
CACHE="$(PYTHON="$PY" bash scripts/fetch_torch_wheel.sh "$TORCH_VERSION")" \
  || die "no torch $TORCH_VERSION headers (scripts/fetch_torch_wheel.sh)"
NEW_INCLUDE="$CACHE/include"
for v in torch/headeronly/version.h torch/csrc/api/include/torch/version.h; do
  if [[ -f "$NEW_INCLUDE/$v" ]]; then
    echo "   headers: $v says $(grep -h "define TORCH_VERSION_M[AI]" "$NEW_INCLUDE/$v" \
      | awk '{printf "%s=%s ", $2, $3}')"
    break
  fi
done

# --- 2. the real build's compile commands (configured against the installed torch) ---
echo "== configuring $BUILD_DIR against the installed torch (compile_commands.json)"
prefix="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
  || die "$PY cannot import torch (needed for the CMake configure)"
OLD_INCLUDE="$("$PY" -c \
  'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
mkdir -p "$BUILD_DIR"
if ! timeout 300 cmake -S . -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
      -DFLASHCOMM_BUILD_TESTS=OFF -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
      -DCMAKE_PREFIX_PATH="$prefix" > "$BUILD_DIR/configure.log" 2>&1; then
  cat "$BUILD_DIR/configure.log"; die "CMake configure failed"
fi

# One shell script per translation unit: the compile command with -fsyntax-only, the
# include dirs swapped, no output file.
JOBDIR="$BUILD_DIR/compat-$TORCH_VERSION"
rm -rf "$JOBDIR" && mkdir -p "$JOBDIR"
"$PY" - "$BUILD_DIR/compile_commands.json" "$OLD_INCLUDE" "$NEW_INCLUDE" "$JOBDIR" "$ROOT" <<'EOF'
import json, os, shlex, sys
from pathlib import Path

db_path, old_inc, new_inc, jobdir, root = sys.argv[1:]
entries = json.load(open(db_path))
root = Path(root)


def swapped(args):
    """The compile command's arguments for -fsyntax-only against new_inc."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "-o":
            skip = True
            continue
        if a in ("-c", "-MD", "-MMD") or a.startswith(("-MF", "-MT", "-MQ")):
            if a in ("-MF", "-MT", "-MQ"):
                skip = True
            continue
        out.append(a.replace(old_inc, new_inc))
    return out + ["-fsyntax-only"]


def args_of(e):
    return e["arguments"] if "arguments" in e else shlex.split(e["command"])


jobs, covered, lib_flags = [], set(), None
for e in entries:
    src = Path(e["file"]).resolve()
    rel = src.relative_to(root) if src.is_relative_to(root) else src
    if not str(rel).startswith(("csrc/", "include/")):
        continue
    args = swapped(args_of(e))
    covered.add(src)
    # Name the TU by source and its CPU_CAPABILITY (the ISA copies share a source).
    isa = next((a.split("=", 1)[1] for a in args if a.startswith("-DCPU_CAPABILITY=")), "")
    jobs.append((f"{rel}" + (f" [{isa}]" if isa else ""), e["directory"], args))
    if lib_flags is None and str(rel).startswith("csrc/ops/"):
        lib_flags = (e["directory"], args)
if lib_flags is None:
    sys.exit("compile_commands.json has no csrc/ops source: is this the flashcomm build?")

# Sources of csrc/ that the build does not compile are reported, not silently skipped.
for src in sorted((root / "csrc").rglob("*.cpp")):
    if src.resolve() not in covered:
        print(f"   note: {src.relative_to(root)} is not part of the build; compiled with "
              "the library's flags", file=sys.stderr)
        directory, args = lib_flags
        src_arg = next(a for a in args if a.endswith(".cpp"))
        jobs.append((f"{src.relative_to(root)} [not built]", directory,
                     [str(src) if a == src_arg else a for a in args]))

# Every header, in one translation unit: each is compiled against the new headers even
# where no source includes it yet (one TU: a TU per header would double the time).
directory, args = lib_flags
src_arg = next(a for a in args if a.endswith(".cpp"))
headers = sorted([*(root / "include").rglob("*.h"), *(root / "csrc").rglob("*.h")])
tu = Path(jobdir, "all_headers.cpp").resolve()
tu.write_text("".join(f'#include "{h}"\n' for h in headers))
# The ISA kernels' headers expect a CPU_CAPABILITY, as in their own translation units.
hargs = [str(tu) if a == src_arg else a for a in args]
hargs[1:1] = ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
jobs.append((f"{len(headers)} headers of include/ and csrc/ [all_headers.cpp]", directory, hargs))

for i, (name, directory, args) in enumerate(jobs):
    Path(jobdir, f"{i:03d}.sh").write_text(
        f"# {name}\ncd {shlex.quote(directory)} && exec {shlex.join(args)}\n")
    Path(jobdir, f"{i:03d}.name").write_text(name + "\n")
print(f"   {len(jobs)} translation units")
EOF

# --- 3. compile them all ---------------------------------------------------------------
echo "== compiling against torch $TORCH_VERSION headers (-fsyntax-only, $JOBS jobs," \
  "timeout ${COMPILE_TIMEOUT_S}s each)"
export COMPILE_TIMEOUT_S
ls "$JOBDIR"/*.sh | xargs -P "$JOBS" -I{} bash -c '
  job="{}"; base="${job%.sh}"
  if timeout "$COMPILE_TIMEOUT_S" bash "$job" > "$base.log" 2>&1; then
    echo ok > "$base.status"; echo "   ok    $(cat "$base.name")"
  else
    echo "FAILED (exit $?)" > "$base.status"; echo "   FAIL  $(cat "$base.name")"
  fi'

failed=()
warned=()
for status in "$JOBDIR"/*.status; do
  base="${status%.status}"
  if [[ "$(cat "$status")" != ok ]]; then failed+=("$base")
  elif grep -q "warning:" "$base.log"; then warned+=("$base"); fi
done
total=$(ls "$JOBDIR"/*.sh | wc -l)
[[ $(ls "$JOBDIR"/*.status | wc -l) == "$total" ]] || die "some compile jobs did not report"
for base in "${warned[@]}"; do
  echo "-- warnings in $(cat "$base.name"):"
  grep -A3 "warning:" "$base.log" | head -20
done
if (( ${#failed[@]} )); then
  for base in "${failed[@]}"; do
    echo "-- $(cat "$base.name"): $(cat "$base.status")"
    grep -m1 -B2 -A12 "error" "$base.log" || tail -30 "$base.log"
  done
  echo "check-torch-compat: FAILED: ${#failed[@]} of $total translation units do not compile" \
    "against torch $TORCH_VERSION:"
  for base in "${failed[@]}"; do echo "   $(cat "$base.name")"; done
  echo "(logs: $JOBDIR/*.log; $((SECONDS - t_start)) s)"
  exit 1
fi
echo "check-torch-compat: passed: all $total translation units compile against torch" \
  "$TORCH_VERSION headers ($((SECONDS - t_start)) s)"
