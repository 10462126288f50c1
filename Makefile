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

# Debian's chromium for the web UI's browser tests (tests/ui); nothing to do where it is already installed.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) \
		|| echo "warning: could not install chromium: the browser tests are skipped (and fail when CI is set)"

test: setup browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

.PHONY: setup generate test browser
