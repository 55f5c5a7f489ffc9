# The two commands of the README: `make demo` and `make test`. Each bootstraps .venv from nothing but
# Python, make and a C++ compiler, and reinstalls the package only when its sources changed.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Everything the compiled build depends on; the install is redone when this hash changes.
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) 2>/dev/null | sort)
BUILD_HASH := $(shell cat $(BUILD_INPUTS) 2>/dev/null | sha256sum | cut -c1-16)

.PHONY: install demo test bench bench-compare bench-baseline check-gpu-compile lint clean check-cuda ctest gpu-check
.DEFAULT_GOAL := test

$(VENV)/.stamp-venv:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	touch $@

install: $(VENV)/.stamp-venv
	@if [ "$$(cat $(VENV)/.stamp-install 2>/dev/null)" != "$(BUILD_HASH)" ]; then \
		echo "installing ttfm_kernels (build inputs changed: $(BUILD_HASH))"; \
		$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]' && echo "$(BUILD_HASH)" > $(VENV)/.stamp-install; \
	fi

demo: install
	$(VENV)/bin/ttfm demo

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest tests --durations=15 $(PYTEST_ARGS)

BENCH_THRESHOLD ?= 0.25

bench: install
	$(PY) -m pytest benchmarks --benchmark-json=benchmarks/results.json

# Fails when a median grew by more than BENCH_THRESHOLD against the committed baseline of this CPU.
bench-compare: bench
	$(PY) -m benchmarks.compare benchmarks/results.json benchmarks/baseline-cpu.json --threshold $(BENCH_THRESHOLD)

# Writes this run's cases into the baseline (other cases are kept): run it on the baseline machine only.
bench-baseline: bench
	$(PY) -m benchmarks.compare benchmarks/results.json benchmarks/baseline-cpu.json --update

# Compiles every registered Triton configuration for sm_80 and sm_90 (no GPU needed); report in gate-reports/.
check-gpu-compile: install
	TRITON_INTERPRET=0 $(PY) -m ttfm_kernels._gpu_gate --report gate-reports/gpu-compile.txt

# `make gpu-check [STAGES=build,parity,bench]`: on a machine with a CUDA device, with the Python found there
# (PYTHON, no venv, nothing downloaded): build the extensions in place for this GPU's arch, run the GPU parity
# tests (tests/gpu) and the GPU benchmarks; report.md, report.json and logs go to GPU_REPORT_DIR ($$OUT when set).
# Without a CUDA device it stops at once with "no CUDA device" (exit 2). See scripts/gpu_check.py.
STAGES ?= build,parity,bench
GPU_REPORT_DIR ?= $(if $(OUT),$(OUT),gpu-report)
GPU_DEADLINE ?= 330

gpu-check:
	GPU_REPORT_DIR="$(GPU_REPORT_DIR)" $(PYTHON) scripts/gpu_check.py --stages "$(STAGES)" --deadline $(GPU_DEADLINE)

lint: install
	$(PY) -m ruff check .

# `make check-cuda`: compile csrc/cuda/*.cu for sm_80 and sm_90a in ONE build against the CUDA build of torch
# (in its own venv; no GPU needed), then load every built extension there (undefined symbols, duplicate
# registrations). CUDA_HOME must be the toolkit root holding the real bin/nvcc: torch's guess follows the
# /usr/local/bin/nvcc wrapper to /usr/local. The pip CUDA headers (nvidia/cu13/include) come from setup.py.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_HOME ?= /usr/local/cuda
CUDA_ARCHS ?= 8.0;9.0a
CUDA_BUILD := build/check-cuda
CPY := $(CUDA_VENV)/bin/python

$(CUDA_VENV)/.stamp-venv:
	$(PYTHON) -m venv $(CUDA_VENV)
	$(CPY) -m pip install --quiet "$(CUDA_TORCH_SPEC)" ninja setuptools
	touch $@

check-cuda: $(CUDA_VENV)/.stamp-venv
	@start=$$(date +%s); rm -rf $(CUDA_BUILD)/lib; mkdir -p gate-reports; \
	echo "check-cuda: building csrc/cuda/*.cu for $(CUDA_ARCHS) (log: gate-reports/check-cuda-build.log)"; \
	CUDA_HOME="$(CUDA_HOME)" TTFM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" TTFM_NVCC_FLAGS=--resource-usage \
		$(CPY) setup.py --quiet build_ext --build-lib $(CUDA_BUILD)/lib --build-temp $(CUDA_BUILD)/temp \
		> gate-reports/check-cuda-build.log 2>&1 \
		|| { tail -n 60 gate-reports/check-cuda-build.log; exit 1; }; \
	grep -E "ptxas info *: (Compiling|Used|Function properties)|spill" gate-reports/check-cuda-build.log \
		> gate-reports/cuda-resource-usage.txt; \
	if grep -qE "[1-9][0-9]* bytes spill (stores|loads)" gate-reports/cuda-resource-usage.txt; then \
		echo "check-cuda: a CUDA kernel spills registers (gate-reports/cuda-resource-usage.txt)"; exit 1; fi; \
	$(CPY) csrc/tests/check_cuda_import.py $(CUDA_BUILD)/lib \
	&& echo "check-cuda: passed in $$(( $$(date +%s) - start )) s (archs $(CUDA_ARCHS); registers and spills per" \
		"kernel in gate-reports/cuda-resource-usage.txt)"

# C++ tests of the shared host/device headers (csrc/tests), no libtorch: seconds.
ctest:
	cmake -S . -B build/ctest -DCMAKE_BUILD_TYPE=Release > /dev/null
	cmake --build build/ctest -j 2
	ctest --test-dir build/ctest --output-on-failure

clean:
	rm -rf build ttfm_kernels/*.so $(VENV)/.stamp-install
