//! Sending deliveries again: redeliver a task, recover an endpoint's
//! failures since a time, enable a disabled endpoint.

use std::time::{Duration, SystemTime};

use herald::roles::Roles;
use herald_testkit::{
    Mailpit, NatsServer, ReceiverBehaviour, TestReceiver, verify_with_standardwebhooks, wait_until,
};
use serde_json::{Value, json};

use crate::harness::{DEADLINE, Herald, add_endpoint, add_endpoint_spec, test_config};

/// POSTs `body` (JSON, or nothing) to `path`; returns status and JSON body.
async fn post(herald: &Herald, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = herald.http.post(format!("{}{path}", herald.api));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The attempts of `task` in redelivery round `round` (`None`: the fan-out).
fn attempts_in<'a>(task: &'a Value, endpoint: &str, round: Option<&str>) -> Vec<&'a Value> {
    task["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["endpoint"] == endpoint && a["redelivery"].as_str() == round)
        .collect()
}

/// Waits until the task's delivery to `endpoint` is in `state`.
async fn wait_for_endpoint_state(herald: &Herald, user: &str, id: &str, state: &str) -> Value {
    let what = format!("task {id} to have an endpoint in state {state}");
    wait_until(&what, DEADLINE, || async {
        let (status, task) = herald.get_task(user, id).await;
        (status == 200 && task["endpoints"][0]["state"] == state).then_some(task)
    })
    .await
}

