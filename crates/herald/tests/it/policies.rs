//! Delivery policies: Retry-After, event types, paused endpoints and rate
//! limits, against real NATS and loopback receivers.

use std::time::Duration;

use futures::StreamExt;
use herald::roles::Roles;
use herald_testkit::{NatsServer, ReceiverBehaviour, TestReceiver};
use serde_json::{Value, json};

use crate::harness::{
    DEADLINE, Herald, add_endpoint_spec, test_config, wait_for_scheduled_delivery,
};

fn throttle(status: u16, retry_after: &str) -> ReceiverBehaviour {
    ReceiverBehaviour::Throttle {
        times: 1,
        status,
        retry_after: retry_after.to_string(),
    }
}

/// The delay the worker chose after the first attempt of a task that ends
/// delivered on its second.
async fn delay_after_first_attempt(herald: &Herald, user: &str) -> u64 {
    let id = herald.accept(user, "echo", json!({})).await;
    let task = herald.wait_for_state(user, &id, "delivered").await;
    let attempts = task["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{task}");
    assert_eq!(attempts[0]["outcome"], "retrying", "{task}");
    let time = |key: &str| humantime::parse_rfc3339(attempts[0][key].as_str().unwrap()).unwrap();
    time("next_attempt_at")
        .duration_since(time("at"))
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn retry_after_is_honoured_for_429_and_503_within_bounds_and_only_there() {
    let nats = NatsServer::start().await;
    // The schedule's first delay is 10ms (±20%); max_retry_after is 2s.
    let cases = [
        ("1", throttle(429, "1"), 1000..=1000),
        ("2", throttle(503, "1"), 1000..=1000),
        ("3", throttle(429, "3600"), 2000..=2000),
        ("4", throttle(500, "1"), 0..=12),
        ("5", throttle(429, "0"), 0..=12),
        ("6", throttle(429, "soon"), 0..=12),
        ("7", throttle(503, "Wed, 21 Oct 2015 07:28:00 GMT"), 0..=12),
    ];
    let mut receivers = Vec::new();
    for (user, behaviour, _) in &cases {
        let receiver = TestReceiver::start(behaviour.clone()).await;
        add_endpoint_spec(
            &nats,
            "hooks",
            json!({ "userId": user, "url": receiver.url("/hooks") }),
        )
        .await;
        receivers.push(receiver);
    }
    let mut config = test_config(&nats, None);
    config.webhooks.max_retry_after = Duration::from_secs(2);
    let herald = Herald::start(config, Roles::all()).await;

    for (user, behaviour, expected) in &cases {
        let delay = delay_after_first_attempt(&herald, user).await;
        assert!(
            expected.contains(&delay),
            "{behaviour:?}: next attempt in {delay}ms, expected {expected:?}"
        );
    }
    // The receiver saw the delay, not only the record.
    let first = receivers[0].received();
    let gap = first[1]
        .received_at
        .duration_since(first[0].received_at)
        .unwrap();
    assert!(gap >= Duration::from_millis(1000), "{gap:?}");
    herald.stop().await;
}

#[tokio::test]
async fn endpoints_receive_only_the_event_types_they_subscribe_to() {
    let nats = NatsServer::start().await;
    let completed = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let failed = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let everything = TestReceiver::start(ReceiverBehaviour::Ok).await;
    for (name, receiver, types) in [
        ("completed", &completed, json!(["echo.completed"])),
        ("failed", &failed, json!(["mystery.failed"])),
        ("everything", &everything, json!([])),
    ] {
        add_endpoint_spec(
            &nats,
            name,
            json!({ "userId": "1", "url": receiver.url("/"), "eventTypes": types }),
        )
        .await;
    }
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;

    let echo = herald.accept("1", "echo", json!({})).await;
    herald.wait_for_state("1", &echo, "delivered").await;
    // No handler for "mystery": the task fails and "mystery.failed" goes out.
    let mystery = herald.accept("1", "mystery", json!({})).await;
    herald.wait_for_state("1", &mystery, "failed").await;
    everything.wait_for(2, DEADLINE).await;
    failed.wait_for(1, DEADLINE).await;

    let types = |receiver: &TestReceiver| -> Vec<String> {
        receiver
            .received()
            .iter()
            .map(|w| serde_json::from_str::<Value>(&w.body).unwrap()["type"].to_string())
            .collect()
    };
    assert_eq!(types(&completed), ["\"echo.completed\""]);
    assert_eq!(types(&failed), ["\"mystery.failed\""]);
    let mut all = types(&everything);
    all.sort();
    assert_eq!(all, ["\"echo.completed\"", "\"mystery.failed\""]);
    herald.stop().await;
}

#[tokio::test]
async fn a_paused_endpoint_keeps_its_deliveries_as_schedules_until_resumed() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let spec = |paused: bool| json!({ "userId": "1", "url": receiver.url("/"), "paused": paused });
    add_endpoint_spec(&nats, "hooks", spec(true)).await;
    let mut config = test_config(&nats, None);
    config.webhooks.paused_recheck = Duration::from_millis(200);
    let herald = Herald::start(config, Roles::all()).await;

    let id = herald.accept("1", "echo", json!({})).await;
    // The delivery waits as a message schedule, outside the consumer.
    wait_for_scheduled_delivery(&nats, "1", "default_hooks", &id).await;
    assert!(receiver.received().is_empty());
    let (_, task) = herald.get_task("1", &id).await;
    assert_eq!(task["state"], "delivering", "{task}");

    add_endpoint_spec(&nats, "hooks", spec(false)).await;
    let task = herald.wait_for_state("1", &id, "delivered").await;
    assert_eq!(task["attempts"].as_array().unwrap().len(), 1, "{task}");
    assert_eq!(receiver.received().len(), 1);
    herald.stop().await;
}

