//! The router on its own (`oneshot`, no server): every bad input gets its
//! 4xx and a JSON error, and a broker that is down gives 503. The broker
//! here points at a port where nothing listens, so any request that got past
//! validation would have to answer 503, never 201.

// Helpers as well as tests panic on an unexpected answer: that is the failure.
#![allow(clippy::unwrap_used)]

use axum::{
    body::{Body, to_bytes},
    http::{Request, StatusCode},
};
use herald_api::{ApiConfig, AppState, router};
use serde_json::Value;
use tower::ServiceExt;

async fn app() -> axum::Router {
    // Port 9 (discard) on loopback: nothing answers, the client stays disconnected.
    let broker = herald_queue::connect("nats://127.0.0.1:9", "router-test")
        .await
        .unwrap();
    router(
        AppState::new(
            broker,
            ApiConfig {
                max_body_bytes: 1024,
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

async fn send(request: Request<Body>) -> (StatusCode, Value) {
    let response = app().await.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let body: Value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {bytes:?}"));
    (status, body)
}

fn post(uri: &str, content_type: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut builder = Request::post(uri);
    if let Some(ct) = content_type {
        builder = builder.header("content-type", ct);
    }
    builder.body(body.into()).unwrap()
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn malformed_json_is_400() {
    let (status, body) = send(post(
        "/users/1/tasks/echo",
        Some("application/json"),
        "{not json",
    ))
    .await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_json");
}

#[tokio::test]
async fn oversized_body_is_413_with_or_without_content_length() {
    let big = format!("\"{}\"", "x".repeat(2048));
    let (status, body) = send(post(
        "/users/1/tasks/echo",
        Some("application/json"),
        big.clone(),
    ))
    .await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    // No Content-Length: the limit must hold while reading the stream.
    let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(big)];
    let streamed = Body::from_stream(futures::stream::iter(chunks));
    let (status, body) = send(post(
        "/users/1/tasks/echo",
        Some("application/json"),
        streamed,
    ))
    .await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
}

#[tokio::test]
async fn unsafe_subject_tokens_are_400() {
    for uri in [
        "/users/a.b/tasks/echo",
        "/users/1/tasks/ec*ho",
        "/users/1/tasks/%3E",
        "/users/%20/tasks/echo",
        "/users/%C3%BC/tasks/echo",
    ] {
        let (status, body) = send(post(uri, Some("application/json"), "{}")).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    }
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let (status, body) = send(post("/users/1/tasks/echo", ct, "{}")).await;
        assert_error(
            status,
            &body,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        );
    }
}

#[tokio::test]
async fn bad_idempotency_key_is_400() {
    let request = Request::post("/users/1/tasks/echo")
        .header("content-type", "application/json")
        .header("idempotency-key", "x".repeat(300))
        .body(Body::from("{}"))
        .unwrap();
    let (status, body) = send(request).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn valid_task_without_nats_is_503_not_accepted() {
    for ct in [
        "application/json",
        "application/json; charset=utf-8",
        "application/cloudevents+json",
    ] {
        let (status, body) = send(post("/users/1/tasks/echo", Some(ct), r#"{"a":1}"#)).await;
        assert_error(
            status,
            &body,
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
        );
    }
    let (status, body) = send(
        Request::get("/users/1/tasks/some-id")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json() {
    let (status, body) = send(Request::get("/nope").body(Body::empty()).unwrap()).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
    let (status, body) = send(
        Request::delete("/users/1/tasks/x")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_error(
        status,
        &body,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    );
}

#[tokio::test]
async fn probes_answer_without_nats() {
    let (status, body) = send(Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = send(Request::get("/readyz").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["nats_connected"], false);
}

/// `/metrics` in the format the scraper asks for: OpenMetrics when its
/// `Accept` prefers it (Prometheus), the classic text format otherwise
/// (curl, promtool).
#[tokio::test]
async fn metrics_are_served_in_the_format_the_scraper_asks_for() {
    let scrape = |accept: Option<&'static str>| async move {
        let mut request = Request::get("/metrics");
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let response = app()
            .await
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (content_type, String::from_utf8(body.to_vec()).unwrap())
    };

    let (content_type, text) = scrape(Some(
        "application/openmetrics-text;version=1.0.0;q=0.6,text/plain;version=0.0.4;q=0.3",
    ))
    .await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(
        text.contains("# TYPE herald_tasks_accepted counter"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");

    let (content_type, text) = scrape(None).await;
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert!(
        text.contains("# TYPE herald_tasks_accepted_total counter"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
}
