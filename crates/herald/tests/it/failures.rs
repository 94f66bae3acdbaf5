//! Endpoints that fail: retries on the schedule, then mail.

use herald::roles::Roles;
use herald_testkit::{Mailpit, NatsServer, ReceiverBehaviour, TestReceiver, free_port};
use serde_json::json;

use crate::harness::{DEADLINE, Herald, add_endpoint, add_endpoint_spec, schedule, test_config};

#[tokio::test]
async fn a_failing_endpoint_gets_every_attempt_then_its_owner_an_email() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    add_endpoint(
        &nats,
        "5",
        "hooks",
        &receiver.url("/hooks"),
        Some("owner5@example.com"),
    )
    .await;
    // Schedule 10ms, 20ms, 30ms: four attempts in all.
    let herald = Herald::start(test_config(&nats, Some(&mail)), Roles::all()).await;

    let id = herald.accept("5", "echo", json!({})).await;
    let task = herald.wait_for_state("5", &id, "mailed").await;
    let attempts = task["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 4, "{task}");
    assert_eq!(
        attempts
            .iter()
            .map(|a| a["outcome"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["retrying", "retrying", "retrying", "exhausted"]
    );
    assert!(attempts.iter().all(|a| a["status"] == 500), "{task}");
    assert_eq!(receiver.received().len(), 4);

    let mails = mail
        .wait_for_messages("owner5@example.com", 1, DEADLINE)
        .await;
    let text = &mails[0].text;
    // The endpoint's URL as mails show it: redacted.
    let shown = herald_core::redact::RedactedUrl::from_text(&receiver.url("/hooks")).to_string();
    assert!(mails[0].subject.contains(&shown), "{}", mails[0].subject);
    for needle in [id.as_str(), "4 attempts", "HTTP 500", &shown] {
        assert!(text.contains(needle), "mail lacks {needle:?}:\n{text}");
    }
    assert_eq!(task["mails"][0]["sent"], true, "{task}");
    herald.stop().await;
}

#[tokio::test]
async fn an_endpoint_that_recovers_gets_the_webhook_without_an_email() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::FailFirst {
        times: 2,
        status: 503,
    })
    .await;
    add_endpoint(
        &nats,
        "6",
        "hooks",
        &receiver.url("/hooks"),
        Some("owner6@example.com"),
    )
    .await;
    let herald = Herald::start(test_config(&nats, Some(&mail)), Roles::all()).await;

    let id = herald.accept("6", "echo", json!({})).await;
    let task = herald.wait_for_state("6", &id, "delivered").await;
    let attempts = task["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{task}");
    assert_eq!(attempts[2]["attempt"], 3);
    assert_eq!(attempts[2]["outcome"], "delivered");
    assert_eq!(task["mails"], json!([]));
    assert!(
        mail.messages().await.is_empty(),
        "an email was sent for a recovered endpoint"
    );
    herald.stop().await;
}

#[tokio::test]
async fn gone_stops_at_once_and_emails() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Gone).await;
    add_endpoint(
        &nats,
        "7",
        "hooks",
        &receiver.url("/hooks"),
        Some("owner7@example.com"),
    )
    .await;
    let herald = Herald::start(test_config(&nats, Some(&mail)), Roles::all()).await;

    let id = herald.accept("7", "echo", json!({})).await;
    let task = herald.wait_for_state("7", &id, "mailed").await;
    assert_eq!(task["attempts"].as_array().unwrap().len(), 1, "{task}");
    assert_eq!(task["attempts"][0]["outcome"], "gone");
    let mails = mail
        .wait_for_messages("owner7@example.com", 1, DEADLINE)
        .await;
    assert!(mails[0].text.contains("410"), "{}", mails[0].text);
    assert_eq!(receiver.received().len(), 1);
    herald.stop().await;
}

#[tokio::test]
async fn a_mail_that_cannot_be_sent_is_retried_then_recorded_as_failed() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Gone).await;
    add_endpoint(
        &nats,
        "11",
        "hooks",
        &receiver.url("/hooks"),
        Some("owner11@example.com"),
    )
    .await;
    let mut config = test_config(&nats, None);
    // An SMTP port where nothing listens: every send is a transient failure.
    config.mail.smtp_port = free_port();
    let herald = Herald::start(config, Roles::all()).await;

    let id = herald.accept("11", "echo", json!({})).await;
    let task = herald.wait_for_state("11", &id, "undelivered").await;
    let mails = task["mails"].as_array().unwrap();
    assert_eq!(mails.len(), 1, "{task}");
    assert_eq!(mails[0]["sent"], false);
    assert_eq!(mails[0]["to"], "owner11@example.com");
    // The mail schedule has two delays: three tries in all.
    assert_eq!(mails[0]["attempts"], 3, "{task}");
    assert!(
        mails[0]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{task}"
    );
    assert_eq!(task["endpoints"][0]["state"], "mail_failed", "{task}");
    herald.stop().await;
}

