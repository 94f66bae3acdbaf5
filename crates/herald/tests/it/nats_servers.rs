//! `nats.url` listing several servers, as a cluster's seed list is given:
//! the role connects through whichever answers.

use herald_core::{outgoing::Outgoing, payload::TaskMessage};
use herald_queue::{NatsConfig, connect_with, topology};
use herald_testkit::{NatsServer, free_port, wait_until};

use crate::harness::DEADLINE;

#[tokio::test]
async fn a_comma_separated_url_connects_through_the_server_that_answers() {
    let nats = NatsServer::start().await;
    // Nothing listens on the first one: the client moves on to the next.
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let config = NatsConfig::url(&format!("{dead}, {}", nats.url()));
    let broker = connect_with(&config, "herald-test-servers").await.unwrap();
    wait_until("a connection through the live server", DEADLINE, || async {
        broker.is_connected().then_some(())
    })
    .await;
    topology::ensure(&broker, &Default::default())
        .await
        .unwrap();
    let task: TaskMessage = serde_json::from_value(serde_json::json!({
        "v": 1, "id": "t-servers", "user": "alice", "type": "echo",
        "accepted_at_ms": 1, "input": {}
    }))
    .unwrap();
    let ack = broker.publish(Outgoing::task(&task)).await.unwrap();
    assert!(
        !ack.duplicate,
        "the task is stored through the listed server"
    );

    let error = connect_with(
        &NatsConfig::url(&format!("{}, nats://127.0.0.1:not-a-port", nats.url())),
        "herald-test-servers",
    )
    .await
    .err()
    .expect("a list with a bad entry is refused");
    assert!(
        error.to_string().contains("nats.url") && error.to_string().contains("not-a-port"),
        "{error}"
    );
}
