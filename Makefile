# nino_fast: `make demo` (the main job) and `make test` (the whole suite) are the two set-up commands.
# Both create or reuse .venv in the checkout; nothing is installed outside it except the CUDA check's venv.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# ninja (and ruff, clang-format) from the venv even when it is not activated; without ninja on PATH torch's
# BuildExtension silently falls back to a slow serial build.
WITH_VENV := PATH="$(abspath $(VENV))/bin:$$PATH"
TORCH_CPU ?= torch==2.13.0
EXTRAS ?= test,transformers,plot,demo,triton
STAMP := $(VENV)/.nino_fast-installed
EXT_STAMP := build/.nino_fast-ext
# The CPU build compiles these; a change rebuilds the extension (ninja: only what changed) before tests.
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h)
PY_SRC := nino_fast tests bench triton_kernels setup.py
CLANG_SRC = $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

CUDA_VENV ?= $(HOME)/.cache/nino_fast/venv-cu130
CUDA_TORCH ?= torch==2.14.1
# The toolkit root (the directory holding bin/nvcc); /usr/local/bin/nvcc is only a wrapper, so /usr/local is no root.
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(firstword $(wildcard /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc)))
TORCH_CUDA_ARCH_LIST ?= 9.0
CUDA_BUILD ?= build/cu130
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv build test pytest pytest-triton ctest demo bench bench-quick lint format cuda-check clean distclean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the package description changes. torch is installed first, pinned to the CPU build, and pinned
# again as a constraint, so that the package's `torch>=2.4` can never pull a CUDA build into this venv.
$(STAMP): $(PY) pyproject.toml setup.py
	$(PIP) install -q "setuptools>=64" wheel ninja
	$(PIP) install -q "$(TORCH_CPU)"
	echo "$(TORCH_CPU)" > $(VENV)/torch-constraint.txt
	$(WITH_VENV) $(PIP) install -q -c $(VENV)/torch-constraint.txt --no-build-isolation -e '.[$(EXTRAS)]'
	mkdir -p build && touch $(EXT_STAMP) $(STAMP)

venv: $(STAMP)

# Incremental rebuild of nino_fast/_C*.so in place (what the editable install imports). --force: setuptools'
# own staleness check ignores headers; ninja decides what really needs compiling.
$(EXT_STAMP): $(STAMP) $(CSRC)
	$(WITH_VENV) $(PY) setup.py -q build_ext --inplace --force
	touch $(EXT_STAMP)

build: $(STAMP)
	$(WITH_VENV) $(PY) setup.py -q build_ext --inplace --force
	touch $(EXT_STAMP)

