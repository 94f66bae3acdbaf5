#!/usr/bin/env bash
# Lints and renders the Helm chart (deploy/helm/herald) the way CI does, and
# fails loudly on any error or lint warning:
#   - helm lint --strict with the default values and with ci/all-features-values.yaml
#   - helm template with the defaults, all features, and all features with
#     operator.clusterWide=false, plus checks on what was rendered
#   - values that values.schema.json or the templates must refuse are refused
#   - the alerts (PrometheusRule) pass `promtool check rules` and their unit
#     tests (tests/alerts.test.yaml) pass `promtool test rules`; the Grafana
#     dashboard is valid JSON (which metrics it may use is checked against
#     Herald's real /metrics by crates/herald/tests/it/metrics_lint.rs)
#
# Uses $HERALD_TOOLS/bin/helm and $HERALD_TOOLS/bin/promtool (default
# ~/.cache/herald-tools); HELM and PROMTOOL override them.
set -euo pipefail

cd "$(dirname "$0")/.."
TOOLS=${HERALD_TOOLS:-$HOME/.cache/herald-tools}
HELM=${HELM:-$TOOLS/bin/helm}
PROMTOOL=${PROMTOOL:-$TOOLS/bin/promtool}
CHART=deploy/helm/herald
ALL=$CHART/ci/all-features-values.yaml
RELEASE=herald
NAMESPACE=herald

log() { printf 'check-chart: %s\n' "$*"; }
die() { printf 'check-chart: FAIL: %s\n' "$*" >&2; exit 1; }

[ -x "$HELM" ] || die "helm not found at $HELM (set HERALD_TOOLS or HELM)"
log "using $("$HELM" version --short 2>/dev/null || echo "$HELM")"
[ -x "$PROMTOOL" ] || die "promtool not found at $PROMTOOL: run scripts/install-tools.sh (make tools), or set PROMTOOL"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The official NATS chart is an optional dependency (nats.enabled). Helm
# refuses to render a chart whose declared dependency is not in charts/, even
# when its condition is false, and fetching it needs the chart repository. So
# without `helm dependency build`, the real chart is linted (the missing
# dependency must be its only warning) and everything else runs on a copy
# whose Chart.yaml leaves the dependency out; templates and values are the same.
HAVE_NATS=""
if ! grep -q '^dependencies:' "$CHART/Chart.yaml"; then
    log "Chart.yaml declares no dependencies: checking $CHART as is"
elif compgen -G "$CHART/charts/nats-*.tgz" >/dev/null || [ -f "$CHART/charts/nats/Chart.yaml" ]; then
    HAVE_NATS=1
    log "NATS dependency present: checking $CHART as is, nats.enabled=true included"
else
    "$HELM" lint "$CHART" --namespace "$NAMESPACE" >"$WORK/lint-raw.out" 2>&1 || { cat "$WORK/lint-raw.out" >&2; die "helm lint $CHART failed"; }
    others=$(grep -E '\[(WARNING|ERROR)\]' "$WORK/lint-raw.out" | grep -v 'chart directory is missing these dependencies: nats$' || true)
    [ -z "$others" ] || { cat "$WORK/lint-raw.out" >&2; die "helm lint $CHART: problems besides the missing nats dependency"; }
    log "NATS dependency not downloaded (helm dependency build $CHART): its only lint warning is that; checking a copy without the dependency"
    mkdir -p "$WORK/chart"
    cp -R "$CHART" "$WORK/chart/herald"
    awk '/^dependencies:/ { skip = 1; next } skip && /^[^ #-]/ { skip = 0 } !skip' "$CHART/Chart.yaml" >"$WORK/chart/herald/Chart.yaml"
    ! grep -q 'dependencies' "$WORK/chart/herald/Chart.yaml" || die "could not drop the dependency from the copy's Chart.yaml"
    CHART=$WORK/chart/herald
    ALL=$CHART/ci/all-features-values.yaml
fi

# Runs a helm command; any output on stderr (deprecation or lint warnings,
# schema notes) counts as a failure, as does a non-zero exit.
helm_clean() { # <name> <helm args...>
    local name=$1
    shift
    if ! "$HELM" "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"; then
        cat "$WORK/$name.out" "$WORK/$name.err" >&2
        die "helm $* failed"
    fi
    if [ -s "$WORK/$name.err" ]; then
        cat "$WORK/$name.err" >&2
        die "helm $* printed warnings"
    fi
}

