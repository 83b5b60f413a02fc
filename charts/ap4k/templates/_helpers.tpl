{{/* Names ------------------------------------------------------------------------------------- */}}

{{- define "ap4k.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-<chart>`, or the release name when it already holds the chart name. */}}
{{- define "ap4k.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "ap4k.operator.fullname" -}}
{{- printf "%s-operator" (include "ap4k.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ap4k.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "ap4k.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "ap4k.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "ap4k.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels ------------------------------------------------------------------------------------ */}}

{{- define "ap4k.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ap4k.labels" -}}
helm.sh/chart: {{ include "ap4k.chart" . }}
app.kubernetes.io/name: {{ include "ap4k.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ap4k
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component (`operator`, `postgresql`); pass (list $ "component"). */}}
{{- define "ap4k.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "ap4k.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "ap4k.componentLabels" -}}
{{- $root := index . 0 -}}
{{ include "ap4k.labels" $root }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Image --------------------------------------------------------------------------------------- */}}

{{- define "ap4k.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Monitoring ---------------------------------------------------------------------------------- */}}

{{/*
Fail with a clear message when a Prometheus Operator object is asked for on a cluster that has no
such API: `helm install` would otherwise stop with a bare "no matches for kind".
Pass (list $ "ServiceMonitor" "metrics.serviceMonitor.enabled").
*/}}
{{- define "ap4k.requireMonitoringApi" -}}
{{- $root := index . 0 }}
{{- $kind := index . 1 }}
{{- $flag := index . 2 }}
{{- if not ($root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind)) }}
{{- fail (printf "%s=true, but this cluster has no monitoring.coreos.com/v1 %s API. Install the Prometheus Operator CRDs first (for example with the kube-prometheus-stack chart), or set %s=false. With `helm template`, pass --api-versions monitoring.coreos.com/v1/%s." $flag $kind $flag $kind) }}
{{- end }}
{{- end }}

{{/* Labels the operator puts on every child of an AsyncQueue (ap4k.operator.builders.labels). */}}
{{- define "ap4k.childSelectorLabels" -}}
app.kubernetes.io/name: ap4k
app.kubernetes.io/managed-by: ap4k-operator
{{- end }}

{{/* The namespaces AsyncQueues live in, for namespace selectors: the watched ones, or any. */}}
{{- define "ap4k.monitorNamespaceSelector" -}}
{{- if .Values.operator.watchNamespaces }}
{{- toYaml (dict "matchNames" (.Values.operator.watchNamespaces | uniq)) }}
{{- else }}
{{- toYaml (dict "any" true) }}
{{- end }}
{{- end }}
