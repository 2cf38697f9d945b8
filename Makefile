# beacon — health-checked service discovery and layered configuration for Kubernetes.
# `make help` lists the targets. `make test` and `make run` are the two commands a new machine needs.

SHELL := /usr/bin/env bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# written by `make control-plane`: the directory of the cached binaries
BIN_DIR_FILE := .control-plane-bin
PYTEST_ARGS ?=
BENCH_ARGS ?=
BENCH_CONFIG_ARGS ?=
# the operator image for docker-build, deploy and kind-e2e
IMG ?= beacon:dev
# kubectl for deploy/undeploy: the one on PATH, else the one `make control-plane` builds
KUBECTL ?= $(shell command -v kubectl 2>/dev/null || echo "$$(bash tools/k8s/build.sh)/kubectl")
# beacon's CRDs and kopf's peering CRDs (manifests/crd), which must be Established before the peering object
DEPLOY_CRDS := crd/serviceentries.beacon.dev crd/configentries.beacon.dev crd/clusterkopfpeerings.kopf.dev \
  crd/kopfpeerings.kopf.dev

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make <target>\n"} \
	  /^[a-zA-Z0-9_-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } \
	  /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Setup (what `make test` and `make run` install)

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "beacon needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

.PHONY: deps
deps: $(VENV)/.installed system-deps ## Install Python dependencies into .venv (and iproute2 if missing).

.PHONY: system-deps
system-deps:
	@command -v ip >/dev/null || { echo "installing iproute2 (test hosts use network namespaces)"; \
	  apt-get update -qq && apt-get install -y -qq iproute2; }

.PHONY: control-plane
control-plane: ## Build (or reuse from ~/.cache/beacon) etcd, kube-apiserver, kube-controller-manager, kubectl, CoreDNS.
	@bash tools/k8s/build.sh > $(BIN_DIR_FILE)
	@echo "control-plane binaries: $$(cat $(BIN_DIR_FILE))"

##@ Development

.PHONY: lint
lint: deps ## ruff check + format --check, mypy --strict, import-linter, yamllint, shellcheck, hadolint.
	$(VENV)/bin/ruff check operator tests bench
	$(VENV)/bin/ruff format --check operator tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/yamllint -s crds examples manifests
	$(VENV)/bin/shellcheck hack/*.sh
	$(VENV)/bin/hadolint Dockerfile

.PHONY: fmt
fmt: deps ## Format and autofix.
	$(VENV)/bin/ruff format operator tests bench
	$(VENV)/bin/ruff check --fix operator tests bench

.PHONY: test-unit
test-unit: deps ## Unit tests only (no cluster).
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

.PHONY: test
test: deps control-plane lint ## Install everything, lint, and run unit + integration tests on the local control plane.
	BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) $(PY) -m pytest tests $(PYTEST_ARGS)

.PHONY: run
run: deps control-plane ## Use KUBECONFIG's cluster, or start the local control plane; install CRDs. Ctrl-C stops.
	BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) $(PY) -m beacon run --crds crds

##@ Benchmarks

.PHONY: bench
bench: deps control-plane ## Discovery and ConfigEntry benchmarks on the local control plane; writes bench/results/.
	BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) $(PY) bench/bench_discovery.py $(BENCH_ARGS)
	BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) $(PY) bench/bench_config.py $(BENCH_CONFIG_ARGS)

##@ Cluster

.PHONY: install
install: control-plane ## Install the CRDs into the cluster KUBECONFIG points at.
	$$(cat $(BIN_DIR_FILE))/kubectl apply --server-side -k crds

.PHONY: uninstall
uninstall: control-plane ## Remove the CRDs (and with them every ServiceEntry and ConfigEntry).
	$$(cat $(BIN_DIR_FILE))/kubectl delete --ignore-not-found -k crds

##@ Deployment

.PHONY: docker-build
docker-build: ## Build the operator image IMG (default beacon:dev; needs Docker).
	docker build -t $(IMG) .

.PHONY: deploy
deploy: ## Install CRDs, RBAC and the two-replica operator (image IMG) into KUBECONFIG's cluster.
	$(KUBECTL) apply --server-side -k manifests/crd
	$(KUBECTL) wait --for=condition=Established --timeout=60s $(DEPLOY_CRDS)
	$(KUBECTL) kustomize manifests/default | sed 's|image: beacon:dev$$|image: $(IMG)|' \
	  | $(KUBECTL) apply --server-side -f -

.PHONY: undeploy
undeploy: ## Remove the operator, its RBAC and namespace; keep the CRDs (`make uninstall` removes beacon's).
	$(KUBECTL) delete --ignore-not-found -k manifests/manager
	$(KUBECTL) delete --ignore-not-found -k manifests/rbac
	$(KUBECTL) delete --ignore-not-found namespace beacon-system

.PHONY: kind-e2e
kind-e2e: ## End to end on a kind cluster (needs Docker and kind): build, load, deploy, demo backend, DNS, failover.
	IMG=$(IMG) KUBECTL=$(KUBECTL) bash hack/kind-e2e.sh