lint() { # <name> <extra args...>
    local name=$1
    shift
    helm_clean "lint-$name" lint --strict "$CHART" --namespace "$NAMESPACE" "$@"
    if grep -Eq '\[(WARNING|ERROR)\]' "$WORK/lint-$name.out"; then
        cat "$WORK/lint-$name.out" >&2
        die "helm lint ($name) reported problems"
    fi
    log "lint $name: $(grep -E 'linted' "$WORK/lint-$name.out")"
}

render() { # <name> <extra args...>: renders into $WORK/<name>.yaml
    local name=$1
    shift
    helm_clean "template-$name" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$@"
    cp "$WORK/template-$name.out" "$WORK/$name.yaml"
    log "template $name: $(grep -c '^kind:' "$WORK/$name.yaml") objects ($(grep '^kind:' "$WORK/$name.yaml" | sort | uniq -c | awk '{printf "%s%s %s", sep, $1, $3; sep=", "}'))"
}

count() { # <file> <extended regex>: matching lines
    grep -Ec -- "$2" "$1" || true
}

expect_count() { # <file> <what> <expected> <regex>
    local got
    got=$(count "$1" "$4")
    [ "$got" -eq "$3" ] || die "$(basename "$1"): expected $3 $2, found $got"
}

# Checks every rendering must pass.
check_common() { # <name> <deployments> [image]
    local f=$WORK/$1.yaml deployments=$2 image=${3:-ghcr.io/herald-dev/herald:0.1.0}
    expect_count "$f" "Deployments" "$deployments" '^kind: Deployment$'
    expect_count "$f" "checksum/config annotations (one per pod template)" "$deployments" '^ +checksum/config: [0-9a-f]{64}$'
    expect_count "$f" "checksum/secrets annotations" "$deployments" '^ +checksum/secrets: [0-9a-f]{64}$'
    expect_count "$f" "containers" "$deployments" '^ +- name: (api|worker-tasks|worker-webhooks|worker-mail|operator)$'
    expect_count "$f" "readOnlyRootFilesystem" "$deployments" '^ +readOnlyRootFilesystem: true$'
    expect_count "$f" "allowPrivilegeEscalation: false" "$deployments" '^ +allowPrivilegeEscalation: false$'
    expect_count "$f" "capabilities drop ALL" "$deployments" '^ +- ALL$'
    expect_count "$f" "runAsNonRoot (pod and container)" "$((2 * deployments))" '^ +runAsNonRoot: true$'
    expect_count "$f" "RuntimeDefault seccomp (pod and container)" "$((2 * deployments))" '^ +type: RuntimeDefault$'
    expect_count "$f" "/tmp emptyDir mounts" "$deployments" '^ +mountPath: /tmp$'
    expect_count "$f" "startup probes" "$deployments" '^ +startupProbe:$'
    expect_count "$f" "liveness probes" "$deployments" '^ +livenessProbe:$'
    expect_count "$f" "readiness probes" "$deployments" '^ +readinessProbe:$'
    expect_count "$f" "terminationGracePeriodSeconds: 40" "$deployments" '^ +terminationGracePeriodSeconds: 40$'
    expect_count "$f" "config.toml mounts" "$deployments" '^ +mountPath: /etc/herald/config.toml$'
    # Probes of the API use its port; everything else the health port.
    expect_count "$f" "probes on the API port" 3 '^ +port: http$'
    expect_count "$f" "probes on the health port" "$((3 * (deployments - 1)))" '^ +port: health$'
    expect_count "$f" "HERALD_HEALTH__LISTEN (workers and operator)" "$((deployments - 1))" '^ +- name: HERALD_HEALTH__LISTEN$'
    expect_count "$f" "tokenless ServiceAccount pods" "$((deployments - 1))" '^ +automountServiceAccountToken: false$'
    grep -q '^    format = "json"$' "$f" || die "$1: config.toml does not set log.format = \"json\""
    expect_count "$f" "operator lease name matching the RBAC" 1 '^ +value: "herald-operator"$'
    grep -q -- '- name: POD_NAMESPACE' "$f" || die "$1: the operator does not get POD_NAMESPACE (its lease namespace)"
    grep -q '^    grace = "25s"$' "$f" || die "$1: config.toml does not set shutdown.grace = \"25s\""
    expect_count "$f" "images $image" "$deployments" "^ +image: \"?$image\"?\$"
    # No wildcard in any RBAC rule.
    ! grep -Eq '^ +(verbs|resources|apiGroups): \[[^]]*"\*"' "$f" || die "$1: wildcard in an RBAC rule"
    # The operator's rules, exactly.
    local rules
    # The Namespace grant's ClusterRole is checked on its own below: it
    # sorts differently with clusterWide, and names the watched namespace
    # unless cluster-wide (the default rendering checks that name).
    rules=$(awk '/^kind: (Cluster)?Role$/{r=1} /^  name: .*-namespaces$/{r=0} /^---/{r=0} r && /^  - apiGroups|^    (resources|resourceNames|verbs):/' "$f")
    local namespace_rules
    namespace_rules=$(awk '/^kind: ClusterRole$/{k=1} /^---/{k=0; r=0} k && /^  name: .*-namespaces$/{r=1} r && /^  - apiGroups|^    (resources|verbs):/' "$f")
    [ "$namespace_rules" = "$(printf '%s\n' '  - apiGroups: [""]' '    resources: ["namespaces"]' '    verbs: ["get", "list", "watch"]')" ] \
        || { printf '%s\n' "$namespace_rules" >&2; die "$1: the Namespace grant rules differ from the reviewed list"; }
    [ "$rules" = "$(cat <<'EOF'
  - apiGroups: ["herald.dev"]
    resources: ["webhookendpoints"]
    verbs: ["get", "list", "watch", "patch"]
  - apiGroups: ["herald.dev"]
    resources: ["webhookendpoints/status"]
    verbs: ["patch"]
  - apiGroups: ["herald.dev"]
    resources: ["webhookendpoints/finalizers"]
    verbs: ["update"]
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: ["get", "list", "watch", "create"]
  - apiGroups: ["events.k8s.io"]
    resources: ["events"]
    verbs: ["create", "patch"]
  - apiGroups: [""]
    resources: ["events"]
    verbs: ["create", "patch"]
  - apiGroups: ["coordination.k8s.io"]
    resources: ["leases"]
    verbs: ["create"]
  - apiGroups: ["coordination.k8s.io"]
    resources: ["leases"]
    resourceNames: ["herald-operator"]
    verbs: ["get", "list", "watch", "update"]
EOF
)" ] || { printf '%s\n' "$rules" >&2; die "$1: operator RBAC rules differ from the reviewed list"; }
}

