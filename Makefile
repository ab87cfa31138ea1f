# `make run`  : set up and run the quick-start TrainingRun locally (no cluster).
# `make test` : set up everything the tests need (venv, Python deps, Debian's prometheus) and run them.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Two install levels: `run` needs the operator CLI and torch; `test` needs everything.
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test system-deps crd generate bench clean control-plane control-plane-down control-plane-build

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUN_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[torch]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(RUN_STAMP)

setup: $(TEST_STAMP)

# Debian packages used by the tests: a real Prometheus server and promtool.
system-deps:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  ( $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq --no-install-recommends prometheus )

run: $(RUN_STAMP)
	$(VENV)/bin/leap run manifests/examples/mnist-cpu.yaml

# The real Kubernetes control plane of the test tier (tests/controlplane.py): built once from Go
# modules (test/controlplane/) into .cache/bin/, reused while its sources are unchanged.
control-plane-build:
	python3 tests/controlplane.py build

# Start etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback (idempotent);
# admin kubeconfig: .cache/control-plane/kubeconfig. No Nodes, no pod runner: tests add those.
control-plane: control-plane-build
	python3 tests/controlplane.py up

control-plane-down:
	python3 tests/controlplane.py down

test: $(TEST_STAMP) system-deps control-plane-build
	$(VENV)/bin/pytest -q

# Regenerate every derived file: the CRD, the chart's CRDs, dashboards, alert rules, install.yaml.
crd generate: $(RUN_STAMP)
	$(VENV)/bin/leap crd > manifests/crd/leap.dev_trainingruns.yaml
	$(PY) helm/generate.py

clean: control-plane-down
	rm -rf $(VENV) build *.egg-info .cache
