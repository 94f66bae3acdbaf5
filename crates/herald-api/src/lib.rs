//! Herald's HTTP API (axum).
//!
//! `POST /users/{user}/tasks/{type}` accepts a task once JetStream has
//! stored it; `GET /users/{user}/tasks/{id}` reports its state and attempts;
//! `/healthz` and `/readyz` serve the probes. Every error is JSON
//! (`{"error": {"code", "message"}}`) with a 4xx for anything a client can
//! send, and 503 when NATS is unavailable.

mod error;
mod health;
mod tasks;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router,
    routing::{get, post},
};
use herald_queue::Broker;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use health::metrics;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the API listens on.
    pub listen: String,
    /// Largest task body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9000".into(),
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub(crate) broker: Broker,
    pub(crate) config: Arc<ApiConfig>,
    /// Set once the streams and buckets have been ensured.
    topology_ready: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(broker: Broker, config: ApiConfig) -> Self {
        Self {
            broker,
            config: Arc::new(config),
            topology_ready: Arc::default(),
        }
    }

    /// Marks the JetStream topology as created; `/readyz` waits for it.
    pub fn set_topology_ready(&self) {
        self.topology_ready.store(true, Ordering::Release);
    }

    pub(crate) fn topology_ready(&self) -> bool {
        self.topology_ready.load(Ordering::Acquire)
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        // One pattern for both: the segment is a task type for POST and a
        // task id for GET (axum needs one parameter name per position).
        .route(
            "/users/{user}/tasks/{task}",
            post(tasks::create).get(tasks::show),
        )
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` fires, then lets requests
/// in progress finish.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
