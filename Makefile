# `make run`  : set up and run the quick-start TrainingRun locally (no cluster).
# `make test` : set up everything the tests need (venv, Python deps, Debian's prometheus) and run them.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test system-deps crd bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Debian packages used by the tests: a real Prometheus server and promtool.
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  ( $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus )

run: $(STAMP)
	$(VENV)/bin/leap run manifests/examples/mnist-cpu.yaml

test: $(STAMP) system-deps
	$(VENV)/bin/pytest -q

crd: $(STAMP)
	$(VENV)/bin/leap crd > manifests/crd/leap.dev_trainingruns.yaml

clean:
	rm -rf $(VENV) build *.egg-info
