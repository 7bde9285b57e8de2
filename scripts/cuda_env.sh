# Sourced by scripts/gpu_check.sh (the GPU run) and scripts/check_cuda_cmake.sh (its CPU
# rehearsal), so that both set up CUDA the same way.
#
# cuda_env: the CUDA toolkit for CMake. torch's CMake config runs FindCUDA, which takes the
# toolkit root from the nvcc first on PATH unless CUDA_PATH names it: a wrapper outside the
# toolkit (/usr/local/bin/nvcc exec'ing the real one) gives /usr/local, where neither the
# CUDA headers nor cudart are ("Your installed Caffe2 version uses CUDA but I cannot find
# the CUDA libraries"). So whenever a toolkit exists (CUDA_PATH, CUDA_HOME or
# /usr/local/cuda, the first with bin/nvcc) its bin/ goes first on PATH and CUDA_PATH and
# CUDACXX are exported. Returns 1 (changing nothing) where there is none.
cuda_env() {
  local root
  for root in "${CUDA_PATH:-}" "${CUDA_HOME:-}" /usr/local/cuda; do
    [[ -n "$root" && -x "$root/bin/nvcc" ]] || continue
    export CUDA_PATH="$root" CUDACXX="$root/bin/nvcc" PATH="$root/bin:$PATH"
    return 0
  done
  return 1
}
