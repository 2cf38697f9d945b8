{{/*
The names of the chart's objects. Release "beacon" gives manifests/default's names ("beacon-operator"), so the
chart and `make deploy` describe the same cluster; any other release name is kept in the names, so two releases
never collide on the cluster-scoped objects (ClusterRole, ClusterRoleBinding, ClusterKopfPeering).
*/}}
{{- define "beacon.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else if contains "beacon" .Release.Name -}}
{{- printf "%s-operator" .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-beacon-operator" .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The peering object's name (--peering-name) and the shard group's (--shard-group): the release's name. */}}
{{- define "beacon.group" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The labels every object carries ("beacon.labels"); the operator's pods and the objects that select them
carry "beacon.workloadLabels", which add what the selectors match. */}}
{{- define "beacon.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: beacon
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "beacon.labels" -}}
{{ include "beacon.commonLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "beacon.workloadLabels" -}}
{{ include "beacon.commonLabels" . }}
{{ include "beacon.selectorLabels" . }}
{{- end -}}

{{/* The operator pods: what the Deployment, the metrics Service, the PDB and the NetworkPolicy select. */}}
{{- define "beacon.selectorLabels" -}}
app.kubernetes.io/name: beacon
app.kubernetes.io/component: operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Replicas: the value, else the mode's default; one standalone operator at most (two would both write). */}}
{{- define "beacon.replicas" -}}
{{- $defaults := dict "single" 1 "peering" 2 "sharded" 3 -}}
{{- $replicas := get $defaults .Values.mode | int -}}
{{- if not (kindIs "invalid" .Values.replicas) }}{{ $replicas = .Values.replicas | int }}{{ end -}}
{{- if and (eq .Values.mode "single") (gt $replicas 1) -}}
{{- fail (printf "mode=single runs one replica (two standalone operators would both write); got replicas=%d: use mode=peering or mode=sharded" $replicas) -}}
{{- end -}}
{{- $replicas -}}
{{- end -}}

{{/* The operator's flags. The image's entrypoint is `python -m beacon operator`. */}}
{{- define "beacon.args" -}}
{{- $group := include "beacon.group" . -}}
{{- $args := list -}}
{{- if eq .Values.mode "peering" -}}
{{- $args = append $args "--peering" -}}
{{- if ne $group "beacon" }}{{ $args = append $args (printf "--peering-name=%s" $group) }}{{ end -}}
{{- else if eq .Values.mode "sharded" -}}
{{- $args = append $args "--shard" -}}
{{- if ne $group "beacon" }}{{ $args = append $args (printf "--shard-group=%s" $group) }}{{ end -}}
{{- end -}}
{{- range .Values.watchNamespaces }}{{ $args = append $args (printf "--namespace=%s" .) }}{{ end -}}
{{- range .Values.allowProbeCIDRs }}{{ $args = append $args (printf "--allow-probe-cidr=%s" .) }}{{ end -}}
{{- if .Values.logFormat }}{{ $args = append $args (printf "--log-format=%s" .Values.logFormat) }}{{ end -}}
{{- if ne (int .Values.metrics.port) 9090 }}{{ $args = append $args (printf "--metrics-port=%d" (int .Values.metrics.port)) }}{{ end -}}
{{- range .Values.extraArgs }}{{ $args = append $args . }}{{ end -}}
{{- toJson $args -}}
{{- end -}}
