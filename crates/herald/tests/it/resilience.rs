//! NATS restarts and worker crashes lose nothing.

use std::{collections::HashMap, process::Stdio, time::Duration};

use futures::{StreamExt, stream};
use herald::{cli::WorkerKind, roles::Roles};
use herald_core::names::WEBHOOKS_CONSUMER;
use herald_testkit::{Mailpit, NatsServer, ReceiverBehaviour, TestReceiver, wait_until};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};

use crate::harness::{
    DEADLINE, Herald, add_endpoint, broker, schedule, test_config, worker_command, worker_process,
};

/// While NATS is down for longer than `topology.store_timeout`, a POST
/// keeps trying for that long, then answers 503; once NATS is back, tasks
/// flow again without a restart.
#[tokio::test]
async fn the_api_answers_503_while_nats_is_down_and_recovers_without_restart() {
    let mut nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "8", "hooks", &receiver.url("/hooks"), None).await;
    let mut config = test_config(&nats, None);
    config.topology.store_timeout = Duration::from_secs(1);
    let herald = Herald::start(config, Roles::all()).await;
    let before = herald.accept("8", "echo", json!({ "n": "before" })).await;
    herald.wait_for_state("8", &before, "delivered").await;

    nats.stop().await;
    let posted = std::time::Instant::now();
    let (status, body) = herald
        .post_task("8", "echo", json!({ "n": "during" }))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    assert!(
        posted.elapsed() >= Duration::from_secs(1),
        "the POST kept trying for topology.store_timeout, a reconnect away, before answering"
    );
    let ready = herald
        .http
        .get(format!("{}/readyz", herald.api))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503);

    nats.start_again().await;
    let after = wait_until("the API to accept tasks again", DEADLINE, || async {
        let (status, body) = herald.post_task("8", "echo", json!({ "n": "after" })).await;
        (status == 201).then(|| body["id"].as_str().unwrap().to_string())
    })
    .await;
    herald.wait_for_state("8", &after, "delivered").await;
    assert!(receiver.received().iter().any(|w| w.body.contains(&after)));

    // The workers' endpoint watch came back with the server: an endpoint
    // added now is used for the next task.
    let second = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "8", "second", &second.url("/second"), None).await;
    let both = wait_until(
        "a task delivered to the new endpoint too",
        DEADLINE,
        || async {
            let id = herald.accept("8", "echo", json!({ "n": "both" })).await;
            let task = herald.wait_for_state("8", &id, "delivered").await;
            (task["endpoints"].as_array().unwrap().len() == 2).then_some(id)
        },
    )
    .await;
    assert!(second.received().iter().any(|w| w.body.contains(&both)));
    herald.stop().await;
}

/// A POST that arrives while NATS restarts waits for it (within
/// `topology.store_timeout`) and answers 201 instead of 503: the task is
/// stored once and delivered once.
#[tokio::test]
async fn a_task_posted_while_nats_restarts_is_stored_once_it_is_back() {
    let mut nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "9", "hooks", &receiver.url("/hooks"), None).await;
    let mut config = test_config(&nats, None);
    config.topology.store_timeout = Duration::from_secs(30);
    let herald = Herald::start(config, Roles::all()).await;
    let ready = || async {
        let answer = herald
            .http
            .get(format!("{}/readyz", herald.api))
            .send()
            .await;
        answer.map(|a| a.status().as_u16()).ok()
    };

    nats.stop().await;
    // The API knows its connection is gone before the task arrives, so the
    // POST below meets a disconnected client.
    wait_until("the API to see NATS gone", DEADLINE, || async {
        (ready().await == Some(503)).then_some(())
    })
    .await;
    let post = herald.post_task("9", "echo", json!({ "n": "across the restart" }));
    let restart = async {
        nats.start_again().await;
    };
    let ((status, body), ()) = tokio::join!(post, restart);
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    herald.wait_for_state("9", &id, "delivered").await;
    let webhooks = receiver
        .received()
        .iter()
        .filter(|w| w.body.contains(&id))
        .count();
    assert_eq!(webhooks, 1, "stored once, delivered once");
    herald.stop().await;
}

