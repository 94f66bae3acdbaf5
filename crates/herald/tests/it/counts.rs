//! Attempt numbers count requests that reached the network, nothing else.

use herald::roles::Roles;
use herald_core::names;
use herald_testkit::{NatsServer, ReceiverBehaviour, TestReceiver, wait_until};
use serde_json::json;

use crate::harness::{DEADLINE, Herald, add_endpoint_spec, broker, test_config};

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
        .jetstream
        .delete_key_value(names::RATE_LIMITS_BUCKET)
        .await
        .unwrap();

    let id = herald.accept("50", "echo", json!({})).await;
    wait_until("the delivery to be handed back twice", DEADLINE, || async {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = broker
            .jetstream
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
