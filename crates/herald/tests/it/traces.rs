//! One trace across every hop: `herald api` and `herald worker` as separate
//! processes exporting to a real Jaeger (OTLP/HTTP from the API, OTLP/gRPC
//! from the workers), the trace context crossing NATS in message headers.

use std::{collections::HashMap, process::Stdio, time::Duration};

use herald_testkit::{Jaeger, Mailpit, NatsServer, ReceiverBehaviour, TestReceiver, wait_until};
use serde_json::{Value, json};

use crate::harness::{ALLOW_LOOPBACK_ENV, DEADLINE, TEST_KEY, add_endpoint_spec};

/// The client's own trace: Herald's spans must join it.
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// A span as Jaeger's query API returns it, with its tags as a map.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    /// The CHILD_OF reference: (trace id, span id).
    parent: Option<(String, String)>,
    /// The spans it links to (FOLLOWS_FROM): (trace id, span id).
    links: Vec<(String, String)>,
    name: String,
    tags: HashMap<String, String>,
    /// Start (unix microseconds) and duration (microseconds).
    start_us: u64,
    duration_us: u64,
}

impl Span {
    fn of(value: &Value) -> Span {
        // (trace id, span id) of each reference of kind `kind`.
        let references = |kind: &str| -> Vec<(String, String)> {
            value["references"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| r["refType"] == kind)
                .map(|r| {
                    (
                        r["traceID"].as_str().unwrap().to_string(),
                        r["spanID"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        };
        let parent = references("CHILD_OF").into_iter().next();
        let links = references("FOLLOWS_FROM");
        let tags = value["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|tag| {
                let value = match &tag["value"] {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (tag["key"].as_str().unwrap().to_string(), value)
            })
            .collect();
        Span {
            trace_id: value["traceID"].as_str().unwrap().to_string(),
            span_id: value["spanID"].as_str().unwrap().to_string(),
            parent,
            links,
            name: value["operationName"].as_str().unwrap().to_string(),
            tags,
            start_us: value["startTime"].as_u64().unwrap_or(0),
            duration_us: value["duration"].as_u64().unwrap_or(0),
        }
    }

    fn tag(&self, key: &str) -> &str {
        self.tags.get(key).map_or("", String::as_str)
    }

    fn parent_span(&self) -> &str {
        self.parent.as_ref().map_or("", |(_, span)| span.as_str())
    }
}

/// The spans as an indented tree under the client's span, each with its
/// start (from the first span), duration and the attributes that tell it
/// apart: for failure messages (and the trace in docs/observability.md).
fn tree(spans: &[Span]) -> String {
    let first = spans.iter().map(|s| s.start_us).min().unwrap_or(0);
    let mut out = String::new();
    let mut stack = vec![(CLIENT_SPAN.to_string(), 0)];
    while let Some((parent, depth)) = stack.pop() {
        if parent != CLIENT_SPAN {
            let span = spans.iter().find(|s| s.span_id == parent).unwrap();
            let shown: Vec<String> = [
                "herald.endpoint",
                "herald.attempt",
                "http.response.status_code",
                "herald.outcome",
            ]
            .iter()
            .filter(|key| !span.tag(key).is_empty())
            .map(|key| format!("{}={}", key.rsplit('.').next().unwrap(), span.tag(key)))
            .collect();
            out.push_str(&format!(
                "{}{} [{}] at +{:.1} ms, {:.1} ms: {}\n",
                "  ".repeat(depth - 1),
                span.name,
                span.span_id,
                span.start_us.saturating_sub(first) as f64 / 1000.0,
                span.duration_us as f64 / 1000.0,
                shown.join(" ")
            ));
        }
        let mut children: Vec<&Span> = spans.iter().filter(|s| s.parent_span() == parent).collect();
        // Popped in order: the earliest child first.
        children.sort_by_key(|s| std::cmp::Reverse(s.start_us));
        stack.extend(children.iter().map(|s| (s.span_id.clone(), depth + 1)));
    }
    out
}

/// `herald <args>` as a child process exporting traces as `env` says,
/// logging JSON to `log`; killed when dropped.
fn traced_herald(
    args: &[&str],
    env: &[(&str, String)],
    log: &std::path::Path,
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("HERALD_SECRETS__KEY", TEST_KEY)
        .env(ALLOW_LOOPBACK_ENV.0, ALLOW_LOOPBACK_ENV.1)
        .env("HERALD_LOG__FORMAT", "json")
        .env("HERALD_LOG__FILTER", "info")
        // Export within a fraction of a second, not the default 5 s.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald")
}

/// `herald api` and `herald worker <kinds>` as child processes, each
/// exporting as its variables say and logging JSON to `api.log` and
/// `worker.log` in `logs`; started once the API is ready.
struct TracedHerald {
    api_url: String,
    _api: tokio::process::Child,
    _workers: tokio::process::Child,
}

impl TracedHerald {
    async fn start(
        nats: &NatsServer,
        logs: &std::path::Path,
        api_env: &[(&str, String)],
        kinds: &str,
        worker_env: &[(&str, String)],
    ) -> TracedHerald {
        let api_port = herald_testkit::free_port();
        let api_url = format!("http://127.0.0.1:{api_port}");
        let listen = format!("127.0.0.1:{api_port}");
        let api = traced_herald(
            &["api", "--listen", &listen, "--nats-url", &nats.url()],
            api_env,
            &logs.join("api.log"),
        );
        let workers = traced_herald(
            &["worker", kinds, "--nats-url", &nats.url()],
            worker_env,
            &logs.join("worker.log"),
        );
        let http = herald_testkit::http_client();
        wait_until("the API to be ready", DEADLINE, || {
            let ready = http.get(format!("{api_url}/readyz")).send();
            async move { ready.await.ok()?.status().is_success().then_some(()) }
        })
        .await;
        TracedHerald {
            api_url,
            _api: api,
            _workers: workers,
        }
    }
}

/// Every span of `traces` (as the query API lists them).
fn spans_in(traces: &[Value]) -> Vec<Span> {
    traces
        .iter()
        .flat_map(|trace| trace["spans"].as_array().cloned().unwrap_or_default())
        .map(|span| Span::of(&span))
        .collect()
}

/// A task whose first endpoint fails once and then takes it, and whose
/// second endpoint keeps failing (so its owner is mailed), is one trace:
/// the client's span, then the API's request, the task, every attempt
/// (each retry the child of the attempt before it) and the mail.
#[tokio::test]
async fn one_trace_follows_a_task_from_the_client_to_its_last_attempt_and_mail() {
    let nats = NatsServer::start().await;
    let mailpit = Mailpit::start().await;
    let jaeger = Jaeger::start().await;
    let recovers = TestReceiver::start(ReceiverBehaviour::FailFirst {
        times: 1,
        status: 500,
    })
    .await;
    let fails = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    add_endpoint_spec(
        &nats,
        "recovers",
        json!({
            "userId": "alice",
            "url": recovers.url("/hook"),
            "email": "alice@example.com",
            "sendTraceContext": true,
        }),
    )
    .await;
    add_endpoint_spec(
        &nats,
        "fails",
        json!({ "userId": "alice", "url": fails.url("/hook"), "email": "alice@example.com" }),
    )
    .await;

    let logs = tempfile::tempdir().unwrap();
    let herald = TracedHerald::start(
        &nats,
        logs.path(),
        &[
            // The standard variables alone, over OTLP/HTTP.
            ("OTEL_EXPORTER_OTLP_ENDPOINT", jaeger.otlp_http_endpoint()),
            ("OTEL_SERVICE_NAME", "herald-api".to_string()),
        ],
        "tasks,webhooks,mail",
        &[
            // Herald's own configuration, over OTLP/gRPC.
            ("HERALD_TRACING__OTLP_ENDPOINT", jaeger.otlp_grpc_endpoint()),
            ("HERALD_TRACING__PROTOCOL", "grpc".to_string()),
            ("HERALD_TRACING__SERVICE_NAME", "herald-worker".to_string()),
            ("HERALD_WEBHOOKS__RETRY_SCHEDULE", r#"["50ms"]"#.to_string()),
            ("HERALD_MAIL__SMTP_PORT", mailpit.smtp_port().to_string()),
        ],
    )
    .await;
    let api_url = &herald.api_url;
    let http = herald_testkit::http_client();

    let response = http
        .post(format!("{api_url}/users/alice/tasks/echo"))
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&json!({ "hello": "traces" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let task_id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // API request, task, two attempts on each endpoint, the mail.
    let complete = |spans: &[Span]| {
        let attempts = spans.iter().filter(|s| s.name == "webhook attempt").count();
        let mails = spans.iter().filter(|s| s.name.starts_with("mail ")).count();
        spans.len() >= 7 && attempts >= 4 && mails >= 1
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let spans = loop {
        let spans: Vec<Span> = jaeger
            .trace(CLIENT_TRACE)
            .await
            .and_then(|trace| Some(trace["spans"].as_array()?.iter().map(Span::of).collect()))
            .unwrap_or_default();
        if complete(&spans) {
            break spans;
        }
        if tokio::time::Instant::now() > deadline {
            let read = |name: &str| std::fs::read_to_string(logs.path().join(name)).unwrap();
            panic!(
                "the trace is incomplete after 60 s: {:?}\n--- api log\n{}\n--- worker log\n{}\n--- jaeger log\n{}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>(),
                read("api.log"),
                read("worker.log"),
                jaeger.log(),
            );
        }
        // Polling Jaeger's query API, not waiting for something to happen.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert!(
        spans.iter().all(|s| s.trace_id == CLIENT_TRACE),
        "every span is in the client's trace: {spans:#?}"
    );
    let one = |name: &str| -> &Span {
        let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name:?} span in {names:?}");
        found[0]
    };

    let request = one("POST /users/{user}/tasks/{task}");
    assert_eq!(
        request.parent,
        Some((CLIENT_TRACE.to_string(), CLIENT_SPAN.to_string())),
        "the API's span continues the client's"
    );
    assert_eq!(request.tag("http.response.status_code"), "201");
    assert_eq!(request.tag("span.kind"), "server");

    let task = one("task echo");
    assert_eq!(
        task.parent_span(),
        request.span_id,
        "the task follows the request"
    );
    assert_eq!(task.tag("herald.outcome"), "completed");

    let attempts_of = |endpoint: &str| -> Vec<&Span> {
        let mut attempts: Vec<&Span> = spans
            .iter()
            .filter(|s| s.name == "webhook attempt" && s.tag("herald.endpoint") == endpoint)
            .collect();
        attempts.sort_by_key(|s| s.tag("herald.attempt").to_string());
        attempts
    };
    // Endpoint ids are `<namespace>_<name>`.
    for endpoint in ["default_recovers", "default_fails"] {
        let attempts = attempts_of(endpoint);
        assert_eq!(
            attempts.len(),
            2,
            "two attempts of {endpoint}:\n{}",
            tree(&spans)
        );
        assert_eq!(attempts[0].tag("herald.attempt"), "1");
        assert_eq!(
            attempts[0].parent_span(),
            task.span_id,
            "the first attempt of {endpoint} follows the task"
        );
        assert_eq!(
            attempts[1].parent_span(),
            attempts[0].span_id,
            "the retry of {endpoint} follows the attempt that scheduled it"
        );
        assert_eq!(attempts[0].tag("http.response.status_code"), "500");
        assert_eq!(attempts[0].tag("herald.outcome"), "retrying");
        assert_eq!(attempts[0].tag("herald.ssrf"), "allowed");
        assert_eq!(attempts[0].tag("span.kind"), "client");
    }
    let [_, delivered] = attempts_of("default_recovers")[..] else {
        unreachable!()
    };
    assert_eq!(delivered.tag("herald.outcome"), "delivered");
    assert_eq!(delivered.tag("http.response.status_code"), "200");
    let [_, exhausted] = attempts_of("default_fails")[..] else {
        unreachable!()
    };
    assert_eq!(exhausted.tag("herald.outcome"), "exhausted");

    let mail = one("mail attempts_exhausted");
    assert_eq!(
        mail.parent_span(),
        exhausted.span_id,
        "the mail follows the attempt that ended"
    );
    assert_eq!(mail.tag("herald.outcome"), "sent");

    // The endpoint that asked for it gets the attempt's traceparent; the
    // other gets none (off by default).
    let received = recovers.received();
    assert_eq!(received.len(), 2);
    let traceparent = received[1].headers.get("traceparent").unwrap();
    assert_eq!(
        traceparent,
        &format!("00-{CLIENT_TRACE}-{}-01", delivered.span_id),
        "the request carries its attempt's span"
    );
    assert!(
        fails
            .received()
            .iter()
            .all(|r| !r.headers.contains_key("traceparent")),
        "an endpoint that did not ask gets no trace context"
    );

    // JSON log lines inside a span name its trace and span.
    let api_log = std::fs::read_to_string(logs.path().join("api.log")).unwrap();
    let access = api_log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["target"] == "herald::access" && line["fields"]["status"] == 201)
        .unwrap_or_else(|| panic!("no access line for the POST in {api_log}"));
    assert_eq!(access["trace_id"], CLIENT_TRACE, "{access}");
    assert_eq!(access["span_id"], request.span_id.as_str(), "{access}");
    let worker_log = std::fs::read_to_string(logs.path().join("worker.log")).unwrap();
    let mailed = worker_log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["fields"]["message"] == "failure mail sent")
        .unwrap_or_else(|| panic!("no mail line in {worker_log}"));
    assert_eq!(mailed["trace_id"], CLIENT_TRACE, "{mailed}");
    assert_eq!(mailed["span_id"], mail.span_id.as_str(), "{mailed}");

    // A replay is a trace of its own, started by the request that asked for
    // it, linked to the task it repeats.
    let response = http
        .post(format!("{api_url}/users/alice/tasks/{task_id}/redeliver"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    let replay = wait_until("the replay's span in Jaeger", DEADLINE, || {
        let traces = jaeger.traces("herald-worker");
        async move {
            spans_in(&traces.await)
                .into_iter()
                .find(|span| span.name == "replay")
        }
    })
    .await;
    assert_ne!(
        replay.trace_id, CLIENT_TRACE,
        "a replay is a trace of its own"
    );
    assert_eq!(
        replay.links,
        vec![(CLIENT_TRACE.to_string(), task.span_id.clone())],
        "the replay links to the task it repeats"
    );

    // A traceparent that is not one starts a new trace; it is never an
    // error, and probes are never traced.
    let response = http
        .post(format!("{api_url}/users/alice/tasks/echo"))
        .header("traceparent", "00-not-a-trace-01")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let api_traces = wait_until("the second request's trace", DEADLINE, || {
        let traces = jaeger.traces("herald-api");
        async move {
            let traces = traces.await;
            (traces.len() >= 3).then_some(traces)
        }
    })
    .await;
    let api_spans = spans_in(&api_traces);
    let fresh = api_spans
        .iter()
        .find(|s| {
            s.name.starts_with("POST /users/{user}/tasks/{task}")
                && s.trace_id != CLIENT_TRACE
                && s.parent.is_none()
        })
        .unwrap_or_else(|| panic!("no new root span for the bad traceparent: {api_spans:#?}"));
    assert_eq!(fresh.tag("http.response.status_code"), "201");
    assert!(
        api_spans
            .iter()
            .all(|s| !s.name.contains("readyz") && !s.name.contains("healthz")),
        "probes are not traced: {api_spans:#?}"
    );
}

/// A collector that is down (nothing listens at its port) costs no
/// delivery and no request: spans that cannot be sent are dropped by the
/// exporter, off the hot path.
#[tokio::test]
async fn a_collector_that_is_down_loses_no_task() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint_spec(
        &nats,
        "hooks",
        json!({ "userId": "bob", "url": receiver.url("/hook"), "sendTraceContext": true }),
    )
    .await;
    let logs = tempfile::tempdir().unwrap();
    let nowhere = format!("http://127.0.0.1:{}", herald_testkit::free_port());
    let herald = TracedHerald::start(
        &nats,
        logs.path(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", nowhere.clone())],
        "tasks,webhooks",
        &[
            ("HERALD_TRACING__OTLP_ENDPOINT", nowhere),
            ("HERALD_TRACING__PROTOCOL", "grpc".to_string()),
        ],
    )
    .await;
    let api_url = &herald.api_url;
    let http = herald_testkit::http_client();
    for n in 0..20 {
        let response = http
            .post(format!("{api_url}/users/bob/tasks/echo"))
            .json(&json!({ "n": n }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    let received = receiver.wait_for(20, DEADLINE).await;
    assert_eq!(received.len(), 20);
    // Traced all the same: the receiver that asked sees each attempt's
    // trace context, even though no span reached a collector.
    assert!(
        received.iter().all(|r| r
            .headers
            .get("traceparent")
            .is_some_and(|t| t.starts_with("00-") && t.len() == 55)),
        "{received:?}"
    );
}
