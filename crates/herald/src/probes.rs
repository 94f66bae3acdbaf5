//! `/healthz`, `/readyz` and `/metrics` for roles without the API (workers,
//! the operator), on `health.listen`: what Kubernetes probes and Prometheus
//! scrape.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use anyhow::Context;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use herald_queue::Broker;
use serde_json::json;
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// Whether the process has started its work; `/readyz` also needs NATS.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct ProbeState {
    broker: Broker,
    readiness: Readiness,
}

/// Binds `listen` (`health.listen`; empty: no probes) and serves the probes
/// as one of the process's `running` tasks. A bad or taken address fails
/// here, at start-up, not later in the background.
pub async fn start(
    listen: &str,
    broker: &Broker,
    readiness: &Readiness,
    shutdown: &CancellationToken,
    running: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    if listen.is_empty() {
        return Ok(());
    }
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (health.listen)"))?;
    running.spawn(serve(
        listener,
        broker.clone(),
        readiness.clone(),
        shutdown.clone(),
    ));
    Ok(())
}

/// Serves the probes on `listener` until `shutdown` fires.
async fn serve(
    listener: TcpListener,
    broker: Broker,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "probes and metrics listening");
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(herald_api::metrics))
        .with_state(ProbeState { broker, readiness });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("probe server failed")
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<ProbeState>) -> impl IntoResponse {
    let connected = state.broker.is_connected();
    let started = state.readiness.is_ready();
    let ready = connected && started;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "ready": ready, "nats_connected": connected, "started": started })),
    )
}
