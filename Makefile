# Every target sets up what it needs: a fresh clone runs `make demo` or `make test` directly.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIP_ARGS ?=  # e.g. --index-url https://download.pytorch.org/whl/cpu for PyTorch's CPU-only build

.PHONY: setup demo test test-slow bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)   # first: the package's torch range then keeps it
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)  ## the main job
	$(BIN)/iterhead search examples/search_small.yaml

test: $(STAMP)  ## unit and integration tests (what CI runs)
	$(BIN)/python -m pytest -m "not slow" -q --durations=15

test-slow: $(STAMP)  ## the slow tier too
	$(BIN)/python -m pytest -q

bench: $(STAMP)  ## rewrites BENCHMARKS.md: throughput first, then the sections appended to it
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/search_overhead.py
	$(BIN)/python benchmarks/store_stress.py
	$(BIN)/python benchmarks/seeds.py --threads 1
	$(BIN)/python benchmarks/precision.py --seeds 8
	$(BIN)/python benchmarks/bf16_eval.py
	$(BIN)/python benchmarks/eval_exit.py
	$(BIN)/python benchmarks/attention_layout.py
	$(BIN)/python benchmarks/optimizer_start.py

bench-gpu: $(STAMP)  ## on a machine with CUDA: the GPU's sections of BENCHMARKS.md only
	$(BIN)/python benchmarks/throughput.py --devices cuda --skip-process
	$(BIN)/python benchmarks/step_profile.py --device cuda
	$(BIN)/python benchmarks/precision_width.py --device cuda

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
