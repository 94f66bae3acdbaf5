//! Jaeger v2 all-in-one: a real OpenTelemetry trace collector (OTLP over
//! gRPC and HTTP) keeping traces in memory, read back through its query
//! HTTP API.
//!
//! The binary is built from its Go module by `scripts/install-tools.sh`
//! (tools/observability). Every listener is on a free loopback port, named
//! in a configuration file written to a temporary directory: tests running
//! side by side each get their own collector, and none of Jaeger's default
//! ports (4317, 16686, 8888...) is ever opened.

use std::time::Duration;

use serde_json::Value;
use tempfile::TempDir;

use crate::{free_port, process::ChildProcess, tool, wait_until};

const STARTUP: Duration = Duration::from_secs(60);

pub struct Jaeger {
    otlp_grpc_port: u16,
    otlp_http_port: u16,
    query_port: u16,
    http: reqwest::Client,
    process: ChildProcess,
    _dir: TempDir,
}

/// The collector's configuration (`jaeger.yaml`, which `make bench` uses
/// too) with its ports: no batch processor, so a span is queryable as soon
/// as it is received.
fn config_yaml(
    otlp_grpc: u16,
    otlp_http: u16,
    query_http: u16,
    query_grpc: u16,
    health: u16,
) -> String {
    include_str!("jaeger.yaml")
        .replace("{otlp_grpc}", &otlp_grpc.to_string())
        .replace("{otlp_http}", &otlp_http.to_string())
        .replace("{query_http}", &query_http.to_string())
        .replace("{query_grpc}", &query_grpc.to_string())
        .replace("{health}", &health.to_string())
}

