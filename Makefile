# Set-up and the main jobs. Every target creates or reuses the virtual environment in .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/tiny.yaml
RUN ?= runs/demo
# DATA empty: stream German Wikipedia from the Hugging Face hub. DATA=path: a local parquet,
# JSONL, plain text or MediaWiki XML dump.
DATA ?=
MAX_ARTICLES ?=
INPUT_FLAGS := $(if $(DATA),--input $(DATA),)
LIMIT_FLAGS := $(if $(MAX_ARTICLES),--max-articles $(MAX_ARTICLES),)

.PHONY: install test test-fast demo bench bench-quick bench-data clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Each stage whose output is already complete is reused, so a second `make demo` continues an
# interrupted run; `make clean` or another RUN=dir starts over.
demo: install
	@if [ -f $(RUN)/data/manifest.json ]; then echo "reusing prepared data in $(RUN)/data"; \
	else $(BIN)/spikewalze prepare-data --config $(CONFIG) $(INPUT_FLAGS) $(LIMIT_FLAGS) --out $(RUN)/data; fi
	@if [ -f $(RUN)/tokenizer/manifest.json ]; then echo "reusing the tokenizer in $(RUN)/tokenizer"; \
	else $(BIN)/spikewalze build-tokenizer --config $(CONFIG) --data $(RUN)/data --out $(RUN)/tokenizer; fi
	@if [ -f $(RUN)/train/run.json ]; then $(BIN)/spikewalze resume $(RUN)/train; \
	else $(BIN)/spikewalze train --config $(CONFIG) --data $(RUN)/data --tokenizer $(RUN)/tokenizer --out $(RUN)/train; fi
	$(BIN)/spikewalze evaluate $(RUN)/train --json $(RUN)/evaluation.json
	$(BIN)/spikewalze generate $(RUN)/train --prompt "Die Stadt Aachen"

bench-data: install
	$(BIN)/python -m benchmarks.data_bench

bench: install
	$(BIN)/python -m benchmarks.model_bench

# The same benchmarks at small sizes with a 30 s quality budget: a few minutes, for CI.
bench-quick: install
	$(BIN)/python -m benchmarks.model_bench --quick

clean:
	rm -rf runs