# Values that must be refused, and the message that says why.
expect_refused() { # <what> <expected message regex> <helm template args...>
    local what=$1 pattern=$2
    shift 2
    if "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$@" >"$WORK/neg.out" 2>"$WORK/neg.err"; then
        die "$what: accepted, but must be refused"
    fi
    grep -Eq -- "$pattern" "$WORK/neg.err" || { cat "$WORK/neg.err" >&2; die "$what: refused, but not with /$pattern/"; }
    log "refused as expected: $what"
}

log "helm lint"
lint default
lint all-features -f "$ALL"
lint all-features-namespaced -f "$ALL" --set operator.clusterWide=false

log "helm template"
render default
check_common default 5
expect_count "$WORK/default.yaml" "namespaced operator Roles (watch + leader election)" 2 '^kind: Role$'
# One ClusterRole: reading the watched Namespace's herald.dev/users grant, by name.
expect_count "$WORK/default.yaml" "ClusterRoles (the Namespace grant, read only)" 1 '^kind: ClusterRole$'
grep -A14 '^kind: ClusterRole$' "$WORK/default.yaml" | grep -q 'resourceNames: \["herald"\]' \
    || die "default: the operator may read Namespaces other than the one it watches"
expect_count "$WORK/default.yaml" "chart-created Secrets" 0 '^kind: Secret$'
grep -q '^    ssrf = { "allow" = \[\], "allowed_response_body_bytes" = 0, "reveal_refused_address" = false }$' "$WORK/default.yaml" || die "default: config.toml does not keep the SSRF allow-list empty, internal answers unstored and refused addresses hidden"
expect_count "$WORK/default.yaml" "PodDisruptionBudgets" 5 '^kind: PodDisruptionBudget$'
expect_count "$WORK/default.yaml" "PrometheusRules (off by default)" 0 '^kind: PrometheusRule$'
expect_count "$WORK/default.yaml" "dashboard ConfigMaps (off by default)" 0 '^    grafana_dashboard: "1"$'

