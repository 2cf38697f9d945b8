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
# written by `make chart-tools`: the directory of the cached helm, promtool and Prometheus Operator CRDs
CHART_TOOLS_FILE := .chart-tools-bin
CHART := manifests/helm/beacon
# where `make helm-package` writes the chart archive
CHART_DIST ?= dist
PYTEST_ARGS ?=
BENCH_ARGS ?=
BENCH_CONFIG_ARGS ?=
# bench/bench_scale.py: 1,000 entries x 10 endpoints by default; e.g. BENCH_SCALE_ARGS="--entries 50" to run small
BENCH_SCALE_ARGS ?=
# bench/bench_shards.py: three --shard replicas, 3,000 entries x 10 endpoints; e.g. BENCH_SHARDS_ARGS="--entries 300"
BENCH_SHARDS_ARGS ?=
# bench/bench_detect.py: crash -> not-ready with and without connection-loss hints among 10,000 endpoints;
# e.g. BENCH_DETECT_ARGS="--entries 50"
BENCH_DETECT_ARGS ?=
# bench/bench_failsafe.py: a 90 s partition of 1,000 endpoints (self-preservation on and off) and a flapping endpoint
# (flap damping on and off); e.g. BENCH_FAILSAFE_ARGS="--entries 30 --outage 30 --flap-seconds 60"
BENCH_FAILSAFE_ARGS ?=
# bench/bench_probe.py: CPU per probe and probes per second per core of the probe path alone, once per check kind
# (1,000 test hosts every 0.5 s); e.g. BENCH_PROBE_CHECKS="udp" BENCH_PROBE_ARGS="--targets 200 --seconds 10"
BENCH_PROBE_CHECKS ?= http tcp udp dns https
BENCH_PROBE_ARGS ?=
# the operator image for docker-build, deploy and kind-e2e
IMG ?= beacon:dev
# kubectl for deploy/undeploy: the one on PATH, else the one `make control-plane` builds
KUBECTL ?= $(shell command -v kubectl 2>/dev/null || echo "$$(bash tools/k8s/build.sh)/kubectl")
# kubectl for the kind e2e: the pinned one `make control-plane` builds, the cluster's own version (a kubectl on PATH
# may be several minor versions away from it); E2E_KUBECTL=kubectl uses yours
E2E_KUBECTL ?= $$(cat $(BIN_DIR_FILE))/kubectl
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

$(VENV)/.installed: pyproject.toml dev/pyproject.toml plugins/kubectl-beacon/pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "beacon needs Python >= 3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# the operator (beacon) and, beside it, the development tooling (beacon_dev) and the kubectl plugin
	@# (kubectl_beacon: .venv/bin/kubectl-beacon), at the versions of constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]' -e ./dev -e ./plugins/kubectl-beacon
	@touch $@

.PHONY: deps
deps: $(VENV)/.installed system-deps ## Install Python dependencies into .venv (and iproute2 if missing).

APT_GET := apt-get -o DPkg::Lock::Timeout=300
.PHONY: system-deps
system-deps:
	@missing=""; command -v ip >/dev/null || missing+=" iproute2"; command -v nft >/dev/null || missing+=" nftables"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing$$missing (test hosts: network namespaces; the guard: nftables)"; \
	    $(APT_GET) update -qq && $(APT_GET) install -y -qq $$missing; fi

.PHONY: control-plane
control-plane: ## Build (or reuse from ~/.cache/beacon) etcd, kube-apiserver, kube-controller-manager, kubectl, CoreDNS.
	@bash tools/k8s/build.sh > $(BIN_DIR_FILE)
	@echo "control-plane binaries: $$(cat $(BIN_DIR_FILE))"

.PHONY: chart-tools
chart-tools: ## Build (or reuse from ~/.cache/beacon) helm, promtool and the Prometheus Operator CRDs the chart tests use.
	@bash tools/chart/build.sh > $(CHART_TOOLS_FILE)
	@echo "chart tools: $$(cat $(CHART_TOOLS_FILE))"

##@ Development

.PHONY: lint
lint: deps ## ruff check + format --check, mypy --strict, import-linter, yamllint, shellcheck, hadolint.
	$(VENV)/bin/ruff check operator dev plugins tests bench hack/kind/runc-wrapper hack/kind/e2e
	$(VENV)/bin/ruff format --check operator dev plugins tests bench hack/kind/runc-wrapper hack/kind/e2e
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict hack/kind/runc-wrapper
	$(VENV)/bin/mypy --strict hack/kind/e2e
	$(VENV)/bin/lint-imports
	$(VENV)/bin/yamllint -s crds examples manifests
	$(VENV)/bin/shellcheck -x hack/*.sh hack/kind/*.sh hack/kind/node/beacon-cni \
	  hack/kind/node/beacon-import-images tools/k8s/*.sh tools/chart/*.sh .ci/run
	$(VENV)/bin/hadolint Dockerfile hack/kind/node/Dockerfile hack/kind/node/Dockerfile.kube-proxy
	@# the kind bases install Debian's current packages of the suite: pinning versions would break with every update
	$(VENV)/bin/hadolint --ignore DL3008 hack/kind/base/*/Dockerfile

