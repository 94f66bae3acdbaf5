//! Replay requests as whoever holds the API's NATS credentials could
//! publish them: the task worker re-sends only a user's own stored webhook
//! to endpoints it went to, records every request it cannot carry out, and
//! never queues a round twice.

use std::time::Duration;

use async_nats::jetstream::{consumer::PullConsumer, stream::RetentionPolicy};
use futures::StreamExt;
use herald::roles::Roles;
use herald_core::{
    TaskId, UserId, names,
    payload::{AttemptOutcome, TaskEvent},
};
use herald_queue::{Broker, publish::Outgoing};
use herald_testkit::{Mailpit, NatsServer, ReceiverBehaviour, TestReceiver, wait_until};
use serde_json::{Value, json};

use crate::{
    abandoned,
    harness::{
        DEADLINE, Herald, add_endpoint, broker, durable_consumer, test_config, worker_command,
    },
};

/// Stores a replay request with any fields, under its own subject and the
/// `Nats-Msg-Id` `msg_id`.
async fn publish_request(broker: &Broker, request: Value, msg_id: &str) {
    let subject = format!(
        "herald.replays.{}.{}.{}",
        request["user"].as_str().unwrap(),
        request["task"].as_str().unwrap(),
        request["redelivery"].as_str().unwrap(),
    );
    broker
        .publish_all(vec![Outgoing::new(
            subject,
            msg_id.to_string(),
            serde_json::to_vec(&request).unwrap(),
        )])
        .await
        .unwrap();
}

fn request(user: &str, task: &str, endpoint: &str, round: &str) -> Value {
    json!({
        "v": 1, "user": user, "task": task, "endpoints": [endpoint],
        "redelivery": round, "cause": "redeliver",
    })
}

/// Waits until the task worker recorded that it did not carry out round
/// `round` (for `user`'s history of `task`); returns the reason.
async fn refusal(broker: &Broker, user: &str, task: &str, round: &str) -> String {
    let (user, task) = (UserId::new(user).unwrap(), TaskId::new(task).unwrap());
    wait_until(
        &format!("round {round} to be recorded"),
        DEADLINE,
        || async {
            let events = herald_queue::history::task_events(broker, &user, &task)
                .await
                .ok()?;
            events.into_iter().find_map(|event| match event {
                TaskEvent::Delivery(attempt) if attempt.redelivery.as_deref() == Some(round) => {
                    assert_eq!(attempt.outcome, AttemptOutcome::Abandoned, "{attempt:?}");
                    assert_eq!(attempt.attempt, 0, "nothing was sent: {attempt:?}");
                    attempt.error
                }
                _ => None,
            })
        },
    )
    .await
}

