//! Counts that must not mislead: attempt numbers count requests that
//! reached the network, and each endpoint mail goes out once.

use std::time::Duration;

use herald::{cli::WorkerKind, roles::Roles};
use herald_core::{
    names,
    payload::{EndpointHealth, MailJob, MailReason, decode},
};
use herald_queue::Broker;
use herald_testkit::{NatsServer, ReceiverBehaviour, TestReceiver, wait_until};
use serde_json::json;

use crate::harness::{
    DEADLINE, Herald, add_endpoint, add_endpoint_spec, broker, schedule, test_config,
};

/// A delivery that a NATS error stops before its request (here: the
/// rate-limit bucket is gone, so no slot can be reserved) is handed back
/// again and again; when the request finally goes out, it is attempt 1.
#[tokio::test]
async fn a_delivery_stopped_by_nats_before_sending_keeps_its_attempt_number() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint_spec(
        &nats,
        "hooks",
        json!({ "userId": "50", "url": receiver.url("/hooks"), "rateLimit": { "perSecond": 100 } }),
    )
    .await;
    let config = test_config(&nats, None);
    let herald = Herald::start(config.clone(), Roles::all()).await;
    let broker = broker(&nats).await;
    broker
        .jetstream_for_tests()
        .delete_key_value(names::RATE_LIMITS_BUCKET)
        .await
        .unwrap();

    let id = herald.accept("50", "echo", json!({})).await;
    wait_until("the delivery to be handed back twice", DEADLINE, || async {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = broker
            .jetstream_for_tests()
            .get_stream(names::WEBHOOKS_STREAM)
            .await
            .ok()?
            .get_consumer(names::WEBHOOKS_CONSUMER)
            .await
            .ok()?;
        (consumer.info().await.ok()?.delivered.consumer_sequence >= 3).then_some(())
    })
    .await;
    assert!(receiver.received().is_empty(), "a request went out");
    herald_queue::topology::ensure(&broker, &config.topology)
        .await
        .unwrap();

    let task = herald.wait_for_state("50", &id, "delivered").await;
    let attempts = task["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{task}");
    assert_eq!(attempts[0]["attempt"], 1, "{task}");
    assert_eq!(task["endpoints"][0]["attempts"], 1, "{task}");
    assert_eq!(receiver.received().len(), 1);
    herald.stop().await;
}

/// Waits until attempt `index` (0-based) of task `id` has `outcome`.
async fn wait_for_attempt(herald: &Herald, user: &str, id: &str, index: usize, outcome: &str) {
    wait_until(
        &format!("attempt {index} of {id} to be {outcome}"),
        DEADLINE,
        || async {
            let (_, task) = herald.get_task(user, id).await;
            (task["attempts"].get(index)?["outcome"] == outcome).then_some(())
        },
    )
    .await;
}

/// Waits until the health record of `user`'s endpoint `hooks` satisfies `done`.
async fn wait_for_health(
    broker: &Broker,
    user: &str,
    what: &str,
    done: impl Fn(&EndpointHealth) -> bool,
) {
    let (user, endpoint) = (user.parse().unwrap(), "default_hooks".parse().unwrap());
    wait_until(what, DEADLINE, || async {
        let health = herald_queue::health::read(broker, &user, &endpoint)
            .await
            .ok()??;
        done(&health).then_some(())
    })
    .await;
}

/// The mail jobs queued so far (no mail worker runs, so they all stay in
/// `HERALD_MAIL`).
async fn queued_mails(broker: &Broker) -> Vec<MailJob> {
    let mut stream = broker
        .jetstream_for_tests()
        .get_stream(names::MAIL_STREAM)
        .await
        .unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut mails = Vec::new();
    for sequence in 1..=last {
        if let Ok(message) = stream.direct_get(sequence).await {
            mails.push(decode::<MailJob>(&message.payload).unwrap());
        }
    }
    mails
}

/// A failure mail and a success folded into one health flush, after the
/// owner had been mailed before: one "recovered" mail, not one now and
/// another at the next flush with a success in it.
#[tokio::test]
async fn a_failure_mail_and_a_success_in_one_flush_send_one_recovered_mail() {
    let nats = NatsServer::start().await;
    let x = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    let y = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(
        &nats,
        "70",
        "hooks",
        &x.url("/hooks"),
        Some("x@example.com"),
    )
    .await;
    add_endpoint(
        &nats,
        "71",
        "hooks",
        &y.url("/hooks"),
        Some("y@example.com"),
    )
    .await;
    let mut config = test_config(&nats, None);
    // One attempt each; flushes only when an endpoint turns (failing <->
    // ok), since the interval is longer than the test. A flush writes every
    // endpoint's outcomes, so endpoint y's turns flush x's too.
    config.webhooks.retry_schedule = schedule(&[]);
    config.webhooks.health_flush_interval = Duration::from_secs(120);
    let roles = Roles {
        api: true,
        workers: [WorkerKind::Tasks, WorkerKind::Webhooks].into(),
    };
    let herald = Herald::start(config, roles).await;
    let broker = broker(&nats).await;

    // A fails for good: mailed, flushed as x turns failing.
    let a = herald.accept("70", "echo", json!({ "n": "a" })).await;
    wait_for_attempt(&herald, "70", &a, 0, "exhausted").await;
    wait_for_health(&broker, "70", "x's owner to be notified", |h| {
        h.owner_notified
    })
    .await;
    // B fails for good too (no turn: it waits in the batch), then C
    // succeeds: x turns, and B's mail and C's success flush together.
    let b = herald.accept("70", "echo", json!({ "n": "b" })).await;
    wait_for_attempt(&herald, "70", &b, 0, "exhausted").await;
    x.set_behaviour(ReceiverBehaviour::Ok);
    let c = herald.accept("70", "echo", json!({ "n": "c" })).await;
    wait_for_attempt(&herald, "70", &c, 0, "delivered").await;
    wait_for_health(&broker, "70", "x's recovery to be flushed", |h| {
        h.consecutive_failures == 0
    })
    .await;
    // D succeeds (no turn), flushed when y turns failing; y turning back
    // flushes again, after whatever mail the previous flush queued.
    let d = herald.accept("70", "echo", json!({ "n": "d" })).await;
    wait_for_attempt(&herald, "70", &d, 0, "delivered").await;
    y.set_behaviour(ReceiverBehaviour::Status(500));
    let y1 = herald.accept("71", "echo", json!({ "n": "y1" })).await;
    wait_for_attempt(&herald, "71", &y1, 0, "exhausted").await;
    wait_for_health(&broker, "71", "y's failure to be flushed", |h| {
        h.owner_notified
    })
    .await;
    y.set_behaviour(ReceiverBehaviour::Ok);
    let y2 = herald.accept("71", "echo", json!({ "n": "y2" })).await;
    wait_for_attempt(&herald, "71", &y2, 0, "delivered").await;
    wait_for_health(&broker, "71", "y's recovery to be flushed", |h| {
        !h.owner_notified
    })
    .await;

    let mails: Vec<(String, MailReason)> = queued_mails(&broker)
        .await
        .into_iter()
        .map(|m| (m.user.to_string(), m.reason))
        .collect();
    let recovered = |user: &str| {
        mails
            .iter()
            .filter(|(u, r)| u == user && *r == MailReason::EndpointRecovered)
            .count()
    };
    assert_eq!(recovered("70"), 1, "{mails:?}");
    assert_eq!(recovered("71"), 1, "{mails:?}");
    herald.stop().await;
}
