{{/*
Environment of the operator container (the names are the operator's settings, see
operator/ap4k/operator/config.py): the image of the AsyncQueue children, so that one chart
version runs one ap4k version everywhere, and whether their pods carry Prometheus scrape
annotations. Prometheus Operator monitors for the children come from this chart instead
(templates/monitoring/), selecting them by the operator's labels.
*/}}
{{- define "ap4k.operator.env" -}}
- name: AP4K_OPERATOR_IMAGE
  value: {{ include "ap4k.image" . | quote }}
{{- with .Values.imagePullSecrets }}
- name: AP4K_OPERATOR_IMAGE_PULL_SECRETS
  value: {{ include "ap4k.pullSecretNames" . | quote }}
{{- end }}
- name: AP4K_OPERATOR_SCRAPE_ANNOTATIONS
  value: {{ .Values.metrics.scrapeAnnotations | toString | quote }}
- name: AP4K_OPERATOR_SCANNING
  value: {{ include "ap4k.operator.clusterScanning" . | quote }}
- name: AP4K_METRICS_PORT
  value: {{ include "ap4k.operator.metricsPort" . | quote }}
- name: AP4K_LOG_LEVEL
  value: {{ .Values.operator.logLevel | quote }}
- name: AP4K_LOG_FORMAT
  value: {{ .Values.operator.logFormat | quote }}
- name: AP4K_OPERATOR_POD_LOG_FORMAT
  value: {{ .Values.operator.podLogFormat | quote }}
{{- end }}

{{/*
"true" or "false": whether kopf scans the cluster for CRDs and namespaces. By default only a
cluster-wide operator does; a namespaced one takes its namespaces as given and so needs no
ClusterRole.
*/}}
{{- define "ap4k.operator.clusterScanning" -}}
{{- if kindIs "bool" .Values.operator.clusterScanning }}
{{- .Values.operator.clusterScanning }}
{{- else }}
{{- empty .Values.operator.watchNamespaces }}
{{- end }}
{{- end }}

{{/* The operator's /metrics and /healthz port (fixed: the Service maps its own port to it). */}}
{{- define "ap4k.operator.metricsPort" -}}
8080
{{- end }}

{{/* Comma-separated names of the image pull secrets. */}}
{{- define "ap4k.pullSecretNames" -}}
{{- $names := list }}
{{- range . }}{{ $names = append $names .name }}{{ end }}
{{- join "," $names }}
{{- end }}
