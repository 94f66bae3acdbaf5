//! `herald operator`: the operator role with its probes.

use anyhow::Context;
use herald_queue::topology;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    probes::{self, Readiness},
};

/// Connects to Kubernetes and NATS and runs the operator until `shutdown`.
/// The probes report ready once the topology exists; a standby replica is
/// ready too, waiting for the lease.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let records = config.secrets.record_writer("herald operator")?;
    let client = kube::Client::try_default()
        .await
        .context("cannot configure a Kubernetes client (KUBECONFIG or in-cluster)")?;
    let broker = herald_queue::connect_with(&config.nats, "herald-operator").await?;
    let mut running = JoinSet::new();
    let readiness = Readiness::default();
    probes::start(
        &config.health.listen,
        &broker,
        &readiness,
        &shutdown,
        &mut running,
    )
    .await?;
    let prepared = topology::prepare(
        &broker,
        &config.topology,
        config.nats.manage_topology,
        &shutdown,
    )
    .await;
    let prepared = match prepared {
        // Turned away by NATS: stop with the reason, do not sit there.
        Err(refused @ herald_queue::QueueError::Connect(_)) => {
            shutdown.cancel();
            while running.join_next().await.is_some() {}
            return Err(refused.into());
        }
        other => other,
    };
    if prepared.is_ok() {
        readiness.set_ready();
        let result = herald_operator::run(
            config.operator.clone(),
            client,
            broker.clone(),
            records,
            shutdown.clone(),
            || tracing::info!("leading: reconciling WebhookEndpoints"),
        )
        .await;
        // Losing the lease ends the process: it starts again as a candidate.
        shutdown.cancel();
        result?;
    }
    while running.join_next().await.is_some() {}
    let _ = broker.flush().await;
    Ok(())
}