# Every Deployment's pods roll when the configuration changes (helm upgrade).
render config-changed --set config.log.filter=debug
[ "$(grep -Eo 'checksum/config: [0-9a-f]{64}' "$WORK/default.yaml" | sort -u)" != "$(grep -Eo 'checksum/config: [0-9a-f]{64}' "$WORK/config-changed.yaml" | sort -u)" ] \
    || die "a changed config value leaves checksum/config as it was: helm upgrade would not roll the pods"
operator_replicas=$(awk '/^---/{d=0; o=0} /^kind: Deployment$/{d=1} d && /^  name: herald-operator$/{o=1} o && /^  replicas:/{print $2; exit}' "$WORK/default.yaml")
[ "$operator_replicas" = 2 ] || die "default: the operator runs $operator_replicas replicas, not 2 (a leader and a standby)"
render node-port --set api.service.type=NodePort --set api.service.nodePort=30900
grep -q '^      nodePort: 30900$' "$WORK/node-port.yaml" || die "api.service.nodePort: not in the Service"
expect_count "$WORK/default.yaml" "nodePort with ClusterIP" 0 'nodePort:'

# The Kubernetes tests' values: the image imported into the node, never pulled.
TEST_CLUSTER=$CHART/ci/test-cluster-values.yaml
lint test-cluster -f "$TEST_CLUSTER" --set image.tag=0123456789ab
render test-cluster -f "$TEST_CLUSTER" --set image.tag=0123456789ab
check_common test-cluster 5 localhost/herald:0123456789ab
expect_count "$WORK/test-cluster.yaml" "imagePullPolicy: Never" 5 '^ +imagePullPolicy: Never$'
expect_count "$WORK/test-cluster.yaml" "NodePort API Service" 1 '^  type: NodePort$'

render all-features -f "$ALL"
check_common all-features 5
f=$WORK/all-features.yaml
expect_count "$f" "ClusterRoles (endpoints, Namespace grants)" 2 '^kind: ClusterRole$'
expect_count "$f" "ClusterRoleBindings" 2 '^kind: ClusterRoleBinding$'
expect_count "$f" "leader-election Roles" 1 '^kind: Role$'
expect_count "$f" "chart-created Secrets" 3 '^kind: Secret$'
expect_count "$f" "Ingresses" 1 '^kind: Ingress$'
expect_count "$f" "HPAs (api only: KEDA owns the workers')" 1 '^kind: HorizontalPodAutoscaler$'
expect_count "$f" "KEDA ScaledObjects" 3 '^kind: ScaledObject$'
expect_count "$f" "nats-jetstream triggers" 3 '^ +- type: nats-jetstream$'
expect_count "$f" "ServiceMonitors" 1 '^kind: ServiceMonitor$'
expect_count "$f" "metrics Services" 5 '^  name: herald-.*-metrics$'
expect_count "$f" "PodDisruptionBudgets" 5 '^kind: PodDisruptionBudget$'
for pair in HERALD_TASKS:tasks HERALD_WEBHOOKS:webhooks HERALD_MAIL:mail; do
    grep -A1 "stream: ${pair%%:*}$" "$f" | grep -q "consumer: ${pair##*:}$" || die "all-features: no trigger for stream ${pair%%:*} / consumer ${pair##*:}"
