//! The backlog metrics: what a consumer has not delivered yet and what it
//! delivered without an ack, sampled by the process consuming it, as
//! `/metrics` shows them.

use std::sync::Arc;

use async_nats::jetstream::Message;
use herald_core::{metrics, names, outgoing::Outgoing};
use herald_queue::{
    consume::{self, ConsumerSettings, MessageHandler},
    topology,
};
use herald_testkit::{NatsServer, wait_until};
use tokio_util::sync::CancellationToken;

use crate::harness::{DEADLINE, broker};

/// Takes every message and never acks it: its consumer's ack-pending.
struct Holds;

#[async_trait::async_trait]
impl MessageHandler for Holds {
    async fn handle(&self, message: Message) {
        // Keep it unacked until the test ends.
        std::future::pending::<()>().await;
        drop(message);
    }
}

#[tokio::test]
async fn the_backlog_and_the_unacked_of_a_consumer_are_in_the_metrics() {
    let nats = NatsServer::start().await;
    let broker = broker(&nats).await;
    topology::ensure(&broker, &Default::default())
        .await
        .unwrap();
    for i in 0..5 {
        broker
            .publish(Outgoing::new(
                format!("herald.mail.backlog-{i}"),
                None,
                b"{}".to_vec(),
            ))
            .await
            .unwrap();
    }
    let shutdown = CancellationToken::new();
    let consuming = tokio::spawn(consume::run(
        broker.clone(),
        Default::default(),
        ConsumerSettings {
            stream: names::MAIL_STREAM,
            consumer: names::MAIL_CONSUMER,
            concurrency: 2,
            grace: std::time::Duration::from_millis(100),
            manage_topology: true,
        },
        Arc::new(Holds),
        shutdown.clone(),
    ));
    let labels = r#"{stream="HERALD_MAIL",consumer="mail"}"#;
    wait_until(
        "2 unacked and 3 waiting in the metrics",
        DEADLINE,
        || async {
            let text = metrics::render();
            (text.contains(&format!("herald_consumer_ack_pending_messages{labels} 2"))
                && text.contains(&format!("herald_consumer_pending_messages{labels} 3")))
            .then_some(())
        },
    )
    .await;
    assert!(metrics::render().contains("herald_build_info{version="));
    shutdown.cancel();
    consuming.await.unwrap();
}
