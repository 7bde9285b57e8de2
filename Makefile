# flashcomm: `make test` and `make demo` work on a fresh machine (Debian 12,
# Python 3.11): each creates the venv, installs torch 2.13.0 and the system
# packages it needs, builds the extension and runs.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
TORCH  := torch==2.13.0
BUILD  := build/cmake
# Debian packages: GoogleTest for the C++ tests; gloo headers (declarations only)
# for the C++ API test that creates a gloo ProcessGroup in C++.
APT_PACKAGES := libgtest-dev libgloo-dev cmake ninja-build

.PHONY: all venv system-deps build test test-cpp test-python demo clean

all: build

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet $(TORCH)
	$(VPY) -m pip install --quiet "setuptools>=64" wheel "pytest>=8" "hypothesis>=6" numpy
	touch $@

venv: $(VENV)/.stamp

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

build: venv system-deps
	FLASHCOMM_BUILD_TESTS=1 FLASHCOMM_BUILD_DIR=$(BUILD) \
	  $(VPY) -m pip install --quiet --no-build-isolation --no-deps -e .

test-cpp: build
	ctest --test-dir $(BUILD) --output-on-failure

test-python: build
	$(VPY) -m pytest tests

test: test-cpp test-python

demo: build
	$(VPY) -m flashcomm demo

clean:
	rm -rf build $(VENV) python/flashcomm/*.so python/*.egg-info