/// Waits until nothing is left in the work-queue streams of tasks and
/// webhooks: every request handled, every job it queued delivered.
async fn drained(broker: &Broker) {
    wait_until(
        "the task and webhook streams to drain",
        DEADLINE,
        || async {
            for stream in [names::TASKS_STREAM, names::WEBHOOKS_STREAM] {
                let mut stream = broker.jetstream_for_tests().get_stream(stream).await.ok()?;
                if stream.info().await.ok()?.state.messages != 0 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
}

#[tokio::test]
async fn a_replay_request_resends_only_a_users_own_webhook_and_records_what_it_refuses() {
    let nats = NatsServer::start().await;
    let alice = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let bob = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "41", "alice", &alice.url("/in"), None).await;
    add_endpoint(&nats, "42", "bob", &bob.url("/in"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;
    let broker = broker(&nats).await;

    let task = herald
        .accept("41", "echo", json!({ "secret": "alice's" }))
        .await;
    herald.wait_for_state("41", &task, "delivered").await;
    let original = alice.wait_for(1, DEADLINE).await.remove(0);

    // A body in the request is not read: the webhook comes from the record.
    let mut forged = request("41", &task, "default_alice", "rd-forged");
    forged["body"] = json!(r#"{"type":"echo.completed","data":{"evil":true}}"#);
    publish_request(&broker, forged.clone(), "forged-1").await;
    // Handled twice (as after a lost ack): the round is queued once.
    publish_request(&broker, forged, "forged-2").await;
    let resent = alice.wait_for(2, DEADLINE).await.remove(1);
    assert_eq!(resent.body, original.body, "the body was not the record's");
    assert_eq!(resent.headers["webhook-id"], original.headers["webhook-id"]);

    // Another user's task, to that user's own endpoint: no such task for
    // them.
    let theft = request("42", &task, "default_bob", "rd-theft");
    publish_request(&broker, theft, "t").await;
    let why = refusal(&broker, "42", &task, "rd-theft").await;
    assert!(why.contains("no record of this task"), "{why}");
    // The owner's task, to an endpoint it never went to.
    let elsewhere = request("41", &task, "default_bob", "rd-elsewhere");
    publish_request(&broker, elsewhere, "e").await;
    let why = refusal(&broker, "41", &task, "rd-elsewhere").await;
    assert!(why.contains("never sent to this endpoint"), "{why}");
    // A task that does not exist (or whose record expired).
    let gone = "01a22359-3238-7167-a1b7-33a2de398bde";
    let gone_request = request("41", gone, "default_alice", "rd-gone");
    publish_request(&broker, gone_request, "g").await;
    refusal(&broker, "41", gone, "rd-gone").await;
    // A stored record that cannot be read.
    let unreadable = "01a22359-3238-7167-a1b7-33a2de398bdf";
    let records = broker
        .jetstream_for_tests()
        .get_key_value(names::TASKS_BUCKET)
        .await
        .unwrap();
    records.put(unreadable, "{\"v\":1,".into()).await.unwrap();
    let unreadable_request = request("41", unreadable, "default_alice", "rd-unreadable");
    publish_request(&broker, unreadable_request, "u").await;
    let why = refusal(&broker, "41", unreadable, "rd-unreadable").await;
    assert!(why.contains("cannot be read"), "{why}");

    drained(&broker).await;
    assert_eq!(alice.received().len(), 2, "a round was sent twice");
    assert!(bob.received().is_empty(), "bob got alice's webhook");
    // The owner's view: the refused round is in the history, and the
    // delivery the refusal was about did not change.
    let (status, shown) = herald.get_task("41", &task).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["state"], "delivered", "{shown}");
    let (status, _) = herald.get_task("42", &task).await;
    assert_eq!(status, 404, "bob's refused request revealed alice's task");
    herald.stop().await;
}

#[tokio::test]
async fn a_replay_request_past_max_deliver_while_no_task_worker_runs_is_recorded() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let broker = broker(&nats).await;
    let config = abandoned::config(&nats, &mail);
    herald_queue::topology::ensure(&broker, &config.topology)
        .await
        .unwrap();
    let task = "01a22359-3238-7167-a1b7-33a2de398be0";
    publish_request(&broker, request("43", task, "default_x", "rd-stuck"), "s").await;

    // Taken twice and never acked, as by task workers that died on it.
    let consumer = durable_consumer(&broker, names::TASKS_STREAM, names::TASKS_CONSUMER).await;
    for delivery in 1..=2 {
        wait_until(&format!("delivery {delivery}"), DEADLINE, || async {
            let mut batch = consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .ok()?;
            batch.next().await?.ok().map(|_| ())
        })
        .await;
    }
    // The server notices max_deliver when it would deliver again (a pull
    // waiting), and then publishes the advisory instead.
    let mut third = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(3))
        .messages()
        .await
        .unwrap();
    assert!(third.next().await.is_none(), "delivered past max_deliver");
    abandoned::wait_for_stored_advisory(&nats, names::TASKS_MAX_DELIVERIES_CONSUMER).await;

    let mut worker = worker_command(&nats, "tasks", &abandoned::SETTINGS)
        .spawn()
        .expect("start herald worker");
    let why = refusal(&broker, "43", task, "rd-stuck").await;
    assert!(why.contains("gave up after 2 deliveries"), "{why}");
    abandoned::wait_for_removal(&nats, names::TASKS_STREAM).await;
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
}

#[tokio::test]
async fn a_tasks_consumer_from_before_replay_requests_is_updated_in_place() {
    let nats = NatsServer::start().await;
    let broker = broker(&nats).await;
    // The stream and consumer as an earlier Herald made them, one task
    // waiting.
    broker
        .jetstream_for_tests()
        .create_stream(async_nats::jetstream::stream::Config {
            name: names::TASKS_STREAM.into(),
            subjects: vec![names::TASKS_SUBJECTS.into()],
            retention: RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await
        .unwrap();
    let stream = broker
        .jetstream_for_tests()
        .get_stream(names::TASKS_STREAM)
        .await
        .unwrap();
    let old = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some(names::TASKS_CONSUMER.into()),
            filter_subject: names::TASKS_SUBJECTS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let created = old.cached_info().created;
    let waiting = "herald.tasks.echo.43.01a22359-3238-7167-a1b7-33a2de398be1";
    broker
        .publish_all(vec![Outgoing::new(waiting.into(), None, b"{}".to_vec())])
        .await
        .unwrap();

    herald_queue::topology::ensure(&broker, &Default::default())
        .await
        .unwrap();
    let mut consumer: PullConsumer = stream.get_consumer(names::TASKS_CONSUMER).await.unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.created, created, "the consumer was recreated");
    assert_eq!(
        info.config.filter_subjects,
        vec![names::TASKS_SUBJECTS, names::REPLAYS_SUBJECTS],
        "{:?}",
        info.config
    );
    assert_eq!(info.num_pending, 1, "the waiting task was lost");
    publish_request(&broker, request("43", "t", "e", "rd-1"), "r").await;
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_pending, 2, "the consumer does not take requests");
}

#[tokio::test]
async fn a_repeated_redeliver_waits_for_the_stored_request_and_queues_one_round() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "44", "hooks", &receiver.url("/in"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;
    let task = herald.accept("44", "echo", json!({ "n": 1 })).await;
    herald.wait_for_state("44", &task, "delivered").await;
    herald.stop().await;

    // No task worker: the request stays stored, and the history does not
    // show the round yet.
    let api_only = Roles {
        api: true,
        workers: Default::default(),
    };
    let herald = Herald::start(test_config(&nats, None), api_only).await;
    let path = format!("{}/users/44/tasks/{task}/redeliver", herald.api);
    let first = herald.http.post(&path).send().await.unwrap();
    assert_eq!(first.status(), 202);
    let again = herald.http.post(&path).send().await.unwrap();
    assert_eq!(again.status(), 409, "a second round was queued");
    let refusal: Value = again.json().await.unwrap();
    assert_eq!(
        refusal["error"]["code"], "delivery_in_progress",
        "{refusal}"
    );
    herald.stop().await;

    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;
    receiver.wait_for(2, DEADLINE).await;
    let broker = broker(&nats).await;
    drained(&broker).await;
    assert_eq!(receiver.received().len(), 2, "sent more than once again");
    herald.stop().await;
}
