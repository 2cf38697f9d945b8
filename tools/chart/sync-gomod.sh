#!/usr/bin/env bash
# Rewrites the chart tools' wrapper modules (cli/, crdgen/) go.mod/go.sum from versions.env.
#
# Why wrapper modules: `go install pkg@version` builds one module's tool at a time, and each would resolve its own
# dependency versions on every machine. A committed go.mod + go.sum pins the whole build (like tools/k8s), and one
# `go build` of helm, promtool and promql-names compiles the code they share (client-go, prometheus/common) once.
# controller-gen lives in a module of its own (crdgen/): the Prometheus Operator's API types would move helm's
# Kubernetes libraries to other patch versions than the ones helm is released with. Run it after changing
# versions.env; the result is committed, so builds never resolve versions on their own.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=tools/chart/versions.env
. "$here/versions.env"
GOPROXY=$(go env GOPROXY | cut -d, -f1)   # the module proxy only, never `direct`
export GOPROXY

# the newest `go` directive of the tools' own modules: the wrapper cannot ask for less
godirective() {
  # shellcheck disable=SC2016  # awk's own $1 and $2
  go mod download -json "$1" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' | xargs awk '$1 == "go" {print $2; exit}'
}
cli_go=$(printf '%s\n' "$(godirective "helm.sh/helm/v4@${HELM_VERSION}")" \
  "$(godirective "github.com/prometheus/prometheus@${PROMETHEUS_VERSION}")" | sort -V | tail -n1)

(cd "$here/cli" && rm -f go.sum && printf 'module beacon.dev/tools/chart/cli\n\ngo %s\n' "$cli_go" > go.mod \
  && go get -tool "helm.sh/helm/v4/cmd/helm@${HELM_VERSION}" \
    "github.com/prometheus/prometheus/cmd/promtool@${PROMETHEUS_VERSION}" \
  && go mod tidy)
(cd "$here/crdgen" && rm -f go.sum && printf 'module beacon.dev/tools/chart/crdgen\n\ngo 1.26.0\n' > go.mod \
  && go get -tool "sigs.k8s.io/controller-tools/cmd/controller-gen@${CONTROLLER_TOOLS_VERSION}" \
  && go get "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring@${PROMETHEUS_OPERATOR_VERSION}" \
  && go mod tidy)
echo "sync-gomod: helm ${HELM_VERSION}, prometheus ${PROMETHEUS_VERSION}, prometheus-operator" \
  "${PROMETHEUS_OPERATOR_VERSION}, controller-tools ${CONTROLLER_TOOLS_VERSION}"
