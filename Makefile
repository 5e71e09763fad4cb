# The README's commands. Everything runs in the project's venv (outside the repo, keyed by the
# pinned dependencies) with operator/ on PYTHONPATH; nothing is installed into the repository.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV = $(shell hack/venv.sh)
PY = $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)/operator
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
PYTEST_ARGS ?=

.PHONY: help demo test lint typecheck unit crds bench cluster-up cluster-down venv kubeconfig binaries tools prereqs cli images

help:
	@echo "make demo   - start the local cluster and run the main job"
	@echo "make test   - lint, typecheck and run every test tier"
	@echo "make crds   - regenerate crds/ and the chart's copy from the typed API"
	@echo "make bench  - run the benchmarks (they print figures)"

venv:
	@echo $(VENV)

demo: prereqs cli
	@PATH="$(VENV)/bin:$$PATH" $(PY) -m kubetune.devcluster.demo

lint:
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench
	cd operator && $(VENV)/bin/lint-imports ../pyproject.toml

typecheck:
	$(VENV)/bin/mypy

test: lint typecheck prereqs binaries tools cli images
	PATH="$(VENV)/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

# Debian packages for the local node and the image builds (containerd, runc, CNI plugins, buildah,
# mmdebstrap, ...): installed only when missing.
prereqs:
	@hack/node-prereqs.sh

# The control plane's binaries, built once per machine (minutes when cold; it shows its steps).
binaries:
	@$(PY) -c "from kubetune.devcluster.binaries import ensure_binaries; ensure_binaries()"

# The third-party Go tools the tests use (kube-score, kubeconform, kstatus, Pod Security admission,
# Prometheus, prometheus-adapter), built from the Go module proxy once per version (it shows its
# steps).
tools:
	@$(PY) -m kubetune.devcluster.gotools >/dev/null

# The `kubetune` command in the venv's bin/ (the project installed there, editable).
cli:
	@hack/cli.sh $(VENV)
# The images the real-node tests run, built with buildah before pytest starts (the ML base is
# about 20 minutes cold, longer than one test may take; later runs find them in the cache).
images: prereqs
	@$(PY) -c "from kubetune.devcluster.images import kubetune_image; [kubetune_image(n) for n in ('operator', 'trainer', 'triton')]"

unit:
	PATH="$(VENV)/bin:$$PATH" $(PY) -m pytest tests/unit $(PYTEST_ARGS)

crds:
	$(PY) -m kubetune crds --out crds

# Every benchmark prints its detail; then one table of their headline rows (bench/results.py).
bench:
	export PATH="$(VENV)/bin:$$PATH" PYTHONPATH="$(CURDIR)/operator:$(CURDIR)" \
		KUBETUNE_BENCH_RESULTS="$$(mktemp)"; \
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done; \
	$(PY) bench/results.py "$$KUBETUNE_BENCH_RESULTS"

cluster-up: prereqs
	$(PY) -m kubetune dev cluster up

cluster-down:
	$(PY) -m kubetune dev cluster down

kubeconfig:
	@$(PY) -m kubetune dev cluster kubeconfig
