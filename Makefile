# The two commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it; `make test` adds the
# test tools (pytest, ruff, mypy, and the Battery Data Format validator and PyProBE as consumers)
# and, where the machine lacks them, Debian's chromium and chromium-driver (the report is checked in
# a real headless browser) and mosquitto with its clients (MQTT tests start a broker of their own);
# without root or sudo those tests are skipped and say why.
PYTHON ?= python3
VENV := .venv
RUNTIME := $(VENV)/.installed
TESTING := $(VENV)/.installed-test

.PHONY: demo test lint clean system benchmarks

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

SYSTEM_PACKAGES := chromium chromium-driver mosquitto mosquitto-clients

system:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && \
	  { command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto; } && command -v mosquitto_sub >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	  $$SUDO apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null 2>&1; } || \
	  echo "$(SYSTEM_PACKAGES) could not be installed: the browser and MQTT tests will be skipped"; }

test: $(TESTING) system
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest

# Not part of `make test`: every benchmark in turn, each printing both sides and their ratio (about 45 min;
# benchmarks/README.md keeps the latest table). Peers: PyBaMM (the `bench` extra), PyMeasure (a test tool here),
# paho-mqtt (under aiomqtt).
BENCHMARKS := cli_startup transport transport_instructions store_writer reaction_time virtual_clock life_test pybamm_compare \
	many_channels campaign_memory mqtt_telemetry

benchmarks: $(TESTING) system
	$(VENV)/bin/python -m pip install --quiet -e '.[test,bench]'
	@for b in $(BENCHMARKS); do echo "== benchmarks/$$b.py"; $(VENV)/bin/python benchmarks/$$b.py || exit 1; done

lint: $(TESTING)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
