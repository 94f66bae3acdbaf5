//! What every role serves at `/metrics` passes `promtool check metrics`
//! (the linter Prometheus ships), and the chart's Grafana dashboard and
//! alerts use only metrics Herald really serves, or kube-state-metrics'.
//!
//! Each role runs as its own process, as in a cluster, against a real
//! nats-server, mailpit, loopback receivers and a kube-apiserver for the
//! operator; traffic first, so that labelled samples exist to lint.

use std::{
    collections::BTreeSet,
    path::Path,
    process::{Output, Stdio},
};

use herald_testkit::{
    ControlPlane, Mailpit, NatsServer, ReceiverBehaviour, TestReceiver, free_port, http_client,
    tool, wait_until,
};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::{
    chart::{chart_without_nats_dependency, succeeded},
    harness::{ALLOW_LOOPBACK_ENV, DEADLINE, TEST_KEY},
    operator::{apply_ok, grant, install_crd, operator_process_with},
    promql::promql_metric_names,
};

/// Metrics the dashboard and alerts may use that Herald does not serve:
/// kube-state-metrics' Deployment replicas (docs/observability.md).
const KUBE_STATE_METRICS: &[&str] = &[
    "kube_deployment_spec_replicas",
    "kube_deployment_status_replicas_available",
];

