//! A delivery whose endpoint record vanishes from herald-endpoints while it
//! waits for its next attempt: held for `webhooks.endpoint_removed_grace`,
//! delivered if the record comes back in time, `endpoint_removed` only
//! after that.

use std::time::{Duration, Instant};

use herald::roles::Roles;
use herald_core::{
    names,
    payload::{DeliveryJob, EndpointConfig, decode},
};
use herald_queue::endpoints;
use herald_testkit::{NatsServer, ReceiverBehaviour, TestReceiver, wait_until};
use serde_json::{Value, json};

use crate::harness::{DEADLINE, Herald, add_endpoint_spec, broker, test_config};

const USER: &str = "vanishing";

/// Herald with a grace of `grace`, looking again every 200 ms, and one
/// endpoint (returned) whose receiver fails the first try; the next try
/// comes 2 s later.
async fn start(
    nats: &NatsServer,
    receiver: &TestReceiver,
    grace: Duration,
) -> (Herald, EndpointConfig) {
    let mut config = test_config(nats, None);
    config.webhooks.endpoint_removed_grace = grace;
    config.webhooks.paused_recheck = Duration::from_millis(200);
    let (endpoint, _) = add_endpoint_spec(
        nats,
        "hook",
        json!({ "userId": USER, "url": receiver.url("/hook"), "retry": { "schedule": ["2s"] } }),
    )
    .await;
    (Herald::start(config, Roles::all()).await, endpoint)
}

/// Accepts a task and waits until its first attempt failed and a retry
/// is scheduled.
async fn task_waiting_for_its_retry(herald: &Herald) -> String {
    let id = herald.accept(USER, "echo", json!({"n": 1})).await;
    wait_until("the first attempt to fail", DEADLINE, || async {
        let (_, task) = herald.get_task(USER, &id).await;
        (task["attempts"][0]["outcome"] == "retrying").then_some(())
    })
    .await;
    id
}

fn endpoint_id() -> herald_core::EndpointId {
    herald_core::EndpointId::from_resource("default", "hook").unwrap()
}

async fn remove_record(nats: &NatsServer) {
    endpoints::delete(&broker(nats).await, &USER.parse().unwrap(), &endpoint_id())
        .await
        .unwrap();
}

fn outcomes(task: &Value) -> Vec<String> {
    task["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_record_that_comes_back_within_the_grace_gets_its_held_delivery() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::FailFirst {
        times: 1,
        status: 500,
    })
    .await;
    let (herald, endpoint) = start(&nats, &receiver, Duration::from_secs(60)).await;
    let id = task_waiting_for_its_retry(&herald).await;
    remove_record(&nats).await;

    // The worker finds it missing at the retry and holds the delivery (a
    // schedule that says since when), recording nothing.
    let broker = broker(&nats).await;
    let stream = broker
        .jetstream_for_tests()
        .get_stream(names::WEBHOOKS_STREAM)
        .await
        .unwrap();
    let subject = names::retry_subject(
        &USER.parse().unwrap(),
        &endpoint_id(),
        &id.parse().unwrap(),
        None,
    );
    wait_until("the delivery to be held as missing", DEADLINE, || async {
        let message = stream
            .get_last_raw_message_by_subject(&subject)
            .await
            .ok()?;
        let job: DeliveryJob = decode(&message.payload).ok()?;
        job.endpoint_missing_since_ms.map(|_| ())
    })
    .await;
    let (_, task) = herald.get_task(USER, &id).await;
    assert_eq!(outcomes(&task), ["retrying"], "{task}");

    // Written again (as an operator would after a restart): delivered.
    let records = test_config(&nats, None)
        .secrets
        .record_writer("a test")
        .unwrap();
    endpoints::put_if_changed(&broker, &records, &endpoint)
        .await
        .unwrap();
    let task = herald.wait_for_state(USER, &id, "delivered").await;
    assert_eq!(outcomes(&task), ["retrying", "delivered"], "{task}");
    assert_eq!(task["endpoints"][0]["state"], "delivered", "{task}");
    assert_eq!(receiver.received().len(), 2);
    herald.stop().await;
}

#[tokio::test]
async fn a_record_gone_longer_than_the_grace_ends_endpoint_removed() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::FailFirst {
        times: 1,
        status: 500,
    })
    .await;
    // Longer than the 2 s retry: a drop at the retry itself is too early.
    let grace = Duration::from_secs(4);
    let (herald, _) = start(&nats, &receiver, grace).await;
    let id = task_waiting_for_its_retry(&herald).await;
    remove_record(&nats).await;
    let removed = Instant::now();

    let task = wait_until("the delivery to settle", DEADLINE, || async {
        let (_, task) = herald.get_task(USER, &id).await;
        let state = task["endpoints"][0]["state"].as_str()?.to_string();
        ["endpoint_removed", "delivered"]
            .contains(&state.as_str())
            .then_some(task)
    })
    .await;
    assert_eq!(task["endpoints"][0]["state"], "endpoint_removed", "{task}");
    assert_eq!(outcomes(&task), ["retrying", "endpoint_removed"], "{task}");
    assert!(
        removed.elapsed() >= grace,
        "dropped {:?} after the record went, before the {grace:?} grace",
        removed.elapsed()
    );
    // Never sent again.
    assert_eq!(receiver.received().len(), 1);
    herald.stop().await;
}
