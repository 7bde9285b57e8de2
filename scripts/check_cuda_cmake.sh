#!/usr/bin/env bash
# CPU rehearsal of the GPU check's CMake configure against a CUDA torch (issue 23.1):
# torch 2.11.0's CMake config (the GPU image's torch, a CUDA 13 build; from the wheel that
# scripts/fetch_torch_wheel.sh caches for `make check-torch-compat`) with the machine's CUDA
# toolkit as the GPU image has it:
#   * the nvcc first on PATH is a wrapper outside the toolkit (here: one written into the
#     work dir, exec'ing the toolkit's), the toolkit's bin/ is not on PATH, and neither
#     CUDA_PATH nor CUDA_HOME is set;
#   * the toolkit has no libnvrtc.so (the script says when this one has: then that half is
#     not rehearsed).
#
#   scripts/check_cuda_cmake.sh [TORCH_VERSION]
#
# 1. Without scripts/cuda_env.sh: expected to fail as on the GPU image (FindCUDA misses the
#    headers and cudart); it is reported, not fatal, either way.
# 2. With cuda_env (what scripts/gpu_check.sh does on the GPU): CMake must configure and
#    generate, with TORCH_CUDA_ARCH_LIST=9.0 and the GPU check's options, or this fails.
# Nothing is compiled (the torch libraries are empty stand-ins; `make check-torch-compat`
# compiles the sources against torch 2.11's headers).
#
# Environment: PYTHON (for scripts/fetch_torch_wheel.sh), CUDA_TOOLKIT
# (default /usr/local/cuda), CUDA_CMAKE_BUILD_DIR (default build/cuda-cmake-rehearsal).
# Without a CUDA toolkit (bin/nvcc) the rehearsal cannot run: it says so and fails, unless
# CUDA_CMAKE_ALLOW_SKIP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

TORCH_VERSION="${1:-2.11.0}"
TOOLKIT="${CUDA_TOOLKIT:-/usr/local/cuda}"
BUILD_DIR="${CUDA_CMAKE_BUILD_DIR:-build/cuda-cmake-rehearsal}"
t_start=$SECONDS
die() { echo "check-cuda-cmake: FAILED: $*" >&2; exit 1; }

if [[ ! -x "$TOOLKIT/bin/nvcc" ]]; then
  msg="no CUDA toolkit at $TOOLKIT (bin/nvcc); set CUDA_TOOLKIT"
  [[ "${CUDA_CMAKE_ALLOW_SKIP:-0}" == 1 ]] && { echo "check-cuda-cmake: SKIPPED: $msg"; exit 0; }
  die "$msg (CUDA_CMAKE_ALLOW_SKIP=1 skips)"
fi
TOOLKIT="$(cd "$TOOLKIT" && pwd)"
CACHE="$(bash scripts/fetch_torch_wheel.sh "$TORCH_VERSION")" \
  || die "no torch $TORCH_VERSION CMake config (scripts/fetch_torch_wheel.sh)"
echo "== torch $TORCH_VERSION CMake config: $CACHE/share/cmake ($(cat "$CACHE/WHEEL"))"
echo "   CUDA toolkit $TOOLKIT: $("$TOOLKIT/bin/nvcc" --version | grep -o 'release [0-9.]*')"
nvrtc="$(ls "$TOOLKIT"/lib*/libnvrtc* "$TOOLKIT"/targets/*/lib/libnvrtc* 2>/dev/null || true)"
if [[ -n "$nvrtc" ]]; then
  echo "   note: this toolkit has libnvrtc ($nvrtc): the missing-nvrtc half is not rehearsed"
else
  echo "   libnvrtc: none in the toolkit (as on the GPU image)"
fi
echo "   $(cmake --version | head -1)"

# The GPU image's PATH: a wrapper nvcc first, no toolkit bin/, no CUDA_PATH / CUDA_HOME.
WORK="$ROOT/$BUILD_DIR"
rm -rf "$WORK" && mkdir -p "$WORK/wrapper-bin"
printf '#!/bin/sh\nexec "%s/bin/nvcc" "$@"\n' "$TOOLKIT" > "$WORK/wrapper-bin/nvcc"
chmod +x "$WORK/wrapper-bin/nvcc"
clean_path="$(tr ':' '\n' <<<"$PATH" | grep -vx -e "$TOOLKIT/bin" -e "$(readlink -f "$TOOLKIT")/bin" \
  | paste -sd:)"
generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
# The GPU check's CMake options (scripts/gpu_check.sh, build_cmake), against torch $TORCH_VERSION.
cmake_args=(-S . "${generator[@]}" --no-warn-unused-cli -DCMAKE_BUILD_TYPE=Release
            -DFLASHCOMM_BUILD_TESTS=OFF -DCMAKE_PREFIX_PATH="$CACHE/share/cmake")
run_env=(env -u CUDA_PATH -u CUDA_HOME -u CUDACXX PATH="$WORK/wrapper-bin:$clean_path"
         TORCH_CUDA_ARCH_LIST=9.0)

echo "== 1. configure without cuda_env (the nvcc on PATH is $WORK/wrapper-bin/nvcc)"
if "${run_env[@]}" cmake "${cmake_args[@]}" -B "$WORK/without" > "$WORK/without.log" 2>&1; then
  echo "   configured: this setup does not reproduce the GPU image's failure ($WORK/without.log)"
else
  echo "   failed, as on the GPU image: $(grep -m1 -A1 -E 'CMake Error|Could NOT find CUDA' \
    "$WORK/without.log" | tr -s ' \n' ' ')"
fi

echo "== 2. configure with scripts/cuda_env.sh (as scripts/gpu_check.sh on the GPU)"
if ! "${run_env[@]}" bash -c 'source scripts/cuda_env.sh && cuda_env || exit 9
       echo "   cuda_env: CUDA_PATH=$CUDA_PATH, nvcc $(command -v nvcc)"
       exec "$@"' cuda_env cmake "${cmake_args[@]}" -B "$WORK/with" > "$WORK/with.log" 2>&1; then
  cat "$WORK/with.log"
  die "CMake does not configure against torch $TORCH_VERSION's CUDA config ($WORK/with.log)"
fi
grep -E "cuda_env:|PyTorch: CUDA detected|Found CUDAToolkit|CUDA compiler identification" \
  "$WORK/with.log" | sed 's/^/   /'
[[ -f "$WORK/with/build.ninja" || -f "$WORK/with/Makefile" ]] || die "no build files generated"
if grep -rlq NOTFOUND "$WORK/with/build.ninja" "$WORK/with/CMakeFiles"/*.dir/link.txt 2>/dev/null
then die "a NOTFOUND library reaches the build files of $WORK/with"; fi
echo "check-cuda-cmake: passed: CMake configures against torch $TORCH_VERSION (CUDA) with a" \
  "wrapper nvcc$([[ -z "$nvrtc" ]] && echo " and no libnvrtc") ($((SECONDS - t_start)) s)"
