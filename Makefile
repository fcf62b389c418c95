# nino_fast: `make demo` (the main job) and `make test` (the whole suite) are the two set-up commands.
# Both create or reuse .venv in the checkout; nothing is installed outside it except the CUDA check's venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.nino_fast-installed
CUDA_VENV ?= $(HOME)/.cache/nino_fast/venv-cu130
CUDA_TORCH ?= torch==2.14.1
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
TORCH_CUDA_ARCH_LIST ?= 9.0
DEMO_ARGS ?=

.PHONY: venv build test pytest ctest demo bench lint format cuda-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the build description or the C++/CUDA sources change; torch is installed first, pinned to
# the CPU build, so that the package's `torch>=2.4` requirement never pulls a CUDA build.
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*.h)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q "$(TORCH_CPU)"
	$(PIP) install -q --no-build-isolation -e '.[test,transformers,plot,demo]'
	touch $(STAMP)

venv: $(STAMP)

build: $(PY)
	$(PIP) install -q --no-build-isolation -e .
	touch $(STAMP)

# pytest exits 5 when it collects no test: that must fail, like any other non-zero status.
pytest: venv
	$(PY) -m pytest -q -p no:cacheprovider tests

ctest: venv
	cmake -S . -B build/cmake -G Ninja -DBUILD_TEST=ON -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > /dev/null
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure

test: pytest ctest

demo: venv
	$(PY) -m nino_fast.demo $(DEMO_ARGS)

bench: venv
	$(PY) -m bench.bench_ops
	$(PY) -m bench.bench_e2e

lint: venv
	$(PIP) install -q ruff
	$(VENV)/bin/ruff check nino_fast tests bench triton_kernels setup.py
	@if command -v clang-format > /dev/null; then clang-format --dry-run --Werror csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu 2> /dev/null || true; fi

format: venv
	$(VENV)/bin/ruff check --fix nino_fast tests bench triton_kernels setup.py

# Compile-only check of the CUDA extension against a CUDA build of torch, in a venv outside the checkout
# (recreated when missing). It never touches the CPU build in .venv.
cuda-check:
	@test -n "$(CUDA_HOME)" && test -x "$(CUDA_HOME)/bin/nvcc" || { echo "cuda-check: no CUDA toolkit (set CUDA_HOME)"; exit 1; }
	@test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	@$(CUDA_VENV)/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(CUDA_TORCH)'.split('==')[1])" 2> /dev/null \
	  || $(CUDA_VENV)/bin/pip install -q "$(CUDA_TORCH)" numpy ninja setuptools wheel
	rm -rf build/cu130
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" NINO_FAST_FORCE_CUDA=1 \
	  $(CUDA_VENV)/bin/python setup.py -q build_ext --build-temp build/cu130/tmp --build-lib build/cu130/lib
	@ls build/cu130/lib/nino_fast/_C*.so && echo "cuda-check: CUDA extension compiled"

clean:
	rm -rf build *.egg-info nino_fast/_C*.so
