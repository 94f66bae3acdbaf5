{{/*
Helpers shared by every template.
*/}}

{{/* Chart name, or nameOverride. */}}
{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefixing every resource: fullnameOverride, else "<release>-<name>",
or the release name alone when it already contains the chart name. Kept short
enough that "<fullname>-worker-webhooks-metrics" fits in 63 characters.
*/}}
{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 39 | trimSuffix "-" }}
{{- else }}
{{- $name := include "herald.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 39 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 39 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* "herald-0.1.0", for the helm.sh/chart label. */}}
{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "herald.labels" -}}
helm.sh/chart: {{ include "herald.chart" . }}
{{ include "herald.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herald
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels selecting this release's pods (all components). */}}
{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component's resources: (dict "root" $ "component" "api"). */}}
{{- define "herald.componentLabels" -}}
{{ include "herald.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels selecting one component's pods: (dict "root" $ "component" "api"). */}}
{{- define "herald.componentSelectorLabels" -}}
{{ include "herald.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Name of one component's resources: "<fullname>-<component>". */}}
{{- define "herald.componentName" -}}
{{- printf "%s-%s" (include "herald.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fills .out (a dict) with every enabled component: name -> its values. Ranging
over the dict visits api, operator, worker-mail, worker-tasks, worker-webhooks.
*/}}
{{- define "herald.components" -}}
{{- $v := .root.Values }}
{{- if $v.api.enabled }}{{ $_ := set .out "api" $v.api }}{{ end }}
{{- if $v.workers.tasks.enabled }}{{ $_ := set .out "worker-tasks" $v.workers.tasks }}{{ end }}
{{- if $v.workers.webhooks.enabled }}{{ $_ := set .out "worker-webhooks" $v.workers.webhooks }}{{ end }}
{{- if $v.workers.mail.enabled }}{{ $_ := set .out "worker-mail" $v.workers.mail }}{{ end }}
{{- if $v.operator.enabled }}{{ $_ := set .out "operator" $v.operator }}{{ end }}
{{- end }}

{{/* The three workers and their JetStream stream and consumer (fixed by the design). */}}
{{- define "herald.workerStreams" -}}
worker-tasks: {stream: HERALD_TASKS, consumer: tasks}
worker-webhooks: {stream: HERALD_WEBHOOKS, consumer: webhooks}
worker-mail: {stream: HERALD_MAIL, consumer: mail}
{{- end }}

{{/* Image reference: repository@digest, or repository:tag (tag defaults to appVersion). */}}
{{- define "herald.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* ServiceAccount of the API and workers. */}}
{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "herald.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ServiceAccount of the operator. */}}
{{- define "herald.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "herald.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespace the operator watches when not cluster-wide. */}}
{{- define "herald.watchNamespace" -}}
{{- default .Release.Namespace .Values.operator.watchNamespace }}
{{- end }}

{{/*
Name of the bundled NATS chart's resources, mirroring its "nats.fullname":
nats.fullnameOverride, else the release name when it contains "nats" (or
nats.nameOverride), else "<release>-nats".
*/}}
{{- define "herald.natsFullname" -}}
{{- if .Values.nats.fullnameOverride }}
{{- .Values.nats.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default "nats" .Values.nats.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* NATS URL Herald connects to: the bundled NATS's Service, or nats.url. */}}
{{- define "herald.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s.%s.svc:4222" (include "herald.natsFullname" .) .Release.Namespace }}
{{- else }}
{{- required "nats.url is required when nats.enabled is false" .Values.nats.url }}
{{- end }}
{{- end }}

{{/* host:port of the NATS monitoring endpoint for the KEDA trigger. */}}
{{- define "herald.natsMonitoringEndpoint" -}}
{{- if .Values.nats.monitoringEndpoint }}
{{- .Values.nats.monitoringEndpoint }}
{{- else if .Values.nats.enabled }}
{{- printf "%s-headless.%s.svc.cluster.local:%d" (include "herald.natsFullname" .) .Release.Namespace (int (dig "config" "monitor" "port" 8222 .Values.nats)) }}
{{- else }}
{{- fail "nats.monitoringEndpoint (host:port of the NATS monitoring endpoint, port 8222) is required when a worker has keda.enabled and nats.enabled is false" }}
{{- end }}
{{- end }}

{{/*
One TOML value: strings (JSON-quoted, which TOML accepts), booleans, integers
(Helm reads every YAML number as a float), floats, arrays and inline tables.
*/}}
{{- define "herald.tomlValue" -}}
{{- $v := . }}
{{- if kindIs "string" $v }}
{{- printf "\"%s\"" ($v | replace "\\" "\\\\" | replace "\"" "\\\"" | replace "\n" "\\n" | replace "\r" "\\r" | replace "\t" "\\t") }}
{{- else if kindIs "bool" $v }}
{{- ternary "true" "false" $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) }}
{{- if eq (float64 (int64 $v)) (float64 $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) }}
{{- $v }}
{{- else if kindIs "slice" $v }}
{{- $items := list }}
{{- range $v }}{{ $items = append $items (include "herald.tomlValue" .) }}{{ end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else if kindIs "map" $v }}
{{- $items := list }}
{{- range $k, $x := $v }}{{ if not (kindIs "invalid" $x) }}{{ $items = append $items (printf "%s = %s" (include "herald.tomlValue" $k) (include "herald.tomlValue" $x)) }}{{ end }}{{ end }}
{{- printf "{ %s }" (join ", " $items) }}
{{- else }}
{{- fail (printf "config: cannot write %v (%s) as TOML" $v (kindOf $v)) }}
{{- end }}
{{- end }}

{{/* Herald's config.toml: the `config` values plus what the chart manages. */}}
{{- define "herald.configToml" -}}
{{- $config := deepCopy .Values.config }}
{{- $_ := set $config "nats" (dict "url" (include "herald.natsUrl" .)) }}
{{- $_ := set $config "shutdown" (dict "grace" (printf "%ds" (int .Values.shutdown.graceSeconds))) -}}
{{- $tenancy := dict "namespaces" (.Values.operator.tenancy.namespaces | default dict) "namespace_annotation" .Values.operator.tenancy.namespaceAnnotation }}
{{- $_ := set $config "operator" (merge (dict "tenancy" $tenancy) (.Values.config.operator | default dict)) -}}
# Herald configuration, rendered by the Helm chart from its `config` values.
# Keys as in config.example.toml; HERALD_<SECTION>__<KEY> variables override them.
{{- range $section, $keys := $config }}
{{- if $keys }}

[{{ $section }}]
{{- range $key, $value := $keys }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "herald.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Secret names (existing or chart-created), empty when not configured. */}}
{{- define "herald.smtpSecretName" -}}
{{- with .Values.secrets.smtp }}
{{- if .existingSecret }}{{ .existingSecret }}{{ else if or .username .password }}{{ include "herald.fullname" $ }}-smtp{{ end }}
{{- end }}
{{- end }}

{{- define "herald.apiTokensSecretName" -}}
{{- with .Values.secrets.apiTokens }}
{{- if .existingSecret }}{{ .existingSecret }}{{ else if .tokens }}{{ include "herald.fullname" $ }}-api-tokens{{ end }}
{{- end }}
{{- end }}

{{- define "herald.encryptionKeySecretName" -}}
{{- with .Values.secrets.encryptionKey }}
{{- if .existingSecret }}{{ .existingSecret }}{{ else if .value }}{{ include "herald.fullname" $ }}-encryption-key{{ end }}
{{- end }}
{{- end }}

{{/* Refuses a Secret given both by name and inline. */}}
{{- define "herald.validateSecrets" -}}
{{- with .Values.secrets }}
{{- if and .smtp.existingSecret (or .smtp.username .smtp.password) }}
{{- fail "secrets.smtp: set existingSecret or username/password, not both" }}
{{- end }}
{{- if and .smtp.password (not .smtp.username) }}
{{- fail "secrets.smtp: an inline password needs an inline username" }}
{{- end }}
{{- if and .apiTokens.existingSecret .apiTokens.tokens }}
{{- fail "secrets.apiTokens: set existingSecret or tokens, not both" }}
{{- end }}
{{- if and (dig "api" "metrics_require_token" false $.Values.config) (not (or .apiTokens.existingSecret .apiTokens.tokens)) }}
{{- fail "config.api.metrics_require_token needs secrets.apiTokens: the API refuses to start without tokens" }}
{{- end }}
{{- if and .encryptionKey.existingSecret .encryptionKey.value }}
{{- fail "secrets.encryptionKey: set existingSecret or value, not both" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checksum of the secret settings one component uses, so a change to an inline
secret (or to which Secret is referenced) rolls its pods:
(dict "root" $ "component" "api").
*/}}
{{- define "herald.secretsChecksum" -}}
{{- $s := .root.Values.secrets }}
{{- $used := dict }}
{{- if eq .component "api" }}{{ $_ := set $used "apiTokens" $s.apiTokens }}{{ end }}
{{- if eq .component "worker-mail" }}{{ $_ := set $used "smtp" $s.smtp }}{{ end }}
{{- if has .component (list "worker-tasks" "worker-webhooks" "operator") }}{{ $_ := set $used "encryptionKey" $s.encryptionKey }}{{ end }}
{{- toJson $used | sha256sum }}
{{- end }}

{{/* terminationGracePeriodSeconds of one component, checked against the shutdown grace. */}}
{{- define "herald.terminationGracePeriod" -}}
{{- $c := .values }}
{{- $tgp := int (ternary .root.Values.shutdown.terminationGracePeriodSeconds $c.terminationGracePeriodSeconds (kindIs "invalid" $c.terminationGracePeriodSeconds)) }}
{{- $needed := int .root.Values.shutdown.graceSeconds }}
{{- if eq .component "api" }}{{ $needed = add $needed (int $c.preStopSleepSeconds) }}{{ end }}
{{- if le $tgp $needed }}
{{- fail (printf "%s: terminationGracePeriodSeconds (%d) must exceed shutdown.graceSeconds%s (%d), or pods are killed before they finish shutting down" .component $tgp (ternary " + api.preStopSleepSeconds" "" (eq .component "api")) $needed) }}
{{- end }}
{{- $tgp }}
{{- end }}

{{/* Whether a component's replica count is managed by an HPA or KEDA. */}}
{{- define "herald.autoscaled" -}}
{{- if or (dig "autoscaling" "enabled" false .) (dig "keda" "enabled" false .) }}true{{ end }}
{{- end }}

{{/*
Checks natsClient: some enabled component creates the JetStream topology
(nats.manage_topology), or every other one would wait for ever.
*/}}
{{- define "herald.validateNatsClient" -}}
{{- $components := dict }}
{{- include "herald.components" (dict "root" . "out" $components) }}
{{- $managers := list }}
{{- range $name, $_ := $components }}
{{- if (index $.Values.natsClient.components $name).manageTopology }}{{ $managers = append $managers $name }}{{ end }}
{{- end }}
{{- if and $components (not $managers) }}
{{- fail "natsClient: no enabled component has manageTopology: true, so nothing creates the JetStream streams (the operator does by default; set natsClient.components.<component>.manageTopology)" }}
{{- end }}
{{- end }}