done
expect_count "$f" "API tokens file (api)" 1 '^ +value: /etc/herald/tokens/tokens.toml$'
expect_count "$f" "metrics_require_token in config.toml" 1 '^ +metrics_require_token = true$'
expect_count "$f" "ServiceMonitor bearer token" 1 '^ +name: prometheus-herald-token$'
expect_count "$f" "encryption key file (operator, worker-tasks, worker-webhooks)" 3 '^ +value: /etc/herald/keys/key$'
expect_count "$f" "SMTP credentials (worker-mail)" 1 '^ +- name: HERALD_MAIL__PASSWORD$'
grep -q '^    ssrf = { "allow" = \["10.8.0.0/16", "fd00::/8"\], ' "$f" || die "all-features: config.toml does not carry the SSRF allow-list"
# NATS credentials and TLS from user-named Secrets (natsClient), per component.
expect_count "$f" "NATS password files (api, operator)" 2 '^ +- name: HERALD_NATS__PASSWORD_FILE$'
expect_count "$f" "NATS .creds file (worker-tasks)" 1 '^ +- name: HERALD_NATS__CREDENTIALS_FILE$'
expect_count "$f" "NATS NKey seed (worker-webhooks)" 1 '^ +- name: HERALD_NATS__NKEY_SEED_FILE$'
expect_count "$f" "NATS token (worker-mail)" 1 '^ +- name: HERALD_NATS__TOKEN_FILE$'
expect_count "$f" "NATS CA (every component)" 5 '^ +value: /etc/herald/nats/ca/ca.crt$'
expect_count "$f" "NATS client certificates (api, worker-tasks, operator)" 3 '^ +value: /etc/herald/nats/client/tls.crt$'
[ "$(grep -A1 -- '- name: HERALD_NATS__MANAGE_TOPOLOGY$' "$f" | grep -c 'value: "true"')" = 1 ] || die "all-features: not exactly one component (the operator) manages the topology"
expect_count "$f" "NATS credential volumes and mounts (5 components)" 10 '^ +- name: herald-nats-auth$'

# The alerts: the rules of a PrometheusRule are its spec (a Prometheus rule
# file), which promtool checks and unit-tests.
rules_of() { # <rendered PrometheusRule> <rule file to write>
    awk '/^---/ { s = 0 } s { print } /^spec:$/ { s = 1 }' "$1" | sed 's/^  //' >"$2"
    grep -q '^groups:$' "$2" || die "$(basename "$1"): no rule groups under the PrometheusRule's spec"
}
check_rules() { # <name> <rule file>
    "$PROMTOOL" check rules --lint=all --lint-fatal "$2" >"$WORK/check-rules-$1.out" 2>&1 \
        || { cat "$WORK/check-rules-$1.out" >&2; die "promtool check rules ($1) failed"; }
    log "promtool check rules $1: $(grep -Eo 'SUCCESS: [0-9]+ rules found' "$WORK/check-rules-$1.out")"
}
f=$WORK/all-features.yaml
expect_count "$f" "PrometheusRules" 1 '^kind: PrometheusRule$'
expect_count "$f" "alerts (mailFailing turned off)" 5 '^ +- alert: Herald[A-Za-z]+$'
expect_count "$f" "alerts with the additional team label" 5 '^            team: platform$'
grep -q '(herald_consumer_pending_messages{namespace="herald"}) > 5000)$' "$f" || die "all-features: backlogGrowing.threshold is not in the rule"
render all-features-rules -f "$ALL" --show-only templates/prometheusrule.yaml
grep -q '^  namespace: monitoring$' "$WORK/all-features-rules.yaml" || die "prometheusRule.namespace: the PrometheusRule is not in it"
grep -q '^    release: kube-prometheus-stack$' "$WORK/all-features-rules.yaml" || die "prometheusRule.labels: not on the PrometheusRule"
rules_of "$WORK/all-features-rules.yaml" "$WORK/all-features-rules.rules.yaml"
check_rules all-features "$WORK/all-features-rules.rules.yaml"
# The unit tests run against the default thresholds, release and namespace.
render rules --set prometheusRule.enabled=true --show-only templates/prometheusrule.yaml
mkdir -p "$WORK/rule-tests"
rules_of "$WORK/rules.yaml" "$WORK/rule-tests/rules.yaml"
check_rules default "$WORK/rule-tests/rules.yaml"
cp "$CHART/tests/alerts.test.yaml" "$WORK/rule-tests/"
"$PROMTOOL" test rules "$WORK/rule-tests/alerts.test.yaml" >"$WORK/test-rules.out" 2>&1 \
    || { cat "$WORK/test-rules.out" >&2; die "promtool test rules (tests/alerts.test.yaml) failed"; }
