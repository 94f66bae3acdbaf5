//! What Kubernetes probes and Prometheus scrape on a worker process.

use herald::roles::Roles;
use herald_testkit::{NatsServer, ReceiverBehaviour, TestReceiver, free_port, wait_until};
use serde_json::json;

use crate::harness::{DEADLINE, Herald, add_endpoint, test_config, worker_process};

#[tokio::test]
async fn a_worker_serves_readiness_and_metrics_on_health_listen() {
    let mut nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "12", "hooks", &receiver.url("/hooks"), None).await;
    let herald = Herald::start(test_config(&nats, None), Roles::api_only()).await;
    let probes = format!("127.0.0.1:{}", free_port());
    let _worker = worker_process(&nats, &[("HERALD_HEALTH__LISTEN", &probes)]);
    let status_of = |path: &'static str| {
        let request = herald.http.get(format!("http://{probes}{path}")).send();
        async move { request.await.ok().map(|r| r.status().as_u16()) }
    };

    wait_until("the worker to be ready", DEADLINE, || async {
        (status_of("/readyz").await == Some(200)).then_some(())
    })
    .await;
    assert_eq!(status_of("/healthz").await, Some(200));

    let id = herald.accept("12", "echo", json!({})).await;
    herald.wait_for_state("12", &id, "delivered").await;
    let metrics = herald
        .http
        .get(format!("http://{probes}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "herald_tasks_handled_total{outcome=\"completed\"} 1",
        "herald_webhook_attempts_total{outcome=\"delivered\"} 1",
        "herald_webhook_duration_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
    }

    // Without NATS the worker is alive but not ready.
    nats.stop().await;
    wait_until("the worker to report not ready", DEADLINE, || async {
        (status_of("/readyz").await == Some(503)).then_some(())
    })
    .await;
    assert_eq!(status_of("/healthz").await, Some(200));
}
