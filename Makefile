# Set-up and everyday jobs. `make demo` runs the main job; `make test` passes the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MULTI30K_DIR ?= $(if $(wildcard ../shared/data/multi30k/train.de.gz),../shared/data/multi30k,)
export MULTI30K_DIR

.PHONY: install data test demo bench lint clean

install: $(VENV)/.installed

# torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

data: install
	$(BIN)/mt data multi30k data/multi30k

test: install data
	$(BIN)/python -m pytest -q tests

demo: install data
	$(BIN)/mt train configs/tiny.yaml -o runs/demo

bench: install data
	@echo "no benchmarks yet"

lint: install
	$(BIN)/python -m compileall -q mt tests scripts

clean:
	rm -rf runs .pytest_cache
