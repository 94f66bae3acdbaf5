//! Tasks that end well: delivered, signed, once.

use herald::roles::Roles;
use herald_testkit::{NatsServer, ReceiverBehaviour, TestReceiver, verify_with_standardwebhooks};
use serde_json::json;

use crate::harness::{DEADLINE, Herald, add_endpoint, test_config};

#[tokio::test]
async fn a_task_is_delivered_signed_and_reported() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let (_, secret) = add_endpoint(
        &nats,
        "1",
        "hooks",
        &receiver.url("/hooks"),
        Some("one@example.com"),
    )
    .await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;

    let id = herald
        .accept("1", "echo", json!({ "key1": "value1" }))
        .await;
    let webhooks = receiver.wait_for(1, DEADLINE).await;
    let webhook = &webhooks[0];
    assert_eq!(webhook.path, "/hooks");
    assert_eq!(webhook.headers["webhook-id"], format!("{id}.default_hooks"));
    let body: serde_json::Value = serde_json::from_str(&webhook.body).unwrap();
    assert_eq!(body["type"], "echo.completed");
    assert_eq!(body["data"]["task_id"], id.as_str());
    assert_eq!(body["data"]["result"]["echo"]["key1"], "value1");
    // An independent implementation of the spec accepts the signature...
    verify_with_standardwebhooks(&secret.expose(), webhook)
        .expect("standardwebhooks rejected the signature");
    // ...and would refuse a tampered body.
    let mut tampered = webhook.clone();
    tampered.body = webhook.body.replace("value1", "value2");
    assert!(verify_with_standardwebhooks(&secret.expose(), &tampered).is_err());

    let task = herald.wait_for_state("1", &id, "delivered").await;
    assert_eq!(task["attempts"].as_array().unwrap().len(), 1, "{task}");
    assert_eq!(task["attempts"][0]["status"], 200);
    assert_eq!(task["attempts"][0]["outcome"], "delivered");
    assert_eq!(task["endpoints"][0]["state"], "delivered");
    herald.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_gives_one_task_and_one_delivery() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "2", "hooks", &receiver.url("/hooks"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;

    let (first_status, first) = herald
        .post_task_with("2", "echo", json!({ "n": 1 }), Some("order-42"))
        .await;
    assert_eq!(first_status, 201, "{first}");
    let id = first["id"].as_str().unwrap().to_string();
    herald.wait_for_state("2", &id, "delivered").await;
    let (again_status, again) = herald
        .post_task_with("2", "echo", json!({ "n": 1 }), Some("order-42"))
        .await;
    assert_eq!(again_status, 201, "{again}");
    assert_eq!(again["id"], first["id"]);
    // A different key is a different task.
    let (_, other) = herald
        .post_task_with("2", "echo", json!({ "n": 1 }), Some("order-43"))
        .await;
    assert_ne!(other["id"], first["id"]);
    herald
        .wait_for_state("2", other["id"].as_str().unwrap(), "delivered")
        .await;

    let for_first = receiver
        .received()
        .into_iter()
        .filter(|w| w.body.contains(&id))
        .count();
    assert_eq!(
        for_first, 1,
        "the idempotent task was delivered {for_first} times"
    );
    herald.stop().await;
}

#[tokio::test]
async fn every_endpoint_of_a_user_gets_its_own_delivery() {
    let nats = NatsServer::start().await;
    let a = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let b = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "3", "a", &a.url("/a"), None).await;
    add_endpoint(&nats, "3", "b", &b.url("/b"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;

    let id = herald.accept("3", "echo", json!({})).await;
    let task = herald.wait_for_state("3", &id, "delivered").await;
    assert_eq!(task["endpoints"].as_array().unwrap().len(), 2, "{task}");
    assert_eq!(
        a.wait_for(1, DEADLINE).await[0].headers["webhook-id"],
        format!("{id}.default_a")
    );
    assert_eq!(
        b.wait_for(1, DEADLINE).await[0].headers["webhook-id"],
        format!("{id}.default_b")
    );
    herald.stop().await;
}

#[tokio::test]
async fn unknown_types_fail_and_users_without_endpoints_complete() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "4", "hooks", &receiver.url("/hooks"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;

    let id = herald.accept("4", "no-such-type", json!({})).await;
    let task = herald.wait_for_state("4", &id, "failed").await;
    assert!(
        task["error"]
            .as_str()
            .unwrap()
            .contains("unknown task type"),
        "{task}"
    );
    // The user hears about the failure through a `.failed` event.
    let webhooks = receiver.wait_for(1, DEADLINE).await;
    assert!(
        webhooks[0].body.contains("no-such-type.failed"),
        "{}",
        webhooks[0].body
    );

    let lonely = herald.accept("nobody", "echo", json!({})).await;
    let task = herald
        .wait_for_state("nobody", &lonely, "no_endpoint")
        .await;
    assert_eq!(task["attempts"], json!([]));
    herald.stop().await;
}