.PHONY: fmt
fmt: deps ## Format and autofix.
	$(VENV)/bin/ruff format operator dev plugins tests bench
	$(VENV)/bin/ruff check --fix operator dev plugins tests bench

.PHONY: test-unit
test-unit: deps chart-tools ## Unit tests only (no cluster).
	BEACON_CHART_TOOLS_DIR=$$(cat $(CHART_TOOLS_FILE)) $(PY) -m pytest tests/unit $(PYTEST_ARGS)

# Under CI=true (`.ci/run` sets it), `make test` counts every packet for 198.18.0.0/15 that tries to leave the
# machine (beacon_dev.netguard: any such packet fails the run, and pytest names the test) and ends with the kind e2e.
EGRESS_GUARD ?= $(if $(filter true,$(CI)),1,0)
GUARD := $(PY) -m beacon_dev.netguard
.PHONY: test
test: deps control-plane chart-tools lint ## Install everything, lint, run unit + integration tests (+ under CI=true the kind e2e).
	@rc=0; \
	if [ "$(EGRESS_GUARD)" = 1 ]; then $(GUARD) egress-start; fi; \
	BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) BEACON_CHART_TOOLS_DIR=$$(cat $(CHART_TOOLS_FILE)) \
	  $(PY) -m pytest tests $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 0 ] && [ "$${CI:-}" = true ]; then $(MAKE) --no-print-directory kind-e2e || rc=$$?; fi; \
	if [ "$(EGRESS_GUARD)" = 1 ]; then $(GUARD) egress-stop --what "make test" || rc=$$((rc ? rc : 1)); fi; \
	exit $$rc

.PHONY: run
run: deps control-plane ## Use KUBECONFIG's cluster, or start the local control plane; install CRDs. Ctrl-C stops.
	BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) $(PY) -m beacon_dev run --crds crds

##@ Benchmarks

.PHONY: bench
bench: deps control-plane ## Discovery, ConfigEntry, scale (10k vs kcm), sharded (30k), detection, failing-safe and probe-cost (HTTP, UDP, DNS, HTTPS) benchmarks.
	@rc=0; $(GUARD) egress-start; \
	BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) $(PY) bench/bench_discovery.py $(BENCH_ARGS) || rc=$$?; \
	if [ $$rc -eq 0 ]; then BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) $(PY) bench/bench_config.py $(BENCH_CONFIG_ARGS) \
	  || rc=$$?; fi; \
	if [ $$rc -eq 0 ]; then BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) $(PY) bench/bench_scale.py $(BENCH_SCALE_ARGS) \
	  || rc=$$?; fi; \
	if [ $$rc -eq 0 ]; then BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) $(PY) bench/bench_shards.py $(BENCH_SHARDS_ARGS) \
	  || rc=$$?; fi; \
	if [ $$rc -eq 0 ]; then BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) $(PY) bench/bench_detect.py $(BENCH_DETECT_ARGS) \
	  || rc=$$?; fi; \
	if [ $$rc -eq 0 ]; then BEACON_BIN_DIR=$$(cat $(BIN_DIR_FILE)) $(PY) bench/bench_failsafe.py $(BENCH_FAILSAFE_ARGS) \
	  || rc=$$?; fi; \
	for check in $(BENCH_PROBE_CHECKS); do \
	  if [ $$rc -eq 0 ]; then $(PY) bench/bench_probe.py --check $$check $(BENCH_PROBE_ARGS) || rc=$$?; fi; \
	done; \
	$(GUARD) egress-stop --what "make bench" || rc=$$((rc ? rc : 1)); exit $$rc

##@ Cluster

.PHONY: install
install: control-plane ## Install the CRDs into the cluster KUBECONFIG points at.
	$$(cat $(BIN_DIR_FILE))/kubectl apply --server-side -k crds

.PHONY: uninstall
uninstall: control-plane ## Remove the CRDs (and with them every ServiceEntry and ConfigEntry).
	$$(cat $(BIN_DIR_FILE))/kubectl delete --ignore-not-found -k crds

##@ Deployment

.PHONY: helm-lint
helm-lint: chart-tools ## helm lint --strict the chart; promtool checks and unit-tests its alert rules.
	@tools=$$(cat $(CHART_TOOLS_FILE)); \
	"$$tools/helm" lint --strict $(CHART) && \
	"$$tools/promtool" check rules $(CHART)/rules/beacon.rules.yaml && \
	(cd $(CHART)/rules && "$$tools/promtool" test rules beacon.rules.test.yaml)

.PHONY: helm-package
helm-package: chart-tools ## Package the chart into CHART_DIST (default dist/), CRDs and RBAC rules copied from their sources.
	$$(cat $(CHART_TOOLS_FILE))/helm package $(CHART) --destination $(CHART_DIST)

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

.PHONY: kind-image
kind-image: deps control-plane ## Build the offline kind node image + every image kubeadm needs (Debian packages, Go modules).
	bash hack/kind/with-docker.sh bash hack/kind/node-image.sh

.PHONY: kind-e2e
kind-e2e: deps control-plane ## End to end on kind: cluster, image, deploy, DNS, failover, real-pod race, config reload, canary, rollback.
	IMG=$(IMG) KUBECTL=$(E2E_KUBECTL) $(GUARD) run -- bash hack/kind/with-docker.sh bash hack/kind-e2e.sh
