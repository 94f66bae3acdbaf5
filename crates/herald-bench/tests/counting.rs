//! The driver's counting against real loopback servers: a stand-in API
//! that answers and sends webhooks the way a test tells it to (a 500, a
//! task never delivered, one delivered twice, one nobody posted), and the
//! baseline against a real nats-server. Nothing here is timed.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::post,
};
use herald_bench::{
    jetstream_bound::{self, Bound},
    load::{self, Load},
    receiver::Receiver,
    run::{Waiting, run},
};
use herald_testkit::NatsServer;

/// What the stand-in API does with its `k`-th request.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// Answer 500: nothing stored.
    Status500,
    /// Answer 201, never send the webhook.
    NeverDeliver,
    /// Answer 201, send the webhook twice.
    DeliverTwice,
    /// Answer 201 and deliver, and also send a webhook for a task nobody
    /// posted.
    AlsoStray,
}

struct Api {
    requests: AtomicUsize,
    plan: fn(usize) -> Fault,
    receiver: String,
    client: reqwest::Client,
}

async fn accept(State(api): State<Arc<Api>>) -> Response {
    let k = api.requests.fetch_add(1, Ordering::SeqCst);
    let task = format!("task-{k}");
    let webhooks = match (api.plan)(k) {
        Fault::Status500 => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        Fault::None => vec![task.clone()],
        Fault::NeverDeliver => vec![],
        Fault::DeliverTwice => vec![task.clone(), task.clone()],
        Fault::AlsoStray => vec![task.clone(), "task-nobody-posted".to_string()],
    };
    for id in webhooks {
        let (client, url) = (api.client.clone(), api.receiver.clone());
        // After the answer, as Herald's workers deliver.
        tokio::spawn(async move {
            let body = format!(
                r#"{{"type":"task.succeeded","timestamp":"2026-12-01T12:00:00.000Z","data":{{"task_id":"{id}","user":"1","type":"echo"}}}}"#
            );
            client
                .post(url)
                .header("webhook-id", format!("msg_{id}"))
                .body(body)
                .send()
                .await
                .expect("the receiver is listening");
        });
    }
    (StatusCode::CREATED, format!(r#"{{"id":"{task}"}}"#)).into_response()
}

/// Starts the stand-in API; returns its task URL.
async fn start_api(plan: fn(usize) -> Fault, receiver: SocketAddr) -> String {
    let api = Arc::new(Api {
        requests: AtomicUsize::new(0),
        plan,
        receiver: format!("http://{receiver}/webhooks"),
        client: load::client(8, Duration::from_secs(5)),
    });
    let router = Router::new()
        .route("/users/{user}/tasks/{type}", post(accept))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free loopback port");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}/users/{{user}}/tasks/{{type}}")
}

fn load(url: String, tasks: usize, rate: Option<f64>) -> Load {
    Load {
        url,
        tasks,
        concurrency: 2,
        rate,
        users: 3,
        first_user: 1,
        task_type: "echo".to_string(),
        request_timeout: Duration::from_secs(5),
        send_deadline: Instant::now() + Duration::from_secs(30),
    }
}

async fn receiver() -> Receiver {
    Receiver::bind("127.0.0.1:0".parse().expect("an address"))
        .await
        .expect("a free loopback port")
}

#[tokio::test]
async fn non_201_missing_duplicate_and_stray_webhooks_are_each_counted() {
    let receiver = receiver().await;
    let url = start_api(
        |k| match k {
            1 => Fault::AlsoStray,
            3 => Fault::Status500,
            5 => Fault::NeverDeliver,
            7 => Fault::DeliverTwice,
            _ => Fault::None,
        },
        receiver.addr(),
    )
    .await;
    // The missing webhook never comes: the run waits out this deadline.
    let waiting = Waiting {
        deadline: Instant::now() + Duration::from_secs(3),
        grace: Duration::from_millis(300),
    };
    let tally = run(&load(url, 10, None), &receiver, waiting).await;

    assert_eq!(tally.sent, 10);
    assert_eq!(tally.accepted, 9);
    assert_eq!(tally.rejected, BTreeMap::from([(500, 1)]));
    assert_eq!(tally.failed_requests, 0);
    assert_eq!(tally.delivered, 8);
    assert_eq!(tally.missing, 1, "task-5 was never delivered");
    assert_eq!(tally.duplicates, 1, "task-7 was delivered twice");
    assert_eq!(tally.repeated_webhook_ids, 1);
    assert_eq!(tally.strays, 1);
    assert_eq!(tally.unreadable, 0);
    assert!(!tally.clean());
    receiver.stop().await;
}

#[tokio::test]
async fn a_clean_open_loop_run_counts_no_fault_and_measures_from_the_schedule() {
    let receiver = receiver().await;
    let url = start_api(|_| Fault::None, receiver.addr()).await;
    let waiting = Waiting {
        deadline: Instant::now() + Duration::from_secs(20),
        grace: Duration::from_millis(100),
    };
    let tally = run(&load(url, 20, Some(200.0)), &receiver, waiting).await;

    assert!(tally.clean(), "{tally:?}");
    assert_eq!((tally.accepted, tally.delivered), (20, 20));
    let due = tally.due_to_webhook_ms.expect("an open loop has due times");
    assert_eq!(due.count, 20);
    assert!(
        tally.finished_to_webhook_ms.is_some(),
        "the payload's timestamp was read"
    );
    receiver.stop().await;
}

#[tokio::test]
async fn the_baseline_passes_every_message_through_both_streams() {
    let nats = NatsServer::start().await;
    let result = jetstream_bound::run(&Bound {
        url: nats.url(),
        messages: 500,
        window: 32,
        inflight: 32,
        payload_bytes: 64,
        timeout: Duration::from_secs(60),
    })
    .await
    .expect("the pipeline runs");
    assert_eq!((result.missing, result.duplicates), (0, 0));
    assert!(result.msgs_per_s > 0.0);
}
