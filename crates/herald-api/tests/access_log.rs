//! The access log and `x-request-id`: one JSON line per request naming the
//! route template, the status and the request id, which the response
//! carries back; a hostile id from the client is replaced, never echoed or
//! logged.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use axum::{body::Body, http::Request};
use herald_api::{ApiConfig, AppState, router};
use serde_json::Value;
use tower::ServiceExt;

/// Log output, shared with the subscriber.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn access_lines(&self) -> Vec<Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap())
            .filter(|line| line["target"] == "herald::access")
            .collect()
    }
}

async fn app() -> axum::Router {
    // Nothing listens on port 9: the broker stays disconnected.
    let broker = herald_queue::connect("nats://127.0.0.1:9", "access-log-test")
        .await
        .unwrap();
    router(AppState::new(broker, ApiConfig::default()).unwrap())
}

async fn request_id_of(app: &axum::Router, request: Request<Body>) -> (u16, String) {
    let response = app.clone().oneshot(request).await.unwrap();
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    (response.status().as_u16(), id)
}

#[tokio::test]
async fn every_request_is_one_line_with_its_route_status_and_id() {
    let captured = Captured::default();
    let writer = captured.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_writer(move || writer.clone())
            .finish(),
    );
    let app = app().await;

    // The client's id is kept and returned.
    let (status, id) = request_id_of(
        &app,
        Request::get("/users/alice/tasks/t-1")
            .header("x-request-id", "proxy-7f3a")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(id, "proxy-7f3a");
    assert_eq!(status, 503, "the broker is down");

    // A hostile one is replaced by a fresh id.
    let hostile = format!("evil\" injected=1 {}", "x".repeat(300));
    let (_, replaced) = request_id_of(
        &app,
        Request::get("/healthz")
            .header("x-request-id", hostile.as_str())
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_ne!(replaced, hostile);
    assert!(replaced.len() <= 128 && !replaced.is_empty(), "{replaced}");

    // No id at all: one is made, and every answer differs.
    let (status, made) = request_id_of(
        &app,
        Request::get("/no/such/route").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    assert!(!made.is_empty() && made != replaced);

    let lines = captured.access_lines();
    assert_eq!(lines.len(), 3, "one line per request: {lines:#?}");
    let field = |line: &Value, name: &str| line["fields"][name].clone();
    assert_eq!(field(&lines[0], "route"), "/users/{user}/tasks/{task}");
    assert_eq!(field(&lines[0], "method"), "GET");
    assert_eq!(field(&lines[0], "status"), 503);
    assert!(field(&lines[0], "latency_ms").as_f64().is_some());
    assert_eq!(lines[0]["span"]["request_id"], "proxy-7f3a");
    assert_eq!(field(&lines[1], "route"), "/healthz");
    assert_eq!(lines[1]["span"]["request_id"], replaced.as_str());
    assert_eq!(
        field(&lines[2], "route"),
        "unmatched",
        "the path itself is never logged"
    );
    assert_eq!(field(&lines[2], "status"), 404);
    let all = serde_json::to_string(&lines).unwrap();
    assert!(
        !all.contains("evil") && !all.contains("alice") && !all.contains("/no/such"),
        "{all}"
    );
}
