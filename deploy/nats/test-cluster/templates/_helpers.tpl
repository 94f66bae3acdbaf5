{{/* Labels of every object; the selector uses the first two. */}}
{{- define "testNats.selectorLabels" -}}
app.kubernetes.io/name: nats
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "testNats.labels" -}}
{{ include "testNats.selectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "testNats.replicas" -}}
{{- $replicas := int .Values.replicas }}
{{- if not (has $replicas (list 1 3)) }}
{{- fail (printf "replicas must be 1 or 3, not %d" $replicas) }}
{{- end }}
{{- $replicas }}
{{- end }}
