//! Bad input against the running API with NATS up: a clear 4xx, JSON,
//! nothing stored, and never a 5xx.

use herald::roles::Roles;
use herald_testkit::NatsServer;
use serde_json::json;

use crate::harness::{Herald, test_config};

#[tokio::test]
async fn bad_requests_get_json_errors_and_no_5xx() {
    let nats = NatsServer::start().await;
    let herald = Herald::start(test_config(&nats, None), Roles::api_only()).await;
    let http = &herald.http;
    let api = &herald.api;

    let cases: Vec<(reqwest::RequestBuilder, u16)> = vec![
        (
            http.post(format!("{api}/users/1/tasks/echo"))
                .header("content-type", "application/json")
                .body("{oops"),
            400,
        ),
        (
            http.post(format!("{api}/users/1/tasks/echo"))
                .header("content-type", "application/json")
                .body(vec![b' '; 2 << 20]),
            413,
        ),
        (
            http.post(format!("{api}/users/a.b/tasks/echo"))
                .json(&json!({})),
            400,
        ),
        (
            http.post(format!("{api}/users/1/tasks/x*y"))
                .json(&json!({})),
            400,
        ),
        (
            http.post(format!("{api}/users/1/tasks/echo"))
                .header("content-type", "text/plain")
                .body("{}"),
            415,
        ),
        (http.get(format!("{api}/users/1/tasks/not-a-task")), 404),
        (http.get(format!("{api}/users/1/tasks/a.b")), 404),
        (http.put(format!("{api}/users/1/tasks/echo")), 405),
        (http.get(format!("{api}/nothing/here")), 404),
    ];
    for (request, want) in cases {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.expect("error bodies are JSON");
        assert_eq!(status, want, "{body}");
        assert!(
            body["error"]["code"].is_string() && body["error"]["message"].is_string(),
            "{body}"
        );
    }
    herald.stop().await;
}

#[tokio::test]
async fn a_task_is_invisible_to_other_users() {
    let nats = NatsServer::start().await;
    let herald = Herald::start(test_config(&nats, None), Roles::api_only()).await;
    let id = herald.accept("alice", "echo", json!({ "secret": 1 })).await;
    let (status, task) = herald.get_task("alice", &id).await;
    assert_eq!(
        (status, task["state"].as_str()),
        (200, Some("queued")),
        "{task}"
    );
    let (status, body) = herald.get_task("mallory", &id).await;
    assert_eq!(status, 404, "{body}");
    assert!(!body.to_string().contains("secret"));
    herald.stop().await;
}

/// Bad configuration stops a role at start, naming the key, with a
/// non-zero exit: nothing half-starts.
#[tokio::test]
async fn bad_configuration_stops_the_process_with_a_message() {
    for (variable, value, mentions) in [
        ("HERALD_API__LISTEN", "nowhere", "api.listen"),
        ("HERALD_WEBHOOKS__RETRY_SCHEDULE", "[\"soon\"]", "soon"),
        ("HERALD_TASKS__CONCURRENCY", "0", "tasks.concurrency"),
        ("HERALD_HEALTH__LISTEN", "not-an-address", "health.listen"),
        ("HERALD_ENDPOINT_CACHE__USERS", "0", "endpoint_cache.users"),
        // A task sent again after the duplicate window could be stored twice.
        (
            "HERALD_TOPOLOGY__STORE_TIMEOUT",
            "5m",
            "topology.store_timeout must be shorter than topology.duplicate_window",
        ),
        (
            "HERALD_WEBHOOKS__SSRF__ALLOW",
            "[\"10.0.0.0/33\"]",
            "10.0.0.0/33",
        ),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["worker", "tasks", "--nats-url", "nats://127.0.0.1:9"])
            .env(variable, value)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{variable}={value} was accepted");
        assert!(
            stderr.contains(mentions) && stderr.contains("invalid configuration"),
            "{variable}={value}: {stderr}"
        );
    }
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["api", "--config", "/nonexistent/herald.toml"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("does not exist"));
}