# pytest's exit status 5 (no test collected) fails this recipe like any other non-zero status.
pytest: $(EXT_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

# The Triton kernels on CPU tensors through Triton's interpreter (small shapes; the GPU runs them all).
pytest-triton: $(EXT_STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_kernels.py tests/test_feat_index.py -k "triton or Triton" $(PYTEST_ARGS)

# The kernels' AVX2 path, built here without AVX-512 (the pytest suite runs the AVX-512 one where the CPU has it).
ctest: $(STAMP)
	NINO_FAST_NO_AVX512=1 cmake -S . -B build/cmake -G Ninja -DBUILD_TEST=ON -DNINO_FAST_PYTHON="$(abspath $(PY))" > /dev/null
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure

test: pytest pytest-triton ctest

demo: $(EXT_STAMP)
	$(PY) -m nino_fast.demo $(DEMO_ARGS)

# What the benchmarks import beyond the package: pyproject's `bench` extra (torch_geometric for the PyG rows,
# matplotlib for the figures), installed under the torch constraint like $(STAMP), without reinstalling the
# package itself (that would rebuild the extension).
BENCH_STAMP := $(VENV)/.nino_fast-bench
BENCH_REQS = $(PY) -c "import re; t = open('pyproject.toml').read(); \
  print(*re.findall(r'\"([^\"]+)\"', re.search(r'^bench = \[(.*)\]', t, re.M).group(1)))"
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PIP) install -q -c $(VENV)/torch-constraint.txt $$($(BENCH_REQS))
	touch $(BENCH_STAMP)

# The full per-op and training-step table (rows appended to bench/results/results.csv), then RESULTS.md's generated
# section and the figures from it.
bench: $(EXT_STAMP) $(BENCH_STAMP)
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.report
	$(PY) -m bench.plot

# Every benchmark at small sizes (a few minutes): the runner's table at E = 1e4, then each other bench script at
# its smallest setting; nothing under bench/results is written (build/bench/ instead).
bench-quick: $(EXT_STAMP) $(BENCH_STAMP)
	$(PY) -m bench --quick $(BENCH_ARGS)

# The formatters are pinned (another version formats differently) and run from the venv they were just installed
# into (a $(wildcard ...) of them would be expanded before the install, and skip the C++ on a fresh clone).
LINTERS = "ruff==0.17.6" "clang-format==23.1.5"

lint: $(STAMP)
	$(PIP) install -q $(LINTERS)
	$(VENV)/bin/ruff check $(PY_SRC)
	$(VENV)/bin/ruff format --check $(PY_SRC)
	$(VENV)/bin/clang-format --dry-run --Werror $(CLANG_SRC)

format: $(STAMP)
	$(PIP) install -q $(LINTERS)
	$(VENV)/bin/ruff check --fix $(PY_SRC)
	$(VENV)/bin/ruff format $(PY_SRC)
	$(VENV)/bin/clang-format -i $(CLANG_SRC)

# Compile-only check of the CUDA extension against a CUDA build of torch, in a venv outside the checkout
# (created when missing; the first torch install takes minutes). The result goes to $(CUDA_BUILD)/lib: the CPU
# build's nino_fast/_C*.so is not touched. Then the built library is loaded (no GPU needed) to check that its
# CUDA kernels registered.
cuda-check:
	@if [ -z "$(CUDA_HOME)" ] || [ ! -x "$(CUDA_HOME)/bin/nvcc" ]; then \
	  echo "cuda-check: no CUDA toolkit found (set CUDA_HOME to the directory holding bin/nvcc)"; exit 1; fi
	@[ -x $(CUDA_VENV)/bin/python ] || $(PYTHON) -m venv $(CUDA_VENV)
	@$(CUDA_VENV)/bin/python -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(CUDA_TORCH)'.split('==')[1] or torch.version.cuda is None)" 2> /dev/null \
	  || { echo "cuda-check: installing $(CUDA_TORCH) into $(CUDA_VENV)"; time $(CUDA_VENV)/bin/python -m pip install -q "$(CUDA_TORCH)" numpy ninja setuptools wheel; }
	PATH="$(CUDA_VENV)/bin:$$PATH" CUDA_HOME="$(CUDA_HOME)" TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)" \
	  NINO_FAST_FORCE_CUDA=1 $(CUDA_VENV)/bin/python setup.py -q build_ext --force \
	  --build-temp $(CUDA_BUILD)/tmp --build-lib $(CUDA_BUILD)/lib
	$(CUDA_VENV)/bin/python -c "import glob, torch; \
	  so = glob.glob('$(CUDA_BUILD)/lib/nino_fast/_C*.so'); assert len(so) == 1, so; torch.ops.load_library(so[0]); \
	  assert torch.ops.nino_fast._cuda_compiled(), 'built without CUDA kernels'; \
	  assert torch._C._dispatch_has_kernel_for_dispatch_key('nino_fast::segment_mean_csr', 'CUDA'); \
	  print('cuda-check: OK,', so[0], 'has CUDA kernels (torch', torch.__version__ + ', arch $(TORCH_CUDA_ARCH_LIST))')"

clean:
	rm -rf build *.egg-info nino_fast/_C*.so

distclean: clean
	rm -rf $(VENV)
