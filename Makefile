# Two entry points for a fresh machine (see README): `make generate` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= a red star on a blue background

$(BIN)/sdstack: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned, so pip takes the local CPU build instead of a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(BIN)/sdstack

setup: $(BIN)/sdstack

generate: setup
	HF_HUB_OFFLINE=1 $(BIN)/sdstack generate "$(PROMPT)"

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

.PHONY: setup generate test