#[tokio::test]
async fn a_rate_limit_holds_across_workers() {
    const PER_SECOND: u64 = 20;
    const TASKS: u64 = 30;
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint_spec(
        &nats,
        "hooks",
        json!({ "userId": "1", "url": receiver.url("/"), "rateLimit": { "perSecond": PER_SECOND } }),
    )
    .await;
    // Two webhook workers, each with its own limiter, share one limit.
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;
    let second = Herald::start(test_config(&nats, None), Roles::all()).await;

    let accepted = futures::stream::iter(0..TASKS)
        .map(|_| herald.accept("1", "echo", json!({})))
        .buffer_unordered(10)
        .collect::<Vec<_>>()
        .await;
    let received = receiver.wait_for(TASKS as usize, DEADLINE).await;
    assert_eq!(received.len() as u64, TASKS);
    for id in &accepted {
        herald.wait_for_state("1", id, "delivered").await;
    }
    // Slots are 1/rate apart and only ever late, never early: the first
    // request goes at once, so the span cannot be shorter than the slots.
    let first = received.iter().map(|w| w.received_at).min().unwrap();
    let last = received.iter().map(|w| w.received_at).max().unwrap();
    let span = last.duration_since(first).unwrap();
    let slots = Duration::from_millis((TASKS - 1) * 1000 / PER_SECOND);
    assert!(
        span + Duration::from_millis(100) >= slots,
        "{TASKS} deliveries in {span:?}, limit {PER_SECOND}/s needs {slots:?}"
    );
    second.stop().await;
    herald.stop().await;
}

#[tokio::test]
async fn a_hanging_endpoint_holds_only_its_share_of_the_workers() {
    let nats = NatsServer::start().await;
    let hanging = TestReceiver::start(ReceiverBehaviour::Hang).await;
    let healthy = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint_spec(
        &nats,
        "hanging",
        json!({ "userId": "1", "url": hanging.url("/"), "timeoutSeconds": 60 }),
    )
    .await;
    add_endpoint_spec(
        &nats,
        "healthy",
        json!({ "userId": "2", "url": healthy.url("/") }),
    )
    .await;
    let mut config = test_config(&nats, None);
    // Without the per-endpoint cap, ten hanging requests would take all four
    // workers for a minute.
    config.webhooks.concurrency = 4;
    config.webhooks.max_in_flight_per_endpoint = 2;
    config.shutdown.grace = Duration::from_millis(100);
    let herald = Herald::start(config, Roles::all()).await;

    for _ in 0..10 {
        herald.accept("1", "echo", json!({})).await;
    }
    hanging.wait_for(2, DEADLINE).await;
    let id = herald.accept("2", "echo", json!({})).await;
    herald.wait_for_state("2", &id, "delivered").await;
    assert_eq!(
        hanging.received().len(),
        2,
        "the hanging endpoint got more than its cap"
    );
    herald.stop().await;
}

#[tokio::test]
async fn a_worker_started_after_an_endpoint_was_disabled_holds_its_deliveries() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint_spec(
        &nats,
        "hooks",
        json!({ "userId": "1", "url": receiver.url("/") }),
    )
    .await;
    // Disabled before any worker runs: the worker must learn it from the
    // bucket's current records, not only from later changes.
    let health = herald_core::payload::EndpointHealth {
        v: 1,
        disabled: true,
        disabled_at_ms: Some(herald_core::now_ms()),
        ..Default::default()
    };
    crate::harness::broker(&nats)
        .await
        .jetstream_for_tests()
        .get_key_value(herald_core::names::HEALTH_BUCKET)
        .await
        .unwrap()
        .put(
            "1.default_hooks",
            herald_core::payload::encode(&health).into(),
        )
        .await
        .unwrap();
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;

    let id = herald.accept("1", "echo", json!({})).await;
    let task = herald.wait_for_state("1", &id, "held").await;
    assert_eq!(task["attempts"][0]["outcome"], "held", "{task}");
    assert!(receiver.received().is_empty());
    herald.stop().await;
}
