# Set-up and everyday jobs. `make demo` runs the main job; `make test` passes the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A local copy of Multi30k when one exists (../shared/data/multi30k first); otherwise `mt data` downloads it.
MULTI30K_CANDIDATES := ../shared/data/multi30k ../../shared/data/multi30k /work/shared/data/multi30k
MULTI30K_DIR ?= $(firstword $(foreach d,$(MULTI30K_CANDIDATES),$(if $(wildcard $(d)/train.de.gz),$(d),)))
export MULTI30K_DIR

.PHONY: install data test demo recipe bench bench-data lint clean

install: $(VENV)/.installed

# torch==2.13.0 first: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,export,plot]'
	touch $@

data: install
	$(BIN)/mt data multi30k data/multi30k

test: install data
	$(BIN)/python -m pytest -q tests

DEMO_CONFIG ?= configs/multi30k_de_en.yaml
DEMO_TIME ?= 10m
DEMO_RUN ?= runs/demo
TEST_SRC := data/multi30k/test_2016_flickr.de.gz
TEST_REF := data/multi30k/test_2016_flickr.en.gz

# data -> tokenizer -> training (a DEMO_TIME budget) -> translate test_2016_flickr -> BLEU/chrF with signatures
demo: install data
	test -f $(DEMO_RUN)/checkpoints/last.pt || $(BIN)/mt train $(DEMO_CONFIG) -o $(DEMO_RUN) train.max_time=$(DEMO_TIME)
	zcat $(TEST_SRC) | $(BIN)/mt translate -m $(DEMO_RUN) > $(DEMO_RUN)/test_2016_flickr.hyp.en
	$(BIN)/mt eval -r $(TEST_REF) -s $(DEMO_RUN)/test_2016_flickr.hyp.en --metrics bleu,chrf

# the full recipe (both directions, under an hour each on 2 CPU cores) -> benchmarks/multi30k.md
recipe: install data
	MT=$(BIN)/mt scripts/multi30k.sh

# speed side by side (one at a time: the machine has 2 cores): training vs HF transformers, decoding vs HF
# and CTranslate2 on the run in BENCH_RUN (default: the demo's); tables go to benchmarks/
BENCH_RUN ?= $(DEMO_RUN)
bench: install data
	test -f $(BENCH_RUN)/checkpoints/last.pt || $(MAKE) demo DEMO_RUN=$(BENCH_RUN)
	$(BIN)/python scripts/bench_train.py --max-tokens 2048,4096
	$(BIN)/python scripts/bench_decode.py -m $(BENCH_RUN)
	cat benchmarks/speed_train.md benchmarks/speed_decode.md > benchmarks/speed.md

# data at scale (about 10 minutes and 8 GB of /tmp): synthetic 1M/3M/10M-pair corpora, preparation,
# cache size, peak RSS and start-up of mt train -> benchmarks/data.md
bench-data: install data
	$(BIN)/python scripts/bench_data.py --sizes 1M,3M,10M