#[tokio::test]
async fn a_redirect_is_a_failed_attempt_and_is_never_followed() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let elsewhere = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let redirecting =
        TestReceiver::start(ReceiverBehaviour::RedirectTo(elsewhere.url("/landed"))).await;
    add_endpoint(
        &nats,
        "14",
        "hooks",
        &redirecting.url("/hooks"),
        Some("owner14@example.com"),
    )
    .await;
    let herald = Herald::start(test_config(&nats, Some(&mail)), Roles::all()).await;

    let id = herald.accept("14", "echo", json!({})).await;
    let task = herald.wait_for_state("14", &id, "mailed").await;
    let attempts = task["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 4, "{task}");
    assert!(attempts.iter().all(|a| a["status"] == 307), "{task}");
    assert!(elsewhere.received().is_empty(), "the redirect was followed");
    herald.stop().await;
}

#[tokio::test]
async fn an_endpoints_own_timeout_bounds_each_attempt() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Hang).await;
    // timeoutSeconds 1, under the global 5 s of test_config; one retry.
    add_endpoint_spec(
        &nats,
        "hooks",
        json!({
            "userId": "15",
            "url": receiver.url("/hooks"),
            "timeoutSeconds": 1,
            "retry": { "schedule": ["10ms"] },
        }),
    )
    .await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;

    let id = herald.accept("15", "echo", json!({})).await;
    // No email to tell: the endpoint ends undelivered.
    let task = herald.wait_for_state("15", &id, "undelivered").await;
    let attempts = task["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{task}");
    for attempt in attempts {
        assert_eq!(attempt["error"], "timed out", "{task}");
        let latency = attempt["latency_ms"].as_u64().unwrap();
        // The endpoint's 1 s applied, not the global 5 s.
        assert!((1000..5000).contains(&latency), "{task}");
    }
    herald.stop().await;
}

/// Many deliveries to one endpoint failing at once: their retries are
/// handed out a pace apart (`webhooks.retries_per_endpoint_per_second`)
/// instead of all falling due together, and each still runs its schedule
/// to the end. Another endpoint failing meanwhile retries on its own
/// schedule: one endpoint's pace never slows another's.
#[tokio::test]
async fn the_retries_of_an_endpoint_failing_many_deliveries_at_once_are_spread() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let down = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    let other = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    add_endpoint(
        &nats,
        "70",
        "hooks",
        &down.url("/hooks"),
        Some("owner70@example.com"),
    )
    .await;
    add_endpoint(
        &nats,
        "71",
        "hooks",
        &other.url("/hooks"),
        Some("owner71@example.com"),
    )
    .await;
    let mut config = test_config(&nats, Some(&mail));
    // One retry, 10 ms after the first try; at most 20 retries of one
    // endpoint per second: 50 ms apart.
    config.webhooks.retry_schedule = schedule(&[10]);
    config.webhooks.retries_per_endpoint_per_second = 20;
    let herald = Herald::start(config, Roles::all()).await;

    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(herald.accept("70", "echo", json!({})).await);
    }
    let lone = herald.accept("71", "echo", json!({})).await;

    let time =
        |value: &serde_json::Value| herald_core::parse_rfc3339(value.as_str().unwrap()).unwrap();
    let mut retries_due = Vec::new();
    for id in &ids {
        let task = herald.wait_for_state("70", id, "mailed").await;
        let attempts = task["attempts"].as_array().unwrap();
        assert_eq!(attempts.len(), 2, "every schedule runs to its end: {task}");
        retries_due.push(time(&attempts[0]["next_attempt_at"]));
    }
    retries_due.sort_unstable();
    for pair in retries_due.windows(2) {
        assert!(
            pair[1] - pair[0] >= 50,
            "retries of one endpoint less than 50 ms apart: {retries_due:?}"
        );
    }
    assert_eq!(down.received().len(), 16);

    let task = herald.wait_for_state("71", &lone, "mailed").await;
    let first = &task["attempts"][0];
    let delay = time(&first["next_attempt_at"]) - time(&first["at"]);
    // 10 ms and the schedule's 20% jitter, give or take the rounding.
    assert!(delay <= 13, "the other endpoint's retry was moved: {task}");
    herald.stop().await;
}
