# The two quick-start commands: `make demo` and `make test`. Both set up .venv first (once).
# TORCH: the CPU build by default; on a GPU machine use e.g. `make TORCH="torch==2.13.0" ...` with
# the CUDA wheel index of your choice configured for pip.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test test-slow clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/blip2 demo

test: setup
	$(BIN)/python -m pytest -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -m slow

clean:
	rm -rf runs .pytest_cache