alerts=$(grep -Eo '^ +- alert: Herald[A-Za-z]+$' "$WORK/rule-tests/rules.yaml" | awk '{print $3}' | sort -u)
for alert in $alerts; do
    [ "$(grep -c "alertname: $alert$" "$CHART/tests/alerts.test.yaml")" -ge 2 ] \
        || die "tests/alerts.test.yaml: $alert needs a case where it fires and one where it does not"
done
log "promtool test rules: $(echo "$alerts" | wc -l) alerts, $(grep -c '^  - name: ' "$CHART/tests/alerts.test.yaml") test groups pass"

# The dashboard: a ConfigMap with the sidecar's label, holding the JSON.
expect_count "$f" "dashboard ConfigMaps with the sidecar label" 1 '^    grafana_dashboard: "1"$'
render all-features-dashboards -f "$ALL" --show-only templates/dashboards.yaml
grep -q '^    grafana_folder: Herald$' "$WORK/all-features-dashboards.yaml" || die "dashboards.annotations: not on the ConfigMap"
awk '/^  herald.json: \|-$/ { s = 1; next } s' "$WORK/all-features-dashboards.yaml" | sed 's/^    //' >"$WORK/herald.json"
python3 -m json.tool "$WORK/herald.json" >/dev/null || die "the dashboard in the ConfigMap is not valid JSON"
cmp -s <(python3 -m json.tool "$WORK/herald.json") <(python3 -m json.tool "$CHART/dashboards/herald.json") \
    || die "the dashboard in the ConfigMap differs from dashboards/herald.json"
log "dashboard: $(grep -c '"type": "timeseries"' "$WORK/herald.json") panels, valid JSON"

render all-features-namespaced -f "$ALL" --set operator.clusterWide=false
check_common all-features-namespaced 5
expect_count "$WORK/all-features-namespaced.yaml" "ClusterRoles (the Namespace grant)" 1 '^kind: ClusterRole$'
render no-namespace-grants --set operator.tenancy.namespaceAnnotation=false
expect_count "$WORK/no-namespace-grants.yaml" "ClusterRoles without Namespace grants" 0 '^kind: ClusterRole$'
render granted --set-json 'operator.tenancy.namespaces={"team-a":["alice","team-a-*"]}'
grep -q '^    tenancy = { "namespace_annotation" = true, "namespaces" = { "team-a" = \["alice", "team-a-\*"\] } }$' "$WORK/granted.yaml" \
    || die "operator.tenancy.namespaces: not in config.toml"
expect_count "$WORK/all-features-namespaced.yaml" "Roles" 2 '^kind: Role$'

render other-watch-namespace --set operator.watchNamespace=tenants
grep -A3 '^kind: Role$' "$WORK/other-watch-namespace.yaml" | grep -q 'namespace: tenants$' \
    || die "operator.watchNamespace=tenants: no Role in namespace tenants"

if [ -n "$HAVE_NATS" ]; then
    render bundled-nats --set nats.enabled=true --set workers.webhooks.keda.enabled=true
    grep -q '^    url = "nats://herald-nats.herald.svc:4222"$' "$WORK/bundled-nats.yaml" || die "nats.enabled: Herald does not point at the bundled NATS"
    grep -q 'natsServerMonitoringEndpoint: "herald-nats-headless.herald.svc.cluster.local:8222"' "$WORK/bundled-nats.yaml" || die "nats.enabled: KEDA does not point at the bundled NATS monitoring endpoint"
    grep -q '^kind: StatefulSet$' "$WORK/bundled-nats.yaml" || die "nats.enabled: no NATS StatefulSet rendered"
fi

