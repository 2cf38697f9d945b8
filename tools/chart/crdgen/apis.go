// Package crdgen keeps the Prometheus Operator's API types in this module's build list, so that controller-gen
// (the module's tool) can load them with -mod=readonly and generate the ServiceMonitor and PrometheusRule CRDs.
package crdgen

import _ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1" // the types to generate from
