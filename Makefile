# The two commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it; `make test` adds the
# test tools (pytest, ruff, mypy, and the Battery Data Format validator and PyProBE as consumers).
# It installs nothing on the system: where Debian's chromium and chromium-driver (the report is checked in a
# real headless browser) or mosquitto with its clients (MQTT tests start a broker of their own) are missing,
# it says so and how to get them, and those tests are skipped, each with its reason. CI (.ci/run) installs them.
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
	@missing=""; for tool in chromium chromedriver mosquitto mosquitto_sub; do \
	  command -v $$tool >/dev/null || { [ $$tool = mosquitto ] && test -x /usr/sbin/mosquitto; } || missing="$$missing $$tool"; done; \
	  [ -z "$$missing" ] || echo "make test: missing$$missing: the browser and MQTT tests will be skipped (pytest lists" \
	    "them); to run them: sudo apt-get install $(SYSTEM_PACKAGES)"

test: $(TESTING) system
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -n 2 --dist loadgroup

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