/// A worker process killed with SIGKILL while it holds messages: after a
/// restart every accepted task is delivered, and any duplicate carries the
/// same webhook-id as the first delivery.
#[tokio::test]
async fn a_killed_worker_loses_nothing() {
    const TASKS: usize = 2000;
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "9", "hooks", &receiver.url("/hooks"), None).await;
    let config = test_config(&nats, None);
    let herald = Herald::start(config.clone(), Roles::api_only()).await;

    // Short ack_wait so the killed worker's messages come back quickly.
    // `transcode` tasks of 20 ms, 16 at a time, pace the worker at about
    // 800 tasks/s, so the kill lands mid-stream with held messages in both
    // consumers rather than after the last delivery.
    let spawn_worker = || {
        worker_process(
            &nats,
            &[
                ("HERALD_TOPOLOGY__ACK_WAIT", "2s"),
                ("HERALD_TASKS__TRANSCODE_DURATION", "20ms"),
                ("HERALD_TASKS__CONCURRENCY", "16"),
                ("HERALD_WEBHOOKS__TIMEOUT", "500ms"),
            ],
        )
    };
    let mut worker = spawn_worker();

    let ids: Vec<String> = stream::iter(0..TASKS)
        .map(|i| {
            let herald = &herald;
            async move { herald.accept("9", "transcode", json!({ "i": i })).await }
        })
        .buffer_unordered(50)
        .collect()
        .await;

    // Kill the worker mid-stream: once some, but not all, have arrived.
    wait_until("a third of the webhooks", DEADLINE, || async {
        (receiver.received().len() >= TASKS / 3).then_some(())
    })
    .await;
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    let at_kill = receiver.received().len();
    assert!(
        at_kill < TASKS,
        "the worker finished before it was killed; raise TASKS"
    );

    let mut worker = spawn_worker();
    let by_task = wait_until(
        "every task to be delivered",
        Duration::from_secs(120),
        || async {
            let mut by_task: HashMap<String, Vec<String>> = HashMap::new();
            for webhook in receiver.received() {
                let body: serde_json::Value = serde_json::from_str(&webhook.body).unwrap();
                let task = body["data"]["task_id"].as_str().unwrap().to_string();
                by_task
                    .entry(task)
                    .or_default()
                    .push(webhook.headers["webhook-id"].clone());
            }
            ids.iter()
                .all(|id| by_task.contains_key(id))
                .then_some(by_task)
        },
    )
    .await;
    for (task, webhook_ids) in &by_task {
        assert!(
            ids.contains(task),
            "a webhook for a task never accepted: {task}"
        );
        let expected = format!("{task}.default_hooks");
        assert!(
            webhook_ids.iter().all(|w| *w == expected),
            "duplicate with another webhook-id: {webhook_ids:?}"
        );
    }
    let duplicates: usize = by_task.values().map(|v| v.len() - 1).sum();
    eprintln!("killed at {at_kill}/{TASKS} delivered; duplicates after restart: {duplicates}");
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    herald.stop().await;
}

/// SIGTERM while tasks are in flight: the worker finishes what it holds,
/// hands back what it has not started, and exits 0 within the grace period.
/// Nothing is lost and, unlike after SIGKILL, nothing is delivered twice.
#[tokio::test]
async fn a_worker_stopped_with_sigterm_finishes_its_work_and_exits_cleanly() {
    const TASKS: usize = 40;
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "10", "hooks", &receiver.url("/hooks"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::api_only()).await;
    // 8 tasks of 300 ms at a time: about 1.5 s of work in all.
    let spawn_worker = || {
        worker_process(
            &nats,
            &[
                ("HERALD_TASKS__TRANSCODE_DURATION", "300ms"),
                ("HERALD_TASKS__CONCURRENCY", "8"),
                ("HERALD_SHUTDOWN__GRACE", "10s"),
            ],
        )
    };
    let mut worker = spawn_worker();
    let mut ids = Vec::new();
    for i in 0..TASKS {
        ids.push(herald.accept("10", "transcode", json!({ "i": i })).await);
    }
    receiver.wait_for(8, DEADLINE).await;

    let pid = Pid::from_raw(worker.id().expect("worker is running") as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(15), worker.wait())
        .await
        .expect("the worker did not exit within its grace period")
        .unwrap();
    assert!(status.success(), "worker exited with {status}");
    let at_stop = receiver.received().len();
    assert!(
        at_stop < TASKS,
        "every task was done before SIGTERM; give the worker more to do"
    );

    let mut worker = spawn_worker();
    let received = receiver.wait_for(TASKS, DEADLINE).await;
    let mut webhook_ids: Vec<_> = received
        .iter()
        .map(|w| w.headers["webhook-id"].clone())
        .collect();
    webhook_ids.sort();
    webhook_ids.dedup();
    assert_eq!(
        webhook_ids.len(),
        received.len(),
        "a webhook was delivered twice after a graceful stop"
    );
    for id in &ids {
        herald.wait_for_state("10", id, "delivered").await;
    }
    eprintln!("stopped at {at_stop}/{TASKS} delivered");
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
    herald.stop().await;
}

