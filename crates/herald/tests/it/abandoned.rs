//! Jobs that reach max_deliver while no worker of their kind runs: the
//! MAX_DELIVERIES advisory is core NATS, so only `HERALD_ADVISORIES`
//! keeping it lets a worker started later end the job recorded and told.

use std::time::Duration;

use herald::{cli::WorkerKind, roles::Roles};
use herald_core::names;
use herald_queue::Broker;
use herald_testkit::{Mailpit, NatsServer, ReceiverBehaviour, TestReceiver, wait_until};
use serde_json::{Value, json};

use crate::harness::{
    DEADLINE, Herald, add_endpoint, broker, durable_consumer, schedule, test_config, worker_command,
};

/// Settings every process of these tests shares: two deliveries, one-second
/// ack wait, no retry schedules (max_deliver must exceed them).
pub(crate) const SETTINGS: [(&str, &str); 5] = [
    ("HERALD_TOPOLOGY__MAX_DELIVER", "2"),
    ("HERALD_TOPOLOGY__ACK_WAIT", "1s"),
    ("HERALD_WEBHOOKS__RETRY_SCHEDULE", "[]"),
    ("HERALD_MAIL__RETRY_SCHEDULE", "[]"),
    ("HERALD_WEBHOOKS__TIMEOUT", "2s"),
];

pub(crate) fn config(nats: &NatsServer, mail: &Mailpit) -> herald::config::Config {
    let mut config = test_config(nats, Some(mail));
    config.topology.max_deliver = 2;
    config.topology.ack_wait = Duration::from_secs(1);
    config.webhooks.retry_schedule = schedule(&[]);
    config.mail.retry_schedule = schedule(&[]);
    config.webhooks.timeout = Duration::from_secs(2);
    config
}

/// Deliveries the work-queue consumer `consumer` of `stream` has made.
async fn deliveries(broker: &Broker, stream: &str, consumer: &str) -> u64 {
    let mut consumer = durable_consumer(broker, stream, consumer).await;
    consumer.info().await.unwrap().delivered.consumer_sequence
}

/// Starts `kinds` in a child process `times` times, each killed (SIGKILL)
/// once JetStream has handed it the job (and, with a `receiver`, once its
/// request arrived there): every delivery ends without an outcome, the last
/// one with no worker of that kind left running.
async fn kill_mid_job(
    nats: &NatsServer,
    kinds: &str,
    env: &[(&str, &str)],
    (stream, consumer): (&str, &str),
    times: u64,
    receiver: Option<&TestReceiver>,
) {
    let broker = broker(nats).await;
    for delivery in 1..=times {
        let mut worker = worker_command(nats, kinds, env)
            .spawn()
            .expect("start herald worker");
        wait_until(
            &format!("delivery {delivery} on {stream}"),
            DEADLINE,
            || async { (deliveries(&broker, stream, consumer).await >= delivery).then_some(()) },
        )
        .await;
        if let Some(receiver) = receiver {
            receiver.wait_for(delivery as usize, DEADLINE).await;
        }
        worker.start_kill().unwrap();
        worker.wait().await.unwrap();
    }
}

/// Waits until `HERALD_ADVISORIES` holds an advisory for `consumer` (its
/// advisory consumer has it pending): the job ran out of deliveries while
/// nobody listened.
pub(crate) async fn wait_for_stored_advisory(nats: &NatsServer, advisory_consumer: &str) {
    let broker = broker(nats).await;
    wait_until(
        "the max-deliveries advisory to be stored",
        DEADLINE,
        || async {
            let stream = broker
                .jetstream_for_tests()
                .get_stream(names::ADVISORIES_STREAM)
                .await
                .ok()?;
            let mut consumer: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer(advisory_consumer).await.ok()?;
            (consumer.info().await.ok()?.num_pending == 1).then_some(())
        },
    )
    .await;
}

/// Waits until the abandoned job is gone from `stream` and its advisory
/// from `HERALD_ADVISORIES`: deleted only once its end is recorded.
pub(crate) async fn wait_for_removal(nats: &NatsServer, stream: &str) {
    wait_until(
        &format!("the job on {stream} and its advisory to be removed"),
        DEADLINE,
        || async {
            (stored(nats, stream).await == 0 && stored(nats, names::ADVISORIES_STREAM).await == 0)
                .then_some(())
        },
    )
    .await;
}

/// Messages `stream` holds now.
async fn stored(nats: &NatsServer, stream: &str) -> u64 {
    let broker = broker(nats).await;
    let mut stream = broker
        .jetstream_for_tests()
        .get_stream(stream)
        .await
        .unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test]
async fn a_delivery_past_max_deliver_while_no_webhook_worker_runs_is_recorded_and_mailed() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Hang).await;
    add_endpoint(
        &nats,
        "40",
        "hooks",
        &receiver.url("/hooks"),
        Some("owner40@example.com"),
    )
    .await;
    // Webhook delivery only in the worker processes killed below.
    let roles = Roles {
        api: true,
        workers: [WorkerKind::Tasks, WorkerKind::Mail].into(),
    };
    let herald = Herald::start(config(&nats, &mail), roles).await;

    let id = herald.accept("40", "echo", json!({})).await;
    kill_mid_job(
        &nats,
        "webhooks",
        &SETTINGS,
        (names::WEBHOOKS_STREAM, names::WEBHOOKS_CONSUMER),
        2,
        Some(&receiver),
    )
    .await;
    wait_for_stored_advisory(&nats, names::WEBHOOKS_MAX_DELIVERIES_CONSUMER).await;
    // Stuck: neither delivered nor mailed, still in the stream.
    let (_, task) = herald.get_task("40", &id).await;
    assert_eq!(task["state"], "delivering", "{task}");
    assert_eq!(stored(&nats, names::WEBHOOKS_STREAM).await, 1);

    let mut worker = worker_command(&nats, "webhooks", &SETTINGS)
        .spawn()
        .expect("start herald worker");
    let task = herald.wait_for_state("40", &id, "mailed").await;
    let attempts = task["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{task}");
    assert_eq!(attempts[0]["outcome"], "exhausted", "{task}");
    assert_eq!(attempts[0]["attempt"], 2, "{task}");
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap()
            .contains("gave up after 2 deliveries"),
        "{task}"
    );
    let mails = mail
        .wait_for_messages("owner40@example.com", 1, DEADLINE)
        .await;
    assert!(mails[0].text.contains(&id), "{}", mails[0].text);
    wait_for_removal(&nats, names::WEBHOOKS_STREAM).await;
    assert_eq!(receiver.received().len(), 2, "delivered past max_deliver");
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    herald.stop().await;
}

