//! A delivery whose webhook was delivered and recorded, but whose ack was
//! lost (the worker, or the NATS server it acked to, died in between), is
//! not sent again when JetStream hands the job out a second time.

use std::time::Duration;

use futures::StreamExt;
use herald::{cli::WorkerKind, roles::Roles};
use herald_core::{
    names,
    payload::{AttemptOutcome, DeliveryAttempt, DeliveryJob, TaskEvent, decode},
};
use herald_queue::publish::Outgoing;
use herald_testkit::{NatsServer, ReceiverBehaviour, TestReceiver, wait_until};
use serde_json::json;
use tokio::time::Instant;

use crate::harness::{
    DEADLINE, Herald, add_endpoint, broker, durable_consumer, test_config, worker_command,
};

#[tokio::test]
async fn a_job_delivered_before_its_ack_was_lost_is_not_sent_again() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "90", "hooks", &receiver.url("/hooks"), None).await;
    let mut config = test_config(&nats, None);
    // A job taken and not acked is handed out again after a second (a
    // request may take at most 2 s, well below three ack waits).
    config.topology.ack_wait = Duration::from_secs(1);
    config.webhooks.timeout = Duration::from_secs(2);
    // No webhook worker yet: the test takes the jobs as a dying one would.
    let roles = Roles {
        api: true,
        workers: [WorkerKind::Tasks].into(),
    };
    let herald = Herald::start(config, roles).await;
    let recorded = herald.accept("90", "echo", json!({ "n": 1 })).await;
    let unrecorded = herald.accept("90", "echo", json!({ "n": 2 })).await;

    let broker = broker(&nats).await;
    let consumer =
        durable_consumer(&broker, names::WEBHOOKS_STREAM, names::WEBHOOKS_CONSUMER).await;
    let mut jobs: Vec<DeliveryJob> = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while jobs.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the two delivery jobs never came"
        );
        let mut batch = consumer
            .fetch()
            .max_messages(2 - jobs.len())
            .expires(Duration::from_millis(500))
            .messages()
            .await
            .unwrap();
        while let Some(message) = batch.next().await {
            jobs.push(decode(&message.unwrap().payload).unwrap());
        }
    }
    // One of them reached its receiver and was recorded delivered before
    // the worker died: its attempt record is in the history, its ack never
    // came.
    let job = jobs
        .iter()
        .find(|job| job.task.to_string() == recorded)
        .unwrap();
    let attempt = DeliveryAttempt {
        endpoint: job.endpoint.clone(),
        url: String::new(),
        attempt: job.attempt,
        at_ms: herald_core::now_ms(),
        outcome: AttemptOutcome::Delivered,
        status: Some(200),
        latency_ms: 1,
        error: None,
        response_body: None,
        next_attempt_in_ms: None,
        redelivery: None,
    };
    broker
        .publish(Outgoing::task_event(
            &job.user,
            &job.task,
            TaskEvent::Delivery(attempt),
        ))
        .await
        .unwrap();

    let settings = [
        ("HERALD_TOPOLOGY__ACK_WAIT", "1s"),
        ("HERALD_WEBHOOKS__TIMEOUT", "2s"),
    ];
    let _worker = worker_command(&nats, "webhooks", &settings)
        .spawn()
        .expect("start herald worker");
    // The other one was never recorded: it is sent, as one more attempt.
    let received = receiver.wait_for(1, DEADLINE).await;
    assert_eq!(
        received[0].headers["webhook-id"],
        format!("{unrecorded}.{}", job.endpoint)
    );
    let task = herald.wait_for_state("90", &unrecorded, "delivered").await;
    assert_eq!(task["attempts"][0]["attempt"], 2, "{task}");
    // Both jobs are settled, and the recorded one sent nothing.
    wait_until("both jobs acked", DEADLINE, || {
        let mut consumer = consumer.clone();
        async move {
            let info = consumer.info().await.ok()?;
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
        }
    })
    .await;
    assert_eq!(
        receiver.received().len(),
        1,
        "the delivered job was sent again"
    );
    let (_, task) = herald.get_task("90", &recorded).await;
    assert_eq!(task["state"], "delivered", "{task}");
    assert_eq!(task["attempts"].as_array().unwrap().len(), 1, "{task}");
    herald.stop().await;
}