impl Jaeger {
    /// Starts the collector and waits until its health check, query API and
    /// both OTLP receivers answer. Panics naming `make tools` when the
    /// binary is not installed, and with the collector's log when it exits.
    pub async fn start() -> Jaeger {
        let program = tool("jaeger");
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let (otlp_grpc_port, otlp_http_port) = (free_port(), free_port());
        let (query_port, query_grpc_port, health_port) = (free_port(), free_port(), free_port());
        let config = dir.path().join("jaeger.yaml");
        std::fs::write(
            &config,
            config_yaml(
                otlp_grpc_port,
                otlp_http_port,
                query_port,
                query_grpc_port,
                health_port,
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let args = [format!("--config={}", config.display())];
        let log = dir.path().join("jaeger.log");
        let mut process = ChildProcess::spawn("jaeger", &program, &args, log);
        let http = crate::http_client();
        for (what, url) in [
            (
                "jaeger's health check to pass",
                format!("http://127.0.0.1:{health_port}/status"),
            ),
            (
                "jaeger's query API to answer",
                format!("http://127.0.0.1:{query_port}/api/services"),
            ),
        ] {
            wait_until(what, STARTUP, || {
                process.assert_running();
                let request = http.get(&url).send();
                async move { request.await.ok()?.status().is_success().then_some(()) }
            })
            .await;
        }
        for (what, port) in [
            ("jaeger's OTLP gRPC port to accept", otlp_grpc_port),
            ("jaeger's OTLP HTTP port to accept", otlp_http_port),
        ] {
            wait_until(what, STARTUP, || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(drop)
            })
            .await;
        }
        Jaeger {
            otlp_grpc_port,
            otlp_http_port,
            query_port,
            http,
            process,
            _dir: dir,
        }
    }

    /// Where OTLP/gRPC exporters send (`OTEL_EXPORTER_OTLP_ENDPOINT` with
    /// `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`).
    pub fn otlp_grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_grpc_port)
    }

    /// The base of the OTLP/HTTP receiver: exporters append `/v1/traces`
    /// (`OTEL_EXPORTER_OTLP_ENDPOINT` with `http/protobuf` or `http/json`).
    pub fn otlp_http_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.otlp_http_port)
    }

    /// The query API's base URL (`/api/traces`, `/api/services`...).
    pub fn query_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.query_port)
    }

    /// The collector's log so far, for a failing test's message.
    pub fn log(&self) -> String {
        self.process.log_tail()
    }

    /// The trace `trace_id_hex` (32 hex digits) as Jaeger's query API
    /// returns it (`/api/traces/{id}`: an object with `traceID`, `spans`,
    /// each with `spanID`, `operationName`, `references`, `tags`,
    /// `processID`, and `processes` naming each span's service); `None`
    /// while Jaeger has none of its spans. Every trace id in it is 32 hex
    /// digits, as OpenTelemetry writes them: this API leaves out leading
    /// zeros.
    pub async fn trace(&self, trace_id_hex: &str) -> Option<Value> {
        let url = format!("{}/api/traces/{trace_id_hex}", self.query_url());
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("jaeger did not answer {url}: {e}"));
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return None;
        }
        first_trace(self.answer(&url, response).await).map(with_full_trace_ids)
    }

    /// Waits until the trace `trace_id_hex` has at least `spans` spans (a
    /// trace's spans arrive from several processes, each exporting on its
    /// own schedule); returns it.
    pub async fn wait_for_trace(
        &self,
        trace_id_hex: &str,
        spans: usize,
        deadline: Duration,
    ) -> Value {
        let what = format!("trace {trace_id_hex} to have {spans} spans in jaeger");
        wait_until(&what, deadline, || async {
            let trace = self.trace(trace_id_hex).await?;
            (span_count(&trace) >= spans).then_some(trace)
        })
        .await
    }

    /// The traces with a span of `service` (its `service.name`) from the
    /// last hour, newest first, as [`trace`](Self::trace) returns each.
    pub async fn traces(&self, service: &str) -> Vec<Value> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/traces", self.query_url()),
            [("service", service), ("lookback", "1h"), ("limit", "1000")],
        )
        .expect("the query URL is valid");
        let response = self
            .http
            .get(url.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("jaeger did not answer {url}: {e}"));
        match self.answer(url.as_str(), response).await {
            Value::Object(mut answer) => match answer.remove("data") {
                Some(Value::Array(traces)) => traces.into_iter().map(with_full_trace_ids).collect(),
                Some(Value::Null) | None => Vec::new(),
                Some(other) => panic!("jaeger's {url} answered data that is no list: {other}"),
            },
            other => panic!("jaeger's {url} answered no object: {other}"),
        }
    }

    /// The names of the services Jaeger has spans of.
    pub async fn services(&self) -> Vec<String> {
        let url = format!("{}/api/services", self.query_url());
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("jaeger did not answer {url}: {e}"));
        let answer = self.answer(&url, response).await;
        answer["data"]
            .as_array()
            .map(|names| {
                names
                    .iter()
                    .filter_map(|name| name.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn answer(&self, url: &str, response: reqwest::Response) -> Value {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "jaeger answered {status} to {url}: {body}\njaeger's log:\n{}",
            self.log()
        );
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("jaeger's answer to {url} is no JSON ({e}): {body}"))
    }
}

/// `data[0]` of a query answer: the one trace asked for by id.
fn first_trace(answer: Value) -> Option<Value> {
    match answer {
        Value::Object(mut answer) => match answer.remove("data") {
            Some(Value::Array(traces)) => traces.into_iter().next(),
            _ => None,
        },
        _ => None,
    }
}

/// `trace` with its trace ids (its own, its spans', their references')
/// left-padded to 32 hex digits: Jaeger's v1 query API prints the high 64
/// bits without leading zeros (and leaves them out when zero), so a
/// random id starting with a 0 would otherwise never equal the one sent.
fn with_full_trace_ids(mut trace: Value) -> Value {
    fn pad(id: &mut Value) {
        if let Some(hex) = id.as_str() {
            *id = Value::String(format!("{hex:0>32}"));
        }
    }
    pad(&mut trace["traceID"]);
    for span in trace["spans"].as_array_mut().into_iter().flatten() {
        pad(&mut span["traceID"]);
        for reference in span["references"].as_array_mut().into_iter().flatten() {
            pad(&mut reference["traceID"]);
        }
    }
    trace
}

/// How many spans a trace of the query API holds.
pub fn span_count(trace: &Value) -> usize {
    trace["spans"].as_array().map_or(0, Vec::len)
}
