# cldlr — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST := $(BIN)/python -m pytest

.PHONY: install demo test test-slow test-all bench clean

# The venv is (re)built whenever pyproject.toml changes; everything the tests and demo need is
# installed here, so a clean checkout needs nothing but Python 3.11.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m cldlr.simulations.demo --out demo-out

test: $(STAMP)
	$(PYTEST) -q

test-slow: $(STAMP)
	$(PYTEST) -q -m slow

test-all: $(STAMP)
	$(PYTEST) -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) runs demo-out .cache .pytest_cache