#[tokio::test]
async fn a_delivered_task_is_redelivered_with_the_same_body_and_id_to_all_or_one_endpoint() {
    let nats = NatsServer::start().await;
    let first = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let second = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let (_, secret) = add_endpoint(&nats, "31", "first", &first.url("/hooks"), None).await;
    add_endpoint(&nats, "31", "second", &second.url("/hooks"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;

    let id = herald.accept("31", "echo", json!({ "n": 1.5 })).await;
    herald.wait_for_state("31", &id, "delivered").await;
    let original = first.wait_for(1, DEADLINE).await.remove(0);

    // No body: every endpoint the task went to.
    let (status, queued) = post(&herald, &format!("/users/31/tasks/{id}/redeliver"), None).await;
    assert_eq!(status, 202, "{queued}");
    let round = queued["redelivery"].as_str().unwrap().to_string();
    assert_eq!(
        queued["endpoints"],
        json!(["default_first", "default_second"])
    );
    let again = first.wait_for(2, DEADLINE).await.remove(1);
    second.wait_for(2, DEADLINE).await;
    assert_eq!(again.body, original.body, "the body changed");
    assert_eq!(again.headers["webhook-id"], original.headers["webhook-id"]);
    verify_with_standardwebhooks(&secret.expose(), &again)
        .expect("standardwebhooks rejected the redelivered webhook");

    let task = herald.wait_for_state("31", &id, "delivered").await;
    for endpoint in ["default_first", "default_second"] {
        let before = attempts_in(&task, endpoint, None);
        let during = attempts_in(&task, endpoint, Some(&round));
        assert_eq!(before.len(), 1, "{task}");
        assert_eq!(during.len(), 1, "{task}");
        assert_eq!(
            during[0]["attempt"], 1,
            "attempts restart in a round: {task}"
        );
        assert_eq!(during[0]["outcome"], "delivered", "{task}");
    }
    assert_eq!(task["endpoints"][0]["attempts"], 2, "{task}");
    assert_eq!(task["endpoints"][0]["redelivery"], round.as_str(), "{task}");
    let redeliveries = task["redeliveries"].as_array().unwrap();
    assert_eq!(redeliveries.len(), 2, "{task}");
    assert!(
        redeliveries
            .iter()
            .all(|r| r["cause"] == "redeliver" && r["redelivery"] == round.as_str()),
        "{task}"
    );

    // One endpoint only.
    let (status, queued) = post(
        &herald,
        &format!("/users/31/tasks/{id}/redeliver"),
        Some(json!({ "endpoint": "default_second" })),
    )
    .await;
    assert_eq!(status, 202, "{queued}");
    assert_eq!(queued["endpoints"], json!(["default_second"]));
    let third = second.wait_for(3, DEADLINE).await.remove(2);
    assert_eq!(third.body, original.body);
    let task = herald.wait_for_state("31", &id, "delivered").await;
    assert_eq!(task["attempts"].as_array().unwrap().len(), 5, "{task}");
    assert_eq!(first.received().len(), 2, "the other endpoint got it again");
    herald.stop().await;
}

#[tokio::test]
async fn exhausted_deliveries_are_recovered_once_the_receiver_is_fixed() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    add_endpoint(
        &nats,
        "32",
        "hooks",
        &receiver.url("/hooks"),
        Some("owner32@example.com"),
    )
    .await;
    let herald = Herald::start(test_config(&nats, Some(&mail)), Roles::all()).await;

    let since = now_rfc3339();
    let ids = [
        herald.accept("32", "echo", json!({ "n": 1 })).await,
        herald.accept("32", "echo", json!({ "n": 2 })).await,
    ];
    for id in &ids {
        herald.wait_for_state("32", id, "mailed").await;
    }
    assert_eq!(receiver.received().len(), 8, "four attempts per task");

    // Nothing failed after now: nothing to recover.
    let recover = "/users/32/endpoints/default_hooks/recover";
    for later in [now_rfc3339(), "2999-01-01T00:00:00Z".to_string()] {
        let (status, nothing) = post(&herald, recover, Some(json!({ "since": later }))).await;
        assert_eq!(status, 202, "{nothing}");
        assert_eq!(nothing["queued"], 0, "{nothing}");
    }

    receiver.set_behaviour(ReceiverBehaviour::Ok);
    let (status, recovered) = post(&herald, recover, Some(json!({ "since": since }))).await;
    assert_eq!(status, 202, "{recovered}");
    assert_eq!(recovered["queued"], 2, "{recovered}");
    assert_eq!(recovered["truncated"], false, "{recovered}");
    let mut tasks: Vec<_> = recovered["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    tasks.sort();
    let mut expected = ids.to_vec();
    expected.sort();
    assert_eq!(tasks, expected);

    for id in &ids {
        let task = herald.wait_for_state("32", id, "delivered").await;
        assert_eq!(task["endpoints"][0]["state"], "delivered", "{task}");
        let outcomes: Vec<_> = task["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(
            outcomes,
            ["retrying", "retrying", "retrying", "exhausted", "delivered"],
            "the history is kept: {task}"
        );
        assert_eq!(task["mails"][0]["sent"], true, "{task}");
        assert_eq!(task["redeliveries"][0]["cause"], "recover", "{task}");
        let sent: Vec<_> = receiver
            .received()
            .into_iter()
            .filter(|w| w.body.contains(id.as_str()))
            .collect();
        assert_eq!(sent.len(), 5);
        assert_eq!(sent[4].body, sent[0].body);
        assert_eq!(sent[4].headers["webhook-id"], sent[0].headers["webhook-id"]);
    }

    // Recovered deliveries are delivered now: a second call finds nothing.
    let (status, again) = post(&herald, recover, Some(json!({ "since": since }))).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(again["queued"], 0, "{again}");
    assert_eq!(receiver.received().len(), 10);
    herald.stop().await;
}

#[tokio::test]
async fn a_disabled_endpoint_holds_deliveries_and_enabling_it_sends_them() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Status(503)).await;
    let url = receiver.url("/hooks");
    // How mails show it: redacted.
    let shown = herald_core::redact::RedactedUrl::from_text(&url);
    // Seven attempts 100ms apart: the endpoint fails for longer than the
    // disabling period while the first task is still being retried.
    add_endpoint_spec(
        &nats,
        "hooks",
        json!({
            "userId": "33",
            "url": url,
            "email": "owner33@example.com",
            "retry": { "schedule": ["100ms", "100ms", "100ms", "100ms", "100ms", "100ms"] },
        }),
    )
    .await;
    let mut config = test_config(&nats, Some(&mail));
    config.webhooks.disable_after = Duration::from_millis(200);
    let herald = Herald::start(config, Roles::all()).await;

    let first = herald.accept("33", "echo", json!({ "n": 1 })).await;
    let task = wait_for_endpoint_state(&herald, "33", &first, "held").await;
    let outcomes: Vec<_> = task["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes.last(), Some(&"held"), "{task}");
    assert!(outcomes.contains(&"retrying"), "{task}");
    let disabled = mail
        .wait_for_messages("owner33@example.com", 1, DEADLINE)
        .await;
    assert_eq!(
        disabled[0].subject,
        format!("Webhook endpoint {shown} is disabled")
    );

    // A new task is held without a request to the endpoint.
    let requests = receiver.received().len();
    let second = herald.accept("33", "echo", json!({ "n": 2 })).await;
    wait_for_endpoint_state(&herald, "33", &second, "held").await;
    assert_eq!(receiver.received().len(), requests);

    // Recovering a disabled endpoint would only hold them again.
    let (status, refused) = post(
        &herald,
        "/users/33/endpoints/default_hooks/recover",
        Some(json!({ "since": "2020-01-01T00:00:00Z" })),
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "endpoint_disabled");

    receiver.set_behaviour(ReceiverBehaviour::Ok);
    let (status, enabled) = post(&herald, "/users/33/endpoints/default_hooks/enable", None).await;
    assert_eq!(status, 200, "{enabled}");
    assert_eq!(enabled["was_disabled"], true, "{enabled}");
    assert_eq!(enabled["recovered"]["queued"], 2, "{enabled}");
    for id in [&first, &second] {
        let task = herald.wait_for_state("33", id, "delivered").await;
        assert_eq!(task["redeliveries"][0]["cause"], "recover", "{task}");
    }
    assert!(
        receiver
            .received()
            .iter()
            .any(|w| w.body.contains(second.as_str())),
        "the held task was never sent"
    );
    let mails = mail
        .wait_for_messages("owner33@example.com", 2, DEADLINE)
        .await;
    assert!(
        mails
            .iter()
            .any(|m| m.subject == format!("Webhook endpoint {shown} has recovered")),
        "{:?}",
        mails.iter().map(|m| &m.subject).collect::<Vec<_>>()
    );

    // Enabling an endpoint that is not disabled changes nothing.
    let (status, noop) = post(&herald, "/users/33/endpoints/default_hooks/enable", None).await;
    assert_eq!(status, 200, "{noop}");
    assert_eq!(noop["was_disabled"], false, "{noop}");
    herald.stop().await;
}

#[tokio::test]
async fn bad_replay_requests_get_json_client_errors() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let failing = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    add_endpoint(&nats, "34", "hooks", &receiver.url("/hooks"), None).await;
    add_endpoint_spec(
        &nats,
        "slow",
        json!({
            "userId": "35",
            "url": failing.url("/hooks"),
            "retry": { "schedule": ["1h"] },
        }),
    )
    .await;
    let mut config = test_config(&nats, None);
    // A transcode that runs for the whole test: its task never finishes.
    config.tasks.transcode_duration = Duration::from_secs(600);
    let herald = Herald::start(config, Roles::all()).await;
    let id = herald.accept("34", "echo", json!({})).await;
    herald.wait_for_state("34", &id, "delivered").await;
    let running = herald.accept("34", "transcode", json!({})).await;
    let retrying = herald.accept("35", "echo", json!({})).await;
    herald.wait_for_state("35", &retrying, "delivering").await;
    failing.wait_for(1, DEADLINE).await;

    let redeliver = format!("/users/34/tasks/{id}/redeliver");
    let recover = "/users/34/endpoints/default_hooks/recover";
    let raw = |path: String, body: &'static str| {
        let request = herald
            .http
            .post(format!("{}{path}", herald.api))
            .header("content-type", "application/json")
            .body(body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let cases: Vec<(&str, (u16, Value), u16, &str)> = vec![
        (
            "unknown task",
            post(&herald, "/users/34/tasks/nope/redeliver", None).await,
            404,
            "not_found",
        ),
        (
            "another user's task",
            post(&herald, &format!("/users/35/tasks/{id}/redeliver"), None).await,
            404,
            "not_found",
        ),
        (
            "malformed JSON",
            raw(redeliver.clone(), "{\"endpoint\":").await,
            400,
            "invalid_json",
        ),
        (
            "unknown field",
            post(&herald, &redeliver, Some(json!({ "endpiont": "x" }))).await,
            400,
            "bad_request",
        ),
        (
            "endpoint of nobody",
            post(
                &herald,
                &redeliver,
                Some(json!({ "endpoint": "default_nope" })),
            )
            .await,
            404,
            "not_found",
        ),
        (
            "endpoint that is no id",
            post(&herald, &redeliver, Some(json!({ "endpoint": "a.b" }))).await,
            404,
            "not_found",
        ),
        (
            "endpoint not a string",
            post(&herald, &redeliver, Some(json!({ "endpoint": 5 }))).await,
            400,
            "bad_request",
        ),
        (
            "task still running",
            post(
                &herald,
                &format!("/users/34/tasks/{running}/redeliver"),
                None,
            )
            .await,
            409,
            "task_not_finished",
        ),
        (
            "delivery still being retried",
            post(
                &herald,
                &format!("/users/35/tasks/{retrying}/redeliver"),
                None,
            )
            .await,
            409,
            "delivery_in_progress",
        ),
        (
            "since missing",
            post(&herald, recover, None).await,
            400,
            "bad_request",
        ),
        (
            "since not a time",
            post(&herald, recover, Some(json!({ "since": "yesterday" }))).await,
            400,
            "bad_request",
        ),
        (
            "since without a zone",
            post(
                &herald,
                recover,
                Some(json!({ "since": "2024-05-01T12:00:00" })),
            )
            .await,
            400,
            "bad_request",
        ),
        (
            "recover malformed JSON",
            raw(recover.to_string(), "since=yesterday").await,
            400,
            "invalid_json",
        ),
        (
            "recover unknown endpoint",
            post(
                &herald,
                "/users/34/endpoints/default_nope/recover",
                Some(json!({ "since": "2024-05-01T12:00:00Z" })),
            )
            .await,
            404,
            "not_found",
        ),
        (
            "recover another user's endpoint",
            post(
                &herald,
                "/users/35/endpoints/default_hooks/recover",
                Some(json!({ "since": "2024-05-01T12:00:00Z" })),
            )
            .await,
            404,
            "not_found",
        ),
        (
            "enable unknown endpoint",
            post(&herald, "/users/34/endpoints/nope/enable", None).await,
            404,
            "not_found",
        ),
        (
            "enable with a bad user",
            post(&herald, "/users/a.b/endpoints/default_hooks/enable", None).await,
            400,
            "bad_request",
        ),
    ];
    for (what, (status, body), want_status, want_code) in cases {
        assert_eq!(status, want_status, "{what}: {body}");
        assert_eq!(body["error"]["code"], want_code, "{what}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
    }
    // Before 1970 is from the start; the one delivery succeeded.
    let (status, nothing) = post(
        &herald,
        recover,
        Some(json!({ "since": "0327-04-15T02:06:15Z" })),
    )
    .await;
    assert_eq!(status, 202, "{nothing}");
    assert_eq!(nothing["since"], "1970-01-01T00:00:00Z", "{nothing}");
    assert_eq!(nothing["queued"], 0, "{nothing}");
    // Nothing above queued anything.
    assert_eq!(receiver.received().len(), 1);
}

#[tokio::test]
async fn replay_calls_answer_503_while_nats_is_down() {
    let mut nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "36", "hooks", &receiver.url("/hooks"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;
    let id = herald.accept("36", "echo", json!({})).await;
    herald.wait_for_state("36", &id, "delivered").await;

    nats.stop().await;
    for (path, body) in [
        (format!("/users/36/tasks/{id}/redeliver"), None),
        (
            "/users/36/endpoints/default_hooks/recover".to_string(),
            Some(json!({ "since": "2024-05-01T12:00:00Z" })),
        ),
        ("/users/36/endpoints/default_hooks/enable".to_string(), None),
    ] {
        let (status, answer) = post(&herald, &path, body).await;
        assert_eq!(status, 503, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "unavailable", "{path}: {answer}");
    }
    assert_eq!(receiver.received().len(), 1);
}
