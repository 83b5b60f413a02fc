{{/*
The operator's RBAC rules come from the operator itself (files/operator-rbac-rules.yaml, a list
of PolicyRules), split here by scope:
- "cluster": rules about cluster-scoped resources (the CRD, namespaces, kopf's cluster peering)
  and non-resource URLs; they only work in a ClusterRole;
- "namespaced": everything else. Cluster-wide, they join the ClusterRole; with
  `operator.watchNamespaces`, they go into one Role per watched namespace and nowhere else.
Rules about CRDs and namespaces only serve kopf's cluster scanning: they are left out when
scanning is off (see "ap4k.operator.clusterScanning").
Renders {"cluster": [...], "namespaced": [...]} as YAML.
*/}}
{{- define "ap4k.operator.rbacRules" -}}
{{- $path := "files/operator-rbac-rules.yaml" }}
{{- $raw := .Files.Get $path }}
{{- if not $raw }}
{{- fail (printf "the chart is missing the operator's RBAC rules at %s" $path) }}
{{- end }}
{{- $rules := fromYamlArray $raw }}
{{- if and (eq (len $rules) 1) (hasKey (index $rules 0) "Error") }}
{{- fail (printf "%s is not a YAML list of PolicyRules: %s" $path (index $rules 0).Error) }}
{{- end }}
{{- $clusterScoped := list
      "customresourcedefinitions" "namespaces" "clusterkopfpeerings" "nodes"
      "persistentvolumes" "storageclasses" "clusterroles" "clusterrolebindings"
      "priorityclasses" "apiservices" "tokenreviews" "subjectaccessreviews"
      "selfsubjectaccessreviews" "selfsubjectrulesreviews"
      "mutatingwebhookconfigurations" "validatingwebhookconfigurations" }}
{{- $scanningOnly := list "customresourcedefinitions" "namespaces" }}
{{- $scanning := eq (include "ap4k.operator.clusterScanning" .) "true" }}
{{- $cluster := list }}
{{- $namespaced := list }}
{{- range $rule := $rules }}
{{- if $rule.nonResourceURLs }}
{{- $cluster = append $cluster $rule }}
{{- else }}
{{- $c := list }}
{{- $n := list }}
{{- range $resource := $rule.resources }}
{{- $base := splitList "/" $resource | first }}
{{- if and (not $scanning) (has $base $scanningOnly) }}
{{- /* dropped: kopf does not scan */}}
{{- else if has $base $clusterScoped }}
{{- $c = append $c $resource }}
{{- else }}
{{- $n = append $n $resource }}
{{- end }}
{{- end }}
{{- if $c }}
{{- $cluster = append $cluster (merge (dict "resources" $c) (omit $rule "resources")) }}
{{- end }}
{{- if $n }}
{{- $namespaced = append $namespaced (merge (dict "resources" $n) (omit $rule "resources")) }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml (dict "cluster" $cluster "namespaced" $namespaced) }}
{{- end }}
