# The two commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it; `make test` adds the
# test tools (pytest, ruff, mypy, and the Battery Data Format validator and PyProBE as consumers)
# and, where the machine lacks them, Debian's chromium and chromium-driver (the report is checked in
# a real headless browser); without root or sudo that test is skipped and says why.
PYTHON ?= python3
VENV := .venv
RUNTIME := $(VENV)/.installed
TESTING := $(VENV)/.installed-test

.PHONY: demo test lint clean browser

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

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } || \
	  echo "chromium could not be installed: the report's browser test will be skipped"; }

test: $(TESTING) browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest

lint: $(TESTING)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
