#!/usr/bin/env bash
# The parts of a torch release's wheel that the checks against another torch need, cached:
#
#   scripts/fetch_torch_wheel.sh [TORCH_VERSION]     (default 2.11.0, the GPU image's torch)
#
# The wheel is downloaded once (pip download --no-deps, PyPI; 2.11.0 cp312 is a 507 MB
# CUDA 13 build) and deleted after extracting, into
#   ${FLASHCOMM_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/flashcomm}/torch-<version>/
#     include/      torch/include/** (62 MB): scripts/check_torch_compat.sh
#     share/cmake/  torch's CMake package config (Torch, Caffe2 with its CUDA detection)
#     lib/          empty stand-ins named as the wheel's lib/*.so, so that the CMake config,
#                   which checks its imported libraries exist, configures; nothing links them
#     WHEEL         the wheel's file name
# That directory is a torch install prefix for CMake configures only
# (scripts/check_cuda_cmake.sh). A cache from before share/ and lib/ were kept is
# refreshed. Progress goes to stderr; stdout is the cache directory, alone. Later runs
# need no network.
#
# Environment: PYTHON (default .venv/bin/python, else python3), DOWNLOAD_TIMEOUT_S
# (default 900).
set -euo pipefail
cd "$(dirname "$0")/.."
exec 3>&1 1>&2  # stdout: the cache directory only

TORCH_VERSION="${1:-2.11.0}"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
CACHE_ROOT="${FLASHCOMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flashcomm}"
CACHE="$CACHE_ROOT/torch-$TORCH_VERSION"
DOWNLOAD_TIMEOUT_S="${DOWNLOAD_TIMEOUT_S:-900}"

die() { echo "fetch-torch-wheel: FAILED: $*" >&2; exit 1; }

if [[ -f "$CACHE/include/torch/csrc/distributed/c10d/ProcessGroup.hpp" &&
      -f "$CACHE/share/cmake/Torch/TorchConfig.cmake" && -f "$CACHE/lib/libtorch.so" ]]; then
  echo "== torch $TORCH_VERSION: cached in $CACHE ($(cat "$CACHE/WHEEL" 2>/dev/null))"
  echo "$CACHE" >&3
  exit 0
fi
echo "== downloading torch==$TORCH_VERSION (no deps; timeout ${DOWNLOAD_TIMEOUT_S}s) into $CACHE"
mkdir -p "$CACHE_ROOT"
tmp="$(mktemp -d "$CACHE_ROOT/.download.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
# A cp312 wheel first (the GPU image's Python; the headers and the CMake config do not
# depend on the Python version), else one for this interpreter.
if ! timeout "$DOWNLOAD_TIMEOUT_S" "$PY" -m pip download --quiet --no-deps \
      --only-binary=:all: --implementation cp --python-version 3.12 \
      --platform manylinux_2_28_x86_64 --dest "$tmp" "torch==$TORCH_VERSION"; then
  echo "   no cp312 wheel (or the download failed); trying this Python's"
  rm -f "$tmp"/*.whl
  timeout "$DOWNLOAD_TIMEOUT_S" "$PY" -m pip download --quiet --no-deps \
    --only-binary=:all: --dest "$tmp" "torch==$TORCH_VERSION" \
    || die "pip download torch==$TORCH_VERSION failed or timed out after" \
           "${DOWNLOAD_TIMEOUT_S}s (network? /etc/xdg/pip constraints?)"
fi
wheel="$(ls "$tmp"/torch-*.whl 2>/dev/null | head -1)"
[[ -n "$wheel" ]] || die "pip download left no torch wheel in $tmp"
echo "   got $(basename "$wheel") ($(du -m "$wheel" | cut -f1) MB); extracting include/," \
  "share/cmake/ and the names of lib/*.so"
"$PY" - "$wheel" "$tmp/final" <<'PYEOF'
import sys, zipfile
from pathlib import Path

wheel, dest = sys.argv[1], Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    for tree in ("include", "share/cmake"):
        members = [m for m in names if m.startswith(f"torch/{tree}/") and not m.endswith("/")]
        if not members:
            sys.exit(f"{wheel} has no torch/{tree}/ tree")
        for m in members:
            target = dest / m[len("torch/"):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(m))
        print(f"   {tree}/: {len(members)} files")
    libs = [m for m in names if m.startswith("torch/lib/") and m.endswith(".so")
            and m.count("/") == 2]
    (dest / "lib").mkdir(parents=True, exist_ok=True)
    for m in libs:
        (dest / "lib" / Path(m).name).touch()
    print(f"   lib/: {len(libs)} empty stand-ins ({', '.join(Path(m).name for m in libs)})")
PYEOF
basename "$wheel" > "$tmp/final/WHEEL"
rm -rf "$CACHE"
mv "$tmp/final" "$CACHE"
echo "$CACHE" >&3