/// What Prometheus 3 sends by default (its scrape_protocols, in order).
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,\
    application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;q=0.3,\
    text/plain;version=0.0.4;q=0.2,*/*;q=0.1";

/// One Herald role as a child process, and where it serves `/metrics`.
struct Role {
    name: &'static str,
    metrics: String,
    _process: tokio::process::Child,
}

/// `herald <args>` configured as the chart configures a pod: NATS, the
/// encryption key, quick retries, loopback receivers allowed.
fn herald(nats: &NatsServer, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("HERALD_NATS__URL", nats.url())
        .env("HERALD_SECRETS__KEY", TEST_KEY)
        .env(ALLOW_LOOPBACK_ENV.0, ALLOW_LOOPBACK_ENV.1)
        .env("HERALD_WEBHOOKS__RETRY_SCHEDULE", r#"["10ms"]"#)
        .env("HERALD_MAIL__RETRY_SCHEDULE", "[]")
        .env("HERALD_LOG__FILTER", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald")
}

fn worker(nats: &NatsServer, name: &'static str, env: &[(&str, &str)]) -> Role {
    let probes = format!("127.0.0.1:{}", free_port());
    let env: Vec<_> = env
        .iter()
        .copied()
        .chain([("HERALD_HEALTH__LISTEN", probes.as_str())])
        .collect();
    Role {
        name,
        metrics: format!("http://{probes}/metrics"),
        _process: herald(nats, &["worker", name], &env),
    }
}

fn endpoint_yaml(name: &str, user: &str, url: &str, email: Option<&str>) -> String {
    let email = email.map_or(String::new(), |e| format!("  email: {e}\n"));
    format!(
        "apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  userId: '{user}'\n  url: '{url}'\n{email}"
    )
}

/// The body of `url`, once it answers 200 with `wanted` in it.
async fn scrape_once(http: &reqwest::Client, url: &str, wanted: &str) -> String {
    wait_until(&format!("{url} to show {wanted}"), DEADLINE, || async {
        let response = http.get(url).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let text = response.text().await.ok()?;
        text.contains(wanted).then_some(text)
    })
    .await
}

/// `promtool check metrics` on `exposition` (its stdin), as the Prometheus
/// docs suggest: `curl -s .../metrics | promtool check metrics`.
async fn promtool_check_metrics(exposition: &str) -> Output {
    let mut child = tokio::process::Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(exposition.as_bytes()).await.unwrap();
    drop(stdin);
    child.wait_with_output().await.unwrap()
}

#[tokio::test]
async fn every_role_serves_metrics_promtool_accepts_and_the_chart_uses_only_those() {
    let cp = ControlPlane::start().await;
    let mut nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let ok = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let broken = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    install_crd(&cp);
    grant(&cp, "default", "*");
    let owner = "owner-metrics@example.com";
    for yaml in [
        endpoint_yaml("ok", "m1", &ok.url("/hooks"), None),
        // Fails for good and its owner is mailed.
        endpoint_yaml("broken", "m2", &broken.url("/hooks"), Some(owner)),
        // Refused by the SSRF guard (a private address, not allowed): no
        // packet leaves the machine.
        endpoint_yaml("private", "m3", "http://10.255.255.1/hooks", None),
    ] {
        apply_ok(&cp, &yaml);
    }

    let operator_probes = format!("127.0.0.1:{}", free_port());
    let api_listen = format!("127.0.0.1:{}", free_port());
    let smtp_port = mail.smtp_port().to_string();
    // The operator first: it creates the streams and writes the endpoints.
    let operator = Role {
        name: "operator",
        metrics: format!("http://{operator_probes}/metrics"),
        _process: operator_process_with(
            &cp,
            &nats,
            "operator-metrics",
            &[("HERALD_HEALTH__LISTEN", &operator_probes)],
        ),
    };
    let http = http_client();
    scrape_once(
        &http,
        &operator.metrics,
        "herald_endpoints{state=\"active\"} 3",
    )
    .await;
    let roles = [
        Role {
            name: "api",
            metrics: format!("http://{api_listen}/metrics"),
            _process: herald(&nats, &["api", "--listen", &api_listen], &[]),
        },
        worker(&nats, "tasks", &[]),
        worker(&nats, "webhooks", &[]),
        worker(&nats, "mail", &[("HERALD_MAIL__SMTP_PORT", &smtp_port)]),
        operator,
    ];
    let api = format!("http://{api_listen}");
    wait_until("the API to be ready", DEADLINE, || async {
        let response = http.get(format!("{api}/readyz")).send().await.ok()?;
        response.status().is_success().then_some(())
    })
    .await;

    for (user, state) in [("m1", "delivered"), ("m2", "mailed"), ("m3", "undelivered")] {
        let response = http
            .post(format!("{api}/users/{user}/tasks/echo"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let id = response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        wait_until(
            &format!("task {id} of {user} to be {state}"),
            DEADLINE,
            || async {
                let task: Value = http
                    .get(format!("{api}/users/{user}/tasks/{id}"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (task["state"] == state).then_some(())
            },
        )
        .await;
    }
    mail.wait_for_messages(owner, 1, DEADLINE).await;
    // A reconcile that fails, for its counter: without NATS the operator
    // cannot write the changed record. NATS comes back before the scrapes.
    nats.stop().await;
    apply_ok(&cp, &endpoint_yaml("ok", "m1", &ok.url("/changed"), None));
    let operator = roles.iter().find(|role| role.name == "operator").unwrap();
    scrape_once(
        &http,
        &operator.metrics,
        "herald_operator_reconcile_failures_total{error=\"record_write\"}",
    )
    .await;
    nats.start_again().await;

    // What each role counted, and nothing promtool objects to.
    let wanted = [
        ("api", "herald_tasks_accepted_total 3"),
        (
            "tasks",
            "herald_tasks_handled_total{outcome=\"completed\"} 3",
        ),
        (
            "webhooks",
            "herald_ssrf_refusals_total{range=\"private, RFC 1918\"}",
        ),
        ("mail", "herald_mails_total{outcome=\"sent\"} 1"),
        ("operator", "herald_operator_reconcile_failures_total"),
    ];
    let mut exported = BTreeSet::new();
    for role in &roles {
        let (_, sample) = wanted.iter().find(|(name, _)| *name == role.name).unwrap();
        // As `curl` asks: the classic text format, what promtool parses.
        let text = scrape_once(&http, &role.metrics, sample).await;
        let checked = promtool_check_metrics(&text).await;
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
        assert!(
            checked.status.success() && report.trim().is_empty(),
            "promtool check metrics on the {} role's /metrics ({}): {report}\nwhat it served:\n{text}",
            role.name,
            checked.status
        );
        // As Prometheus asks: OpenMetrics, with the same series.
        let response = http
            .get(&role.metrics)
            .header("accept", PROMETHEUS_ACCEPT)
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["content-type"],
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        let openmetrics = response.text().await.unwrap();
        assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
        assert_eq!(
            series(&openmetrics),
            series(&text),
            "the {} role's two formats differ",
            role.name
        );
        exported.extend(series_names(&text));
    }

    let chart_dir = tempfile::tempdir().unwrap();
    let chart = chart_without_nats_dependency(chart_dir.path());
    let used = metrics_used_by_the_chart(&cp, &chart);
    let unknown: Vec<_> = used
        .iter()
        .filter(|name| !exported.contains(*name) && !KUBE_STATE_METRICS.contains(&name.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "the dashboard or alerts use metrics nothing serves: {unknown:?}\nHerald serves {exported:?}"
    );
    // And the dashboard shows every family Herald serves.
    let dashboard = dashboard_metrics(&chart.join("dashboards/herald.json"));
    let missing: Vec<_> = families(&exported)
        .into_iter()
        .filter(|family| !dashboard.iter().any(|used| family_of(used) == *family))
        .collect();
    assert!(missing.is_empty(), "no dashboard panel shows {missing:?}");
}

/// Every series name an exposition can hold, from its `# TYPE` lines: a
/// counter `x` is served as `x_total`, a histogram as `x_bucket`, `x_sum`
/// and `x_count`. Families without a sample yet count too: a dashboard may
/// show a metric before its first event.
fn series_names(exposition: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            panic!("a TYPE line without a name and type: {line}");
        };
        let suffixes: &[&str] = match kind {
            // The classic text format types the series' own name.
            "counter" if name.ends_with("_total") => &[""],
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "summary" => &["", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
    }
    names
}

/// The series of an exposition (names and labels, without values: gauges
/// move between two scrapes).
fn series(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.rsplit_once(' ').map(|(series, _)| series.to_string()))
        .collect()
}

/// Families (names without their series suffix) of Herald's series.
fn families(series: &BTreeSet<String>) -> BTreeSet<String> {
    series
        .iter()
        .filter(|name| name.starts_with("herald_"))
        .map(|name| family_of(name).to_string())
        .collect()
}

fn family_of(series: &str) -> &str {
    ["_bucket", "_sum", "_count", "_total"]
        .iter()
        .find_map(|suffix| series.strip_suffix(suffix))
        .unwrap_or(series)
}

/// Every metric name in the dashboard's queries and in the alert rules the
/// chart renders with every feature on.
fn metrics_used_by_the_chart(cp: &ControlPlane, chart: &Path) -> BTreeSet<String> {
    let values = chart.join("ci/all-features-values.yaml");
    let rendered = succeeded(
        "helm template",
        &cp.helm([
            "template".as_ref(),
            "herald".as_ref(),
            chart.as_os_str(),
            "--namespace".as_ref(),
            "herald".as_ref(),
            "-f".as_ref(),
            values.as_os_str(),
            "--set".as_ref(),
            "prometheusRule.alerts.mailFailing.enabled=true".as_ref(),
            "--show-only".as_ref(),
            "templates/prometheusrule.yaml".as_ref(),
        ]),
    );
    let rule: Value = serde_norway::from_str(&rendered).unwrap();
    let mut used = BTreeSet::new();
    let mut alerts = 0;
    for group in rule["spec"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            alerts += 1;
            let expr = rule["expr"].as_str().unwrap();
            let names = promql_metric_names(expr);
            assert!(!names.is_empty(), "no metric in {expr}");
            used.extend(names);
        }
    }
    assert_eq!(alerts, 6, "{rendered}");
    used.extend(dashboard_metrics(&chart.join("dashboards/herald.json")));
    used
}

/// The metric names of every panel query and template variable query of
/// the dashboard at `path`.
fn dashboard_metrics(path: &Path) -> BTreeSet<String> {
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    let mut queries = 0;
    let mut visit = |expr: &str| {
        queries += 1;
        let names = promql_metric_names(expr);
        assert!(!names.is_empty(), "no metric in {expr}");
        used.extend(names);
    };
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            visit(target["expr"].as_str().unwrap());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        // Grafana's label_values(<series selector>, <label>).
        if let Some(query) = variable["query"]["query"].as_str() {
            let selector = query
                .strip_prefix("label_values(")
                .and_then(|rest| rest.rsplit_once(','))
                .map(|(selector, _)| selector)
                .unwrap_or_else(|| panic!("a variable query that is no label_values: {query}"));
            visit(selector);
        }
    }
    assert!(queries > 10, "the dashboard has only {queries} queries");
    used
}
