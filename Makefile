# Two commands do all the set-up on a fresh machine:  make demo  /  make test
# Each creates .venv and installs everything it needs when missing (network: the package registries only).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the pair that lies on disk here (torchvision is needed by avalanche-lib)
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: test demo demo-core bench-core startup wheel lint clean

$(VENV)/.installed: pyproject.toml setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev,continual,rl]"
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev,continual,rl,bench]" $(TORCH_PINS)
	touch $@

# the test suite (slow benchmarks excluded; each has a seconds-long smoke test in the default run)
test: $(VENV)/.installed
	$(PY) -m pytest -q

# the main job: expert growth against Avalanche's Naive and Replay on split digits (class-incremental,
# 3 seeds, about 2 minutes): prints the table, writes JSON and accuracy-matrix plots under outputs/demo/
demo: $(VENV)/.installed
	$(VENV)/bin/moeparadigms bench continual --demo --out outputs/demo/continual_demo.json --plots outputs/demo/plots

# the core benchmark's short form (dense, naive loop, DeepSpeed, Mixtral, st-moe-pytorch side by side)
demo-core: $(VENV)/.installed-bench
	$(VENV)/bin/moeparadigms bench core --demo --out outputs/demo/core_demo.json

# the full core benchmark (about 20-30 minutes on 2 cores)
bench-core: $(VENV)/.installed-bench
	$(PY) scripts/bench_core.py --out benchmarks/results/core_cpu.json

# start-up times of `moeparadigms --help` and the package imports (median of 7 fresh processes each)
startup: $(VENV)/.installed
	$(PY) scripts/measure_startup.py --out benchmarks/results/startup.json

# the wheel (with the recipes: tasks/, configs/, scripts/bench_*.py as moeparadigms/_recipes) in dist/
wheel: $(VENV)/.installed
	$(PY) -m pip wheel --no-deps --no-build-isolation -w dist .

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check moeparadigms tests scripts

clean:
	rm -rf $(VENV) build dist
