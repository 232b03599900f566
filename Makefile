# The two commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it; `make test` adds the
# test tools (pytest, ruff, mypy, and the Battery Data Format validator and PyProBE as consumers).
PYTHON ?= python3
VENV := .venv
RUNTIME := $(VENV)/.installed
TESTING := $(VENV)/.installed-test

.PHONY: demo test lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

$(RUNTIME): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet -e .
	touch $(RUNTIME)

$(TESTING): pyproject.toml $(RUNTIME)
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(TESTING)

demo: $(RUNTIME)
	$(VENV)/bin/cellbench demo

test: $(TESTING)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest

lint: $(TESTING)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