log "refused values"
expect_refused "api.replicas=abc (schema: type)" 'values don.t meet the specifications of the schema|schema' --set api.replicas=abc
expect_refused "image.pullPolicy=Sometimes (schema: enum)" 'schema' --set image.pullPolicy=Sometimes
expect_refused "config.log.format=xml (schema: enum)" 'schema' --set config.log.format=xml
expect_refused "an unknown top-level value (schema: additionalProperties)" 'schema' --set replicaCount=3
expect_refused "an unknown config key (schema: additionalProperties)" 'schema' --set config.webhooks.concurency=8
expect_refused "SMTP password in config (schema: use secrets.smtp)" 'schema' --set config.mail.password=x
expect_refused "config.operator.lease_name (schema: set by the chart)" 'schema' --set config.operator.lease_name=x
expect_refused "a malformed duration (schema: pattern)" 'schema' --set config.webhooks.timeout=soon
expect_refused "an SSRF allow entry that is no CIDR (schema: pattern)" 'schema' --set 'config.webhooks.ssrf.allow={localhost}'
expect_refused "a Secret both existing and inline" 'not both' --set secrets.apiTokens.existingSecret=x --set secrets.apiTokens.tokens=y
expect_refused "metrics_require_token without API tokens" 'needs secrets.apiTokens' --set config.api.metrics_require_token=true
expect_refused "terminationGracePeriodSeconds below the shutdown grace" 'must exceed shutdown.graceSeconds' --set shutdown.terminationGracePeriodSeconds=20
expect_refused "a tenancy pattern that is no user id (schema: pattern)" 'schema' --set-json 'operator.tenancy.namespaces={"team-a":["a.b"]}'
expect_refused "NATS password auth without its Secret (schema)" 'natsClient/components/api/secret' --set natsClient.components.api.auth=password --set natsClient.components.api.user=u --set natsClient.components.api.key=k
expect_refused "an unknown NATS auth method (schema: enum)" 'schema' --set natsClient.components.api.auth=kerberos
expect_refused "no component creates the topology" 'manageTopology' --set natsClient.components.operator.manageTopology=false
expect_refused "KEDA without a NATS monitoring endpoint" 'nats.monitoringEndpoint' --set workers.webhooks.keda.enabled=true
expect_refused "a failing-deliveries ratio above 1 (schema: maximum)" 'schema' --set prometheusRule.alerts.deliveriesFailing.ratio=2
expect_refused "a failing-deliveries ratio that is no number (schema: pattern)" 'schema' --set prometheusRule.alerts.deliveriesFailing.ratio=most
expect_refused "an alert duration Prometheus cannot parse (schema: pattern)" 'schema' --set prometheusRule.alerts.backlogGrowing.for=soon
expect_refused "an unknown alert (schema: additionalProperties)" 'schema' --set prometheusRule.alerts.diskFull.enabled=true

# The test NATS (deploy/nats/test-cluster): 1 or 3 servers, the local image.
NATS_CHART=deploy/nats/test-cluster
for replicas in 1 3; do
    helm_clean "nats-lint-$replicas" lint --strict "$NATS_CHART" --namespace "$NAMESPACE" --set image.tag=t --set replicas=$replicas
    helm_clean "nats-$replicas" template nats "$NATS_CHART" --namespace "$NAMESPACE" --set image.tag=t --set replicas=$replicas
    f=$WORK/nats-$replicas.out
    expect_count "$f" "NATS StatefulSet replicas" 1 "^  replicas: $replicas\$"
    expect_count "$f" "cluster routes" "$((replicas == 3 ? 3 : 0))" '^ +nats://nats-[0-2]\.nats-headless\.herald\.svc:6222$'
    expect_count "$f" "local image, never pulled" 1 '^ +imagePullPolicy: Never$'
    expect_count "$f" "volumeClaimTemplates" 1 '^  volumeClaimTemplates:$'
done
log "test NATS chart: 1 and 3 servers render"
if "$HELM" template nats "$NATS_CHART" --set image.tag=t --set replicas=2 >/dev/null 2>"$WORK/nats-2.err"; then
    die "test NATS with 2 servers: accepted, but must be refused"
fi
grep -q 'replicas must be 1 or 3' "$WORK/nats-2.err" || { cat "$WORK/nats-2.err" >&2; die "test NATS with 2 servers: refused for another reason"; }
if "$HELM" template nats "$NATS_CHART" >/dev/null 2>"$WORK/nats-notag.err"; then
    die "test NATS without image.tag: accepted, but must be refused"
fi
log "refused as expected: test NATS with 2 servers, and without an image tag"

log "OK"
