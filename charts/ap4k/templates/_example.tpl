{{/*
The example AsyncQueue (exampleQueue.enabled), as YAML. A post-install Job creates it (see
templates/example/ and scripts/create_asyncqueue.py), not Helm: Helm cannot create an object
whose CRD arrives in the same release, its discovery cache does not know the kind yet.
*/}}
{{- define "ap4k.example.asyncqueue" -}}
{{- $example := .Values.exampleQueue }}
{{- $secretName := $example.databaseSecretName }}
{{- if and (not $secretName) .Values.postgresql.enabled }}
{{- $secretName = include "ap4k.postgresql.fullname" . }}
{{- end }}
{{- with .Values.operator.watchNamespaces }}
{{- if not (has $.Release.Namespace .) }}
{{- fail (printf "exampleQueue.enabled=true creates the example AsyncQueue in the release namespace %s, which operator.watchNamespaces (%s) leaves unwatched: add %s to it" $.Release.Namespace (join ", " .) $.Release.Namespace) }}
{{- end }}
{{- end }}
{{- if not $secretName }}
{{- fail "exampleQueue.enabled=true needs a database: set postgresql.enabled=true (development PostgreSQL) or exampleQueue.databaseSecretName to a Secret holding the PostgreSQL URL" }}
{{- end }}
apiVersion: ap4k.dev/v1alpha1
kind: AsyncQueue
metadata:
  name: {{ $example.name }}
  namespace: {{ .Release.Namespace }}
  # Not Helm's labels: the Job creates this object, Helm neither owns nor upgrades it, so
  # managed-by: Helm and the chart version would be false (and stale after an upgrade).
  {{- $labels := omit (include "ap4k.labels" . | fromYaml) "app.kubernetes.io/managed-by" "helm.sh/chart" }}
  labels:
    {{- toYaml $labels | nindent 4 }}
spec:
  database:
    secretName: {{ $secretName }}
    key: {{ $example.databaseSecretKey }}
  {{- with $example.server }}
  server:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $example.carriers }}
  carriers:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $example.queues }}
  queues:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{- define "ap4k.example.fullname" -}}
{{- printf "%s-example" (include "ap4k.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