#[tokio::test]
async fn a_task_past_max_deliver_while_no_task_worker_runs_is_recorded_failed_and_reported() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(
        &nats,
        "41",
        "hooks",
        &receiver.url("/hooks"),
        Some("owner41@example.com"),
    )
    .await;
    // Tasks run only in the worker processes killed below.
    let roles = Roles {
        api: true,
        workers: [WorkerKind::Webhooks, WorkerKind::Mail].into(),
    };
    let herald = Herald::start(config(&nats, &mail), roles).await;

    // The demo handler works for a minute: the worker dies mid-task.
    let settings: Vec<(&str, &str)> = SETTINGS
        .into_iter()
        .chain([("HERALD_TASKS__TRANSCODE_DURATION", "60s")])
        .collect();
    let id = herald
        .accept("41", "transcode", json!({"file": "a.mp4"}))
        .await;
    kill_mid_job(
        &nats,
        "tasks",
        &settings,
        (names::TASKS_STREAM, names::TASKS_CONSUMER),
        2,
        None,
    )
    .await;
    wait_for_stored_advisory(&nats, names::TASKS_MAX_DELIVERIES_CONSUMER).await;
    let (_, task) = herald.get_task("41", &id).await;
    assert_eq!(task["state"], "queued", "stuck, not failed yet: {task}");
    assert_eq!(stored(&nats, names::TASKS_STREAM).await, 1);

    let mut worker = worker_command(&nats, "tasks", &settings)
        .spawn()
        .expect("start herald worker");
    let task = herald.wait_for_state("41", &id, "failed").await;
    assert!(
        task["error"]
            .as_str()
            .unwrap_or_default()
            .contains("gave up after 2 deliveries"),
        "{task}"
    );
    // Told as any failed task is: the `<type>.failed` webhook.
    let received = receiver.wait_for(1, DEADLINE).await;
    let body: Value = serde_json::from_str(&received[0].body).unwrap();
    assert_eq!(body["type"], "transcode.failed", "{body}");
    assert_eq!(body["data"]["task_id"], id.as_str(), "{body}");
    assert!(
        body["data"]["error"]
            .as_str()
            .unwrap()
            .contains("max_deliver"),
        "{body}"
    );
    wait_for_removal(&nats, names::TASKS_STREAM).await;
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    herald.stop().await;
}

#[tokio::test]
async fn a_mail_past_max_deliver_while_no_mail_worker_runs_is_recorded_failed() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    add_endpoint(
        &nats,
        "42",
        "hooks",
        &receiver.url("/hooks"),
        Some("owner42@example.com"),
    )
    .await;
    // An SMTP server that accepts connections and never greets: every
    // mail worker hangs in its send until it is killed.
    let smtp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_port = smtp.local_addr().unwrap().port().to_string();
    let _hanging = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = smtp.accept().await {
            held.push(socket);
        }
    });
    // Mail only in the worker processes killed below.
    let roles = Roles {
        api: true,
        workers: [WorkerKind::Tasks, WorkerKind::Webhooks].into(),
    };
    let herald = Herald::start(config(&nats, &mail), roles).await;

    let id = herald.accept("42", "echo", json!({})).await;
    let hanging: Vec<(&str, &str)> = SETTINGS
        .into_iter()
        .chain([("HERALD_MAIL__SMTP_PORT", hanging_port.as_str())])
        .collect();
    kill_mid_job(
        &nats,
        "mail",
        &hanging,
        (names::MAIL_STREAM, names::MAIL_CONSUMER),
        2,
        None,
    )
    .await;
    wait_for_stored_advisory(&nats, names::MAIL_MAX_DELIVERIES_CONSUMER).await;
    assert_eq!(stored(&nats, names::MAIL_STREAM).await, 1);

    let smtp_port = mail.smtp_port().to_string();
    let working: Vec<(&str, &str)> = SETTINGS
        .into_iter()
        .chain([("HERALD_MAIL__SMTP_PORT", smtp_port.as_str())])
        .collect();
    let mut worker = worker_command(&nats, "mail", &working)
        .spawn()
        .expect("start herald worker");
    let task = wait_until("the mail's failure to be recorded", DEADLINE, || async {
        let (_, task) = herald.get_task("42", &id).await;
        (task["mails"].as_array()?.len() == 1).then_some(task)
    })
    .await;
    let outcome = &task["mails"][0];
    assert_eq!(outcome["sent"], false, "{task}");
    assert!(
        outcome["error"]
            .as_str()
            .unwrap()
            .contains("gave up after 2 deliveries"),
        "{task}"
    );
    wait_for_removal(&nats, names::MAIL_STREAM).await;
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    herald.stop().await;
}
