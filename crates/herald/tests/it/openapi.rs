//! The API against its own OpenAPI document: schemathesis (pinned by
//! `scripts/install-tools.sh`) reads `/openapi.json` from a running Herald
//! (real NATS, every role, authentication on) and sends generated valid and
//! invalid requests to every operation, then follows the document's links
//! (post a task, read it back). Any 5xx, any response the document does
//! not describe (status, content type, headers, body schema), any invalid
//! request accepted or valid one refused, or a protected route answering
//! without a token fails the test.

use std::{process::Stdio, time::Duration};

use herald::roles::Roles;
use herald_testkit::{NatsServer, ReceiverBehaviour, TestReceiver, tools_dir};
use serde_json::json;

use crate::{
    auth::tokens_file,
    harness::{DEADLINE, Herald, add_endpoint, test_config},
};

/// Generated cases per operation and phase: enough to cover every
/// parameter's edge cases, small enough for about a minute on two busy
/// cores. `HERALD_SCHEMATHESIS_EXAMPLES` raises it for a longer hunt.
const MAX_EXAMPLES: &str = "150";
/// Fixed, so a failure reproduces; `HERALD_SCHEMATHESIS_SEED` changes it.
const SEED: &str = "20261129";
const RUN_LIMIT: Duration = Duration::from_secs(300);

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let schemathesis = tools_dir().join("venv/bin/schemathesis");
    assert!(
        schemathesis.is_file(),
        "schemathesis is not installed at {}: run `make tools` (scripts/install-tools.sh)",
        schemathesis.display()
    );
    let nats = NatsServer::start().await;
    // The replay calls need an endpoint and a finished task that exist, or
    // every generated case ends in a 404 before their logic.
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "fuzz", "hooks", &receiver.url("/hooks"), None).await;
    let tokens = tokens_file();
    let mut config = test_config(&nats, None);
    config.api.tokens_file = tokens.file.path().display().to_string();
    config.api.metrics_require_token = true;
    config.tasks.transcode_duration = Duration::from_millis(10);
    let herald = Herald::start(config, Roles::all()).await;

    let examples =
        std::env::var("HERALD_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| MAX_EXAMPLES.into());
    let seed = std::env::var("HERALD_SCHEMATHESIS_SEED").unwrap_or_else(|_| SEED.into());
    let posted: serde_json::Value = herald
        .http
        .post(format!("{}/users/fuzz/tasks/echo", herald.api))
        .bearer_auth(&tokens.all)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let task = posted["id"].as_str().unwrap().to_string();
    receiver.wait_for(1, DEADLINE).await;
    let scratch = tempfile::tempdir().unwrap();
    // Read by schemathesis from its working directory.
    std::fs::write(
        scratch.path().join("schemathesis.toml"),
        format!(
            r#"
[[operations]]
include-operation-id = "redeliver_task"
parameters = {{ "path.user" = "fuzz", "path.task" = "{task}" }}

[[operations]]
include-path-regex = "/endpoints/"
parameters = {{ "path.user" = "fuzz", "path.endpoint" = "default_hooks" }}
"#
        ),
    )
    .unwrap();
    let run = tokio::process::Command::new(&schemathesis)
        .arg("run")
        .arg(format!("{}/openapi.json", herald.api))
        .args(["--checks", "all"])
        .args(["--header", &format!("Authorization: Bearer {}", tokens.all)])
        .args(["--max-examples", &examples, "--seed", &seed])
        // One worker: Hypothesis' source inspection is not thread-safe on
        // every Python, and two cores are shared anyway.
        .args(["--workers", "1", "--request-timeout", "10"])
        .args(["--output-sanitize", "false", "--no-color"])
        // No example database: every run starts from the seed alone.
        .args(["--generation-database", "none"])
        .current_dir(scratch.path())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(RUN_LIMIT, run)
        .await
        .unwrap_or_else(|_| panic!("schemathesis ran longer than {RUN_LIMIT:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Shown with --nocapture: what was covered.
    println!("{stdout}");
    assert!(
        output.status.success(),
        "schemathesis found problems (seed {seed}):\n{stdout}\n{stderr}"
    );
    // A run that tested nothing would also exit 0: every documented
    // operation must have been selected and many cases sent.
    let document = serde_json::to_value(herald_api::openapi()).unwrap();
    // (schemathesis leaves out the operation that serves the document.)
    let operations = document["paths"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(path, _)| *path != "/openapi.json")
        .flat_map(|(_, item)| item.as_object().unwrap().keys())
        .filter(|key| ["get", "put", "post", "delete", "patch"].contains(&key.as_str()))
        .count();
    let selected = format!("{operations} selected / {operations} total");
    assert!(stdout.contains(&selected), "not {selected}:\n{stdout}");
    let generated = number_before(&stdout, " generated").unwrap_or(0);
    assert!(
        generated >= 20 * operations,
        "only {generated} cases generated:\n{stdout}"
    );
    assert!(stdout.contains("No issues found"), "{stdout}");
    hostile_bodies_get_documented_client_errors(&herald, &tokens.all, &task, &document).await;
    herald.stop().await;
}

/// The bodies schemathesis cannot generate: JSON text no JSON value holds
/// (`1e400`, a lone surrogate), nesting past every limit, and sizes at and
/// past the door's limit with the worst escaping. Sent to every operation
/// that takes a body; each must get a 4xx the document lists for it (or,
/// for the task POST within limits, 201), never a 5xx.
async fn hostile_bodies_get_documented_client_errors(
    herald: &Herald,
    token: &str,
    task: &str,
    document: &serde_json::Value,
) {
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let quotes = |len: usize| {
        let mut body = String::from("[\"");
        while body.len() + 8 <= len {
            body.push_str(r#"\"\\\u0001"#);
        }
        body.push_str("\"]");
        body
    };
    let bodies: Vec<(&str, String)> = vec![
        ("deep 33", deep(33)),
        ("deep 126", deep(126)),
        ("deep 100000", deep(100_000)),
        ("1e400", "1e400".into()),
        (
            "nested 1e400",
            r#"{"since":1e400,"endpoint":[1e400]}"#.into(),
        ),
        ("lone surrogate", r#""\ud800""#.into()),
        ("lone surrogate key", r#"{"\udc00":"x"}"#.into()),
        ("quote-heavy near the limit", quotes(1_000_000)),
        ("oversized", quotes(1_100_000)),
    ];
    let operations = [
        ("create_task", "/users/fuzz/tasks/echo".to_string()),
        (
            "redeliver_task",
            format!("/users/fuzz/tasks/{task}/redeliver"),
        ),
        (
            "recover_endpoint",
            "/users/fuzz/endpoints/default_hooks/recover".to_string(),
        ),
    ];
    for (operation, path) in &operations {
        let documented = documented_statuses(document, operation);
        for (name, body) in &bodies {
            let response = herald
                .http
                .post(format!("{}{path}", herald.api))
                .bearer_auth(token)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let answer = response.text().await.unwrap();
            assert!(status < 500, "{operation} {name}: {status} {answer}");
            assert!(
                documented.contains(&status.to_string()),
                "{operation} {name}: {status} is not documented ({documented:?}): {answer}"
            );
            if status >= 400 {
                let error: serde_json::Value = serde_json::from_str(&answer)
                    .unwrap_or_else(|_| panic!("{operation} {name}: not JSON: {answer}"));
                assert!(error["error"]["message"].is_string(), "{answer}");
            }
        }
    }
}

/// The response statuses the document lists for `operation_id`.
fn documented_statuses(document: &serde_json::Value, operation_id: &str) -> Vec<String> {
    document["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .find(|operation| operation["operationId"] == operation_id)
        .and_then(|operation| operation["responses"].as_object())
        .map(|responses| responses.keys().cloned().collect())
        .unwrap_or_default()
}

/// The number just before `marker` in `text`, as in "1234 generated".
fn number_before(text: &str, marker: &str) -> Option<usize> {
    let before = &text[..text.find(marker)?];
    let digits = before.rsplit(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}
