//! The OpenAPI document says what the server does: the patterns it gives
//! for path parameters and headers accept exactly the values the handlers
//! accept, so a client (or fuzzer) trusting them gets no surprise 400.

// Helpers as well as tests panic on an unexpected answer: that is the failure.
#![allow(clippy::unwrap_used)]

use axum::{
    body::Body,
    http::{Request, StatusCode},
};
use herald_api::{ApiConfig, AppState, openapi, router};
use serde_json::Value;
use tower::ServiceExt;

fn document() -> Value {
    serde_json::to_value(openapi()).unwrap()
}

fn parameter<'a>(doc: &'a Value, method: &str, name: &str) -> &'a Value {
    doc["paths"]["/users/{user}/tasks/{task}"][method]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap()
}

/// The regex of a parameter's schema (following one `$ref`).
fn schema_pattern(doc: &Value, parameter: &Value) -> regex::Regex {
    let mut schema = &parameter["schema"];
    if let Some(reference) = schema["$ref"].as_str() {
        schema = doc.pointer(reference.trim_start_matches('#')).unwrap();
    }
    regex::Regex::new(schema["pattern"].as_str().unwrap()).unwrap()
}

/// Whether the server got past validation: with NATS down that is 503.
async fn accepted(request: Request<Body>) -> bool {
    let broker = herald_queue::connect("nats://127.0.0.1:9", "openapi-test")
        .await
        .unwrap();
    let app = router(AppState::new(broker, ApiConfig::default()).unwrap());
    let status = app.oneshot(request).await.unwrap().status();
    assert!(
        status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::BAD_REQUEST,
        "{status}"
    );
    status == StatusCode::SERVICE_UNAVAILABLE
}

fn post(user: &str, task_type: &str) -> Request<Body> {
    Request::post(format!("/users/{user}/tasks/{task_type}"))
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap()
}

const IDENTIFIERS: [&str; 12] = [
    "1", "alice", "A-b_9", "a.b", "a*", "%3E", "a%20b", "%C3%BC", "a%2Fb", "%FF", "a%00", "-",
];

#[tokio::test]
async fn user_and_task_type_patterns_match_the_server() {
    let doc = document();
    let user_pattern = schema_pattern(&doc, parameter(&doc, "post", "user"));
    let type_pattern = schema_pattern(&doc, parameter(&doc, "post", "task"));
    let long = "x".repeat(128);
    let too_long = "x".repeat(129);
    let values = IDENTIFIERS
        .iter()
        .copied()
        .chain([long.as_str(), too_long.as_str()]);
    for raw in values {
        let decoded = percent_decode(raw);
        let documented = decoded.as_deref().is_some_and(|d| user_pattern.is_match(d));
        assert_eq!(
            accepted(post(raw, "echo")).await,
            documented,
            "user {raw:?}"
        );
        let documented = decoded.as_deref().is_some_and(|d| type_pattern.is_match(d));
        assert_eq!(accepted(post("1", raw)).await, documented, "type {raw:?}");
    }
}

#[tokio::test]
async fn the_idempotency_key_pattern_matches_the_server() {
    let doc = document();
    let key_pattern = schema_pattern(&doc, parameter(&doc, "post", "Idempotency-Key"));
    let longest = "k".repeat(255);
    let too_long = "k".repeat(256);
    // Values as the server sees them: HTTP parsing has trimmed both ends.
    for key in [
        "k",
        "a b",
        "~!{}",
        "tab\there",
        "caf\u{e9}",
        longest.as_str(),
        too_long.as_str(),
    ] {
        let request = Request::post("/users/1/tasks/echo")
            .header("content-type", "application/json")
            .header("idempotency-key", key.as_bytes())
            .body(Body::from("{}"))
            .unwrap();
        assert_eq!(
            accepted(request).await,
            key_pattern.is_match(key),
            "{key:?}"
        );
    }
}

/// `%XX` decoding as axum does it for path parameters; None when the result
/// is not UTF-8 (axum answers 400 for those).
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Routes are protected by the group they are added to in `app()`; one
/// added under /users/ outside the users group would be open, and this
/// says so.
#[test]
fn every_route_under_users_needs_a_bearer_token() {
    let doc = document();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let protected = operation["security"] == serde_json::json!([{ "bearer": [] }]);
            let documented = ["401", "403"]
                .iter()
                .all(|status| operation["responses"].get(*status).is_some());
            if path.starts_with("/users/") {
                assert!(protected && documented, "{method} {path} is not protected");
                checked += 1;
            } else {
                assert!(
                    !protected,
                    "{method} {path} needs a token but is not a user route"
                );
            }
        }
    }
    assert!(checked >= 2);
}
