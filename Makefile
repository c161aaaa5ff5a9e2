# Everything a fresh machine with Python 3.11 needs: `make test` creates .venv and installs the project.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache *.egg-info