/// A job whose deliveries keep ending without an outcome (here: the worker
/// is killed mid-request, twice) reaches the consumer's max_deliver; the
/// safety net turns it into an exhausted attempt and a mail, never a
/// silent drop.
#[tokio::test]
async fn a_job_that_reaches_max_deliver_is_recorded_and_mailed() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Hang).await;
    add_endpoint(
        &nats,
        "13",
        "hooks",
        &receiver.url("/hooks"),
        Some("owner13@example.com"),
    )
    .await;
    let settings = [
        ("HERALD_TOPOLOGY__MAX_DELIVER", "2"),
        ("HERALD_TOPOLOGY__ACK_WAIT", "1s"),
        ("HERALD_WEBHOOKS__RETRY_SCHEDULE", "[]"),
        ("HERALD_MAIL__RETRY_SCHEDULE", "[]"),
        ("HERALD_WEBHOOKS__TIMEOUT", "2s"),
    ];
    let mut config = test_config(&nats, Some(&mail));
    config.topology.max_deliver = 2;
    config.topology.ack_wait = Duration::from_secs(1);
    config.webhooks.retry_schedule = schedule(&[]);
    config.mail.retry_schedule = schedule(&[]);
    config.webhooks.timeout = Duration::from_secs(2);
    // Webhook delivery only in the worker processes killed below.
    let roles = Roles {
        api: true,
        workers: [WorkerKind::Tasks, WorkerKind::Mail].into(),
    };
    let herald = Herald::start(config, roles).await;

    let id = herald.accept("13", "echo", json!({})).await;
    for delivery in 1..=2 {
        let mut worker = worker_process(&nats, &settings);
        receiver.wait_for(delivery, DEADLINE).await;
        worker.start_kill().unwrap();
        worker.wait().await.unwrap();
    }
    // A live webhook worker hears the advisory when the job runs out.
    let _worker = worker_process(&nats, &settings);
    let task = herald.wait_for_state("13", &id, "mailed").await;
    let attempts = task["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{task}");
    assert_eq!(attempts[0]["outcome"], "exhausted");
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap()
            .contains("gave up after 2 deliveries"),
        "{task}"
    );
    mail.wait_for_messages("owner13@example.com", 1, DEADLINE)
        .await;
    assert_eq!(receiver.received().len(), 2, "delivered past max_deliver");
    herald.stop().await;
}

/// SIGTERM while a delivery is in flight: it finishes during the drain, and
/// its outcome still reaches `herald-endpoint-health` before the worker
/// exits. (The flusher used to stop at the first flush after the signal,
/// so what the drain recorded was lost.) The periodic flush is an hour
/// away: only the flush after the drain can write the record.
#[tokio::test]
async fn a_delivery_that_finishes_during_the_drain_reaches_the_health_record() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Held).await;
    add_endpoint(&nats, "14", "hooks", &receiver.url("/hooks"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::api_only()).await;
    let mut worker = worker_command(
        &nats,
        "tasks,webhooks",
        &[
            ("HERALD_WEBHOOKS__HEALTH_FLUSH_INTERVAL", "1h"),
            ("HERALD_SHUTDOWN__GRACE", "20s"),
            ("HERALD_LOG__FILTER", "info"),
            ("HERALD_LOG__FORMAT", "json"),
        ],
    )
    .stderr(Stdio::piped())
    .spawn()
    .expect("start herald worker");
    let mut log = log_lines(worker.stderr.take().expect("piped stderr"));

    let id = herald.accept("14", "echo", json!({})).await;
    receiver.wait_for(1, DEADLINE).await;
    let pid = Pid::from_raw(worker.id().expect("worker is running") as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    // Answer only once the webhook consumer drains: the outcome is
    // recorded after shutdown began.
    tokio::time::timeout(DEADLINE, async {
        while let Some(line) = log.recv().await {
            let fields = &line["fields"];
            if fields["message"] == "draining" && fields["consumer"] == WEBHOOKS_CONSUMER {
                assert_eq!(fields["in_flight"], 1, "the delivery is in flight");
                return;
            }
        }
        panic!("the worker exited without draining the webhook consumer");
    })
    .await
    .expect("the webhook consumer did not start draining");
    receiver.release();

    let status = tokio::time::timeout(DEADLINE, worker.wait())
        .await
        .expect("the worker did not exit after its drain")
        .unwrap();
    assert!(status.success(), "worker exited with {status}");
    herald.wait_for_state("14", &id, "delivered").await;
    let health = herald_queue::health::read(
        &broker(&nats).await,
        &"14".parse().unwrap(),
        &"default_hooks".parse().unwrap(),
    )
    .await
    .unwrap()
    .expect("the delivery finished during the drain left no health record");
    assert!(
        health.last_success_ms.is_some(),
        "the success is not in the health record: {health:?}"
    );
    herald.stop().await;
}

/// The JSON log lines of a child's stderr, read to its end (so the child
/// never blocks on a full pipe).
fn log_lines(stderr: tokio::process::ChildStderr) -> mpsc::UnboundedReceiver<serde_json::Value> {
    let (lines, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if let Ok(value) = serde_json::from_str(&line) {
                let _ = lines.send(value);
            }
        }
    });
    received
}
