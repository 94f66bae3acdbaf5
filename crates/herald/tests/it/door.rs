//! What the API accepts (issue 9, items 1 to 4): every body accepted
//! reaches its handler and its webhook byte for byte, or is refused at the
//! door with the reason; no stored record makes a read fail; sizes come from
//! the NATS server; slow clients are cut off without starving the probes.

use std::time::{Duration, Instant};

use herald::roles::Roles;
use herald_core::{
    EndpointId, TaskId, UserId, names,
    payload::{AttemptOutcome, DeliveryAttempt, TaskEvent, TaskEventMessage, VERSION, encode},
};
use herald_testkit::{Mailpit, NatsServer, ReceiverBehaviour, TestReceiver, wait_until};
use herald_worker::handlers::{Amplify, HandlerRegistry};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{DEADLINE, Herald, add_endpoint, add_endpoint_spec, broker, test_config};

/// POSTs `body` as it is (not re-serialized) as JSON.
async fn post_raw(herald: &Herald, path: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
    let response = herald
        .http
        .post(format!("{}{path}", herald.api))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn post_json(herald: &Herald, path: &str) -> (u16, Value) {
    let response = herald
        .http
        .post(format!("{}{path}", herald.api))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test]
async fn bodies_are_delivered_byte_for_byte_or_refused_with_the_reason() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "51", "hooks", &receiver.url("/hooks"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;

    // What main accepted and then delivered as {"echo":null}, or stored
    // too deep to read back: now 400s that say why.
    for (body, reason) in [
        ("1e400".to_string(), "64-bit float"),
        (r#"{"n":[-1e400]}"#.to_string(), "64-bit float"),
        (r#""\ud800""#.to_string(), "surrogate"),
        (r#"{"\udc00":1}"#.to_string(), "surrogate"),
        (nested(33), "api.max_json_depth"),
        (nested(126), "api.max_json_depth"),
        (nested(100_000), "api.max_json_depth"),
    ] {
        let (status, answer) = post_raw(&herald, "/users/51/tasks/echo", body.clone()).await;
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(status, 400, "{}: {answer}", &body[..body.len().min(40)]);
        assert_eq!(answer["error"]["code"], "invalid_json", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{message}");
    }

    // Accepted: the handler sees, and the webhook carries, the client's
    // bytes: key order, number spelling, escapes and inner whitespace.
    let input =
        r#"{"zebra":1.50,"apple":[1e2, 123456789012345678901234567890],"s":"\u00e9\"\\","deep":"#
            .to_string()
            + &nested(31)
            + "}";
    let (status, answer) = post_raw(&herald, "/users/51/tasks/echo", input.clone()).await;
    assert_eq!(status, 201, "{answer}");
    let id = serde_json::from_str::<Value>(&answer).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let webhooks = receiver.wait_for(1, DEADLINE).await;
    let expected = format!(r#""result":{{"echo":{input}}}"#);
    assert!(webhooks[0].body.contains(&expected), "{}", webhooks[0].body);
    herald.wait_for_state("51", &id, "delivered").await;
    let shown = herald
        .http
        .get(format!("{}/users/51/tasks/{id}", herald.api))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        shown.contains(&format!(r#""result":{{"echo":{input}}}"#)),
        "{shown}"
    );
    herald.stop().await;
}

/// A record as a build without the depth limit stored a ~126-deep echo:
/// deeper than serde_json parses into a `Value`, which made every read of
/// it fail there. Results are raw now, so it reads.
fn deep_record(task: &TaskId, user: &str, endpoint: &str) -> Vec<u8> {
    format!(
        r#"{{"v":1,"id":"{task}","user":"{user}","type":"echo","accepted_at_ms":1000,"finished_at_ms":2000,"outcome":"completed","result":{{"echo":{}}},"endpoints":["{endpoint}"]}}"#,
        nested(130)
    )
    .into_bytes()
}

/// A record that does not decode: cut off in the middle of a deep result
/// (a damaged write), its owner still readable in front.
fn damaged_record(task: &TaskId, user: &str) -> Vec<u8> {
    format!(
        r#"{{"v":1,"id":"{task}","user":"{user}","type":"echo","accepted_at_ms":1000,"finished_at_ms":2000,"outcome":"completed","result":{{"echo":{}"#,
        "[".repeat(200)
    )
    .into_bytes()
}

/// Stores `record` as task `task`'s record, and an attempt of its delivery
/// to `endpoint` that ended `outcome` (so recover windows contain it).
async fn store_task(
    nats: &NatsServer,
    user: &str,
    task: &TaskId,
    endpoint: &str,
    record: Vec<u8>,
    outcome: AttemptOutcome,
) {
    let broker = broker(nats).await;
    let bucket = broker
        .jetstream_for_tests()
        .get_key_value(names::TASKS_BUCKET)
        .await
        .unwrap();
    bucket
        .put(names::task_key(task), record.into())
        .await
        .unwrap();
    let event = TaskEventMessage {
        v: VERSION,
        task: task.clone(),
        event: TaskEvent::Delivery(DeliveryAttempt {
            endpoint: EndpointId::new(endpoint).unwrap(),
            url: "http://127.0.0.1:9/hooks".into(),
            attempt: 1,
            at_ms: herald_core::now_ms(),
            outcome,
            status: Some(500),
            latency_ms: 1,
            error: Some("HTTP 500".into()),
            response_body: None,
            next_attempt_in_ms: None,
            redelivery: None,
        }),
    };
    let user = UserId::new(user).unwrap();
    broker
        .jetstream_for_tests()
        .publish(names::attempts_subject(&user, task), encode(&event).into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unreadable_stored_record_is_shown_and_skipped_never_a_503() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    add_endpoint(&nats, "52", "hooks", &receiver.url("/hooks"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;
    let endpoint = "default_hooks";

    // A real task whose delivery fails: something for recover to find.
    let failed = herald.accept("52", "echo", json!({ "n": 1 })).await;
    herald.wait_for_state("52", &failed, "undelivered").await;

    // Written straight into the bucket: a record as main stored a deep
    // echo, a damaged record, garbage, and a damaged record under the id an
    // Idempotency-Key names.
    let deep = TaskId::generate();
    store_task(
        &nats,
        "52",
        &deep,
        endpoint,
        deep_record(&deep, "52", endpoint),
        AttemptOutcome::Abandoned,
    )
    .await;
    let poisoned = TaskId::generate();
    store_task(
        &nats,
        "52",
        &poisoned,
        endpoint,
        damaged_record(&poisoned, "52"),
        AttemptOutcome::Abandoned,
    )
    .await;
    let garbage = TaskId::generate();
    store_task(
        &nats,
        "52",
        &garbage,
        endpoint,
        b"\xff not json {{{".to_vec(),
        AttemptOutcome::Abandoned,
    )
    .await;
    let keyed = TaskId::for_idempotency_key(&UserId::new("52").unwrap(), "order-7");
    store_task(
        &nats,
        "52",
        &keyed,
        endpoint,
        damaged_record(&keyed, "52"),
        AttemptOutcome::Abandoned,
    )
    .await;

    // The deep record main could not read back is read (its result is
    // raw); the answer is as deep as the record, so look at its text.
    let shown = herald
        .http
        .get(format!("{}/users/52/tasks/{deep}", herald.api))
        .send()
        .await
        .unwrap();
    assert_eq!(shown.status(), 200);
    let shown = shown.text().await.unwrap();
    assert!(shown.contains(r#""state":"undelivered""#), "{shown}");

    // GET of a damaged record: shown as unreadable, with the reason.
    let (status, task) = herald.get_task("52", poisoned.as_str()).await;
    assert_eq!(status, 200, "{task}");
    assert_eq!(task["state"], "unreadable", "{task}");
    assert_eq!(task["type"], "echo", "{task}");
    assert!(
        task["error"].as_str().unwrap().contains("cannot be read"),
        "{task}"
    );
    // Another user does not see it; garbage names no owner, so nobody does.
    assert_eq!(herald.get_task("53", poisoned.as_str()).await.0, 404);
    assert_eq!(herald.get_task("52", garbage.as_str()).await.0, 404);

    // Redeliver: a clear 409, not 503.
    let (status, refused) =
        post_json(&herald, &format!("/users/52/tasks/{poisoned}/redeliver")).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "record_unreadable", "{refused}");

    // An idempotent repeat of the POST: the stored task is the answer.
    let (status, repeat) = herald
        .post_task_with("52", "echo", json!({ "n": 2 }), Some("order-7"))
        .await;
    assert_eq!(status, 201, "{repeat}");
    assert_eq!(repeat["id"], keyed.as_str(), "{repeat}");

    // Recover: the readable failures are queued, the unreadable ones
    // skipped and named.
    let response = herald
        .http
        .post(format!(
            "{}/users/52/endpoints/{endpoint}/recover",
            herald.api
        ))
        .json(&json!({ "since": "2020-01-01T00:00:00Z" }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let recovered: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{recovered}");
    assert_eq!(recovered["queued"], 2, "{recovered}");
    assert_eq!(recovered["tasks"], json!([failed, deep]), "{recovered}");
    let mut unreadable: Vec<_> = recovered["unreadable"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    unreadable.sort();
    let mut want = vec![poisoned.to_string(), garbage.to_string(), keyed.to_string()];
    want.sort();
    assert_eq!(unreadable, want, "{recovered}");
    herald.stop().await;
}

/// Sets the largest message `HERALD_WEBHOOKS` stores: a way to make every
/// job publish fail, then work again.
async fn set_max_message(nats: &NatsServer, stream: &str, bytes: i32) {
    let broker = broker(nats).await;
    let mut stream = broker
        .jetstream_for_tests()
        .get_stream(stream)
        .await
        .unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = bytes;
    broker
        .jetstream_for_tests()
        .update_stream(config)
        .await
        .unwrap();
}

async fn is_disabled(nats: &NatsServer, user: &str, endpoint: &str) -> bool {
    let broker = broker(nats).await;
    herald_queue::health::read(
        &broker,
        &UserId::new(user).unwrap(),
        &EndpointId::new(endpoint).unwrap(),
    )
    .await
    .unwrap()
    .is_some_and(|h| h.disabled)
}

#[tokio::test]
async fn enabling_survives_an_unreadable_record_and_a_failed_replay_leaves_it_disabled() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Status(503)).await;
    add_endpoint_spec(
        &nats,
        "hooks",
        json!({
            "userId": "54",
            "url": receiver.url("/hooks"),
            "email": "owner54@example.com",
            "retry": { "schedule": ["100ms", "100ms", "100ms", "100ms", "100ms", "100ms"] },
        }),
    )
    .await;
    let mut config = test_config(&nats, Some(&mail));
    config.webhooks.disable_after = Duration::from_millis(200);
    let herald = Herald::start(config.clone(), Roles::all()).await;
    let endpoint = "default_hooks";

    let held = herald.accept("54", "echo", json!({ "n": 1 })).await;
    wait_until("the delivery to be held", DEADLINE, || async {
        let (_, task) = herald.get_task("54", &held).await;
        (task["endpoints"][0]["state"] == "held").then_some(())
    })
    .await;
    assert!(is_disabled(&nats, "54", endpoint).await);
    let poisoned = TaskId::generate();
    store_task(
        &nats,
        "54",
        &poisoned,
        endpoint,
        damaged_record(&poisoned, "54"),
        AttemptOutcome::Held,
    )
    .await;

    // The replay fails (no replay request fits the tasks stream, where
    // they are stored): the endpoint stays disabled, as it was, and the
    // delivery held.
    set_max_message(&nats, names::TASKS_STREAM, 64).await;
    let (status, failed) =
        post_json(&herald, &format!("/users/54/endpoints/{endpoint}/enable")).await;
    assert_eq!(status, 503, "{failed}");
    assert!(
        is_disabled(&nats, "54", endpoint).await,
        "a failed enable cleared the disabled flag"
    );
    let (_, task) = herald.get_task("54", &held).await;
    assert_eq!(task["endpoints"][0]["state"], "held", "{task}");

    // Once publishing works, enabling recovers the held delivery and skips
    // the unreadable record.
    set_max_message(
        &nats,
        names::TASKS_STREAM,
        config.topology.max_message_bytes,
    )
    .await;
    receiver.set_behaviour(ReceiverBehaviour::Ok);
    let (status, enabled) =
        post_json(&herald, &format!("/users/54/endpoints/{endpoint}/enable")).await;
    assert_eq!(status, 200, "{enabled}");
    assert_eq!(enabled["was_disabled"], true, "{enabled}");
    assert_eq!(enabled["recovered"]["queued"], 1, "{enabled}");
    assert_eq!(
        enabled["recovered"]["unreadable"],
        json!([poisoned]),
        "{enabled}"
    );
    herald.wait_for_state("54", &held, "delivered").await;
    assert!(!is_disabled(&nats, "54", endpoint).await);
    herald.stop().await;
}

/// A JSON array of one string, `len` bytes long, made of the characters
/// that escape worst: quotes, backslashes and control characters.
fn quote_heavy(len: usize) -> String {
    let unit = r#"\"\\\u0001"#;
    let mut body = String::with_capacity(len);
    body.push_str("[\"");
    while body.len() + unit.len() + 2 <= len {
        body.push_str(unit);
    }
    while body.len() + 2 < len {
        body.push('x');
    }
    body.push_str("\"]");
    assert_eq!(body.len(), len);
    body
}

fn with_amplify(transcode: Duration) -> HandlerRegistry {
    let mut handlers = HandlerRegistry::with_builtins(transcode);
    handlers.register("amplify", Amplify { copies: 4 });
    handlers
}

#[tokio::test]
async fn sizes_come_from_the_server_and_what_is_accepted_is_delivered() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "55", "hooks", &receiver.url("/hooks"), None).await;
    let mut config = test_config(&nats, None);
    // Above the server's max_payload (1 MiB): the server's limit decides.
    config.api.max_body_bytes = 3 * 1024 * 1024 / 2;
    let herald = Herald::start_with_handlers(config, Roles::all(), with_amplify).await;
    let max_payload = broker(&nats).await.max_payload().unwrap();
    let limit = max_payload - herald_api::ENVELOPE_RESERVE;

    // One byte over: 413 naming the limit and where it comes from.
    let (status, refused) = post_raw(&herald, "/users/55/tasks/echo", quote_heavy(limit + 1)).await;
    assert_eq!(status, 413, "{refused}");
    assert!(refused.contains(&limit.to_string()), "{refused}");
    assert!(refused.contains("max_payload"), "{refused}");

    // At the limit, escaping at its worst: accepted and delivered exactly.
    let body = quote_heavy(limit);
    let (status, answer) = post_raw(&herald, "/users/55/tasks/echo", body.clone()).await;
    assert_eq!(status, 201, "{answer}");
    let id = serde_json::from_str::<Value>(&answer).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let webhooks = receiver.wait_for(1, DEADLINE).await;
    assert!(
        webhooks[0]
            .body
            .contains(&format!(r#""result":{{"echo":{body}}}"#)),
        "the webhook does not carry the body as sent"
    );
    herald.wait_for_state("55", &id, "delivered").await;

    // A result four times the body: too large for NATS, so the task fails,
    // recorded, and its owner gets amplify.failed, instead of a task
    // redelivered forever.
    let (status, answer) =
        post_raw(&herald, "/users/55/tasks/amplify", quote_heavy(400 * 1024)).await;
    assert_eq!(status, 201, "{answer}");
    let id = serde_json::from_str::<Value>(&answer).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let task = herald.wait_for_state("55", &id, "failed").await;
    let error = task["error"].as_str().unwrap();
    assert!(
        error.contains("too large") && error.contains("max_payload"),
        "{error}"
    );
    let webhooks = receiver.wait_for(2, DEADLINE).await;
    let failed: Value = serde_json::from_str(&webhooks[1].body).unwrap();
    assert_eq!(failed["type"], "amplify.failed", "{failed}");
    assert_eq!(failed["data"]["error"], error);
    herald.stop().await;
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&received).into_owned(),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_probes_keep_answering() {
    let nats = NatsServer::start().await;
    let mut config = test_config(&nats, None);
    let timeout = Duration::from_secs(3);
    config.api.header_read_timeout = timeout;
    config.api.body_read_timeout = timeout;
    // Fewer slots than slow clients: the rest are overflow connections.
    config.api.max_connections = 50;
    let herald = Herald::start(config, Roles::api_only()).await;
    let address = herald.api.trim_start_matches("http://").to_string();

    let opened = Instant::now();
    let mut slow = Vec::new();
    for i in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
        let start: &[u8] = if i % 2 == 0 {
            // Headers that never end.
            b"POST /users/1/tasks/echo HTTP/1.1\r\nhost: herald\r\nx-slow: 1"
        } else {
            // A body that never comes.
            b"POST /users/1/tasks/echo HTTP/1.1\r\nhost: herald\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\":"
        };
        stream.write_all(start).await.unwrap();
        slow.push(stream);
    }
    // The probe answers at once, well before any slow client times out.
    let healthz = herald
        .http
        .get(format!("{}/healthz", herald.api))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
    assert!(
        opened.elapsed() < timeout,
        "/healthz took {:?}",
        opened.elapsed()
    );

    // Every slow connection is closed by the server after its timeout; a
    // slow body first gets a 408.
    let mut answers = Vec::new();
    for stream in &mut slow {
        let answer = tokio::time::timeout(DEADLINE, read_until_closed(stream))
            .await
            .expect("a slow connection was never closed");
        answers.push(answer);
    }
    assert!(opened.elapsed() >= Duration::from_secs(1));
    assert!(
        answers.iter().any(|a| a.starts_with("HTTP/1.1 408")),
        "{:?}",
        &answers[..4]
    );
    herald.stop().await;
}

#[tokio::test]
async fn a_task_input_the_worker_cannot_read_is_a_recorded_failure_not_null() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "56", "hooks", &receiver.url("/hooks"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;

    // Not through the API (which refuses it): a task message whose input
    // is JSON syntax no parser can hold.
    let (user, task_type, id) = (
        UserId::new("56").unwrap(),
        herald_core::TaskType::new("echo").unwrap(),
        TaskId::generate(),
    );
    let message = herald_core::payload::TaskMessage {
        v: VERSION,
        id: id.clone(),
        user: user.clone(),
        task_type: task_type.clone(),
        accepted_at_ms: herald_core::now_ms(),
        input: serde_json::value::RawValue::from_string("[1e400]".into()).unwrap(),
    };
    broker(&nats)
        .await
        .publish(herald_queue::publish::Outgoing::new(
            names::task_subject(&task_type, &user, &id),
            names::task_msg_id(&id),
            encode(&message),
        ))
        .await
        .unwrap();

    let task = herald.wait_for_state("56", id.as_str(), "failed").await;
    let error = task["error"].as_str().unwrap();
    assert!(error.contains("input cannot be read"), "{error}");
    let webhooks = receiver.wait_for(1, DEADLINE).await;
    let webhook: Value = serde_json::from_str(&webhooks[0].body).unwrap();
    assert_eq!(webhook["type"], "echo.failed", "{webhook}");
    assert!(!webhooks[0].body.contains(r#""echo":null"#));
    herald.stop().await;
}
