//! Herald's HTTP API (axum).
//!
//! `POST /users/{user}/tasks/{type}` accepts a task once JetStream has
//! stored it; `GET /users/{user}/tasks/{id}` reports its state and attempts;
//! `/healthz` and `/readyz` serve the probes, `/metrics` Prometheus and
//! `/openapi.json` the OpenAPI document generated from this code; the calls
//! in [`replay`] send deliveries again (redeliver a task, recover an
//! endpoint's failures, enable a disabled endpoint). Every error is JSON
//! (`{"error": {"code", "message"}}`) with a 4xx for anything a client can
//! send, and 503 when NATS is unavailable. Bearer tokens guard every route
//! under `/users/{user}/` ([`auth`]).

pub mod access;
pub mod auth;
mod error;
mod health;
mod openapi;
mod operations;
mod replay;
mod serve;
mod tasks;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::Router;
use herald_queue::Broker;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

pub use auth::{Access, TokensFileError};
pub use error::{ApiError, ErrorBody};
pub use health::metrics;
pub use openapi::{openapi, openapi_json};
pub use tasks::ENVELOPE_RESERVE;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the API listens on.
    pub listen: String,
    /// Largest task body accepted, in bytes; larger ones get 413. The NATS
    /// server's `max_payload` (less room for Herald's envelope) lowers it
    /// when smaller, so whatever is accepted can be stored and delivered.
    pub max_body_bytes: usize,
    /// Deepest nesting of arrays and objects accepted in a body; deeper
    /// ones get 400. At most `herald_core::json::MAX_INPUT_DEPTH`.
    pub max_json_depth: usize,
    /// How long a client may take to send a request's line and headers;
    /// then the connection is closed.
    #[serde(with = "herald_core::duration_serde")]
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body; then it gets
    /// 408 and the connection is closed.
    #[serde(with = "herald_core::duration_serde")]
    pub body_read_timeout: Duration,
    /// Connections served at once. Beyond it, connections are still taken
    /// but only `/healthz` and `/readyz` are answered (others get 503),
    /// with a short header timeout, so probes never starve.
    pub max_connections: usize,
    /// TOML file of bearer tokens (their SHA-256 hashes); empty turns
    /// authentication off.
    pub tokens_file: String,
    /// How often the tokens file is re-read for added or revoked tokens;
    /// 0 reads it only at start.
    #[serde(with = "herald_core::duration_serde")]
    pub tokens_reload_interval: Duration,
    /// `/metrics` needs a valid token (of any scope); otherwise it is open.
    pub metrics_require_token: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9000".into(),
            max_body_bytes: 1024 * 1024,
            max_json_depth: 32,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 1024,
            tokens_file: String::new(),
            tokens_reload_interval: Duration::from_secs(10),
            metrics_require_token: false,
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub(crate) broker: Broker,
    pub(crate) config: Arc<ApiConfig>,
    access: Access,
    /// Set once the streams and buckets have been ensured.
    topology_ready: Arc<AtomicBool>,
}

impl AppState {
    /// Reads the tokens file `config` names, if any: a bad one is an error,
    /// so the API never starts with less protection than configured.
    pub fn new(broker: Broker, config: ApiConfig) -> Result<Self, TokensFileError> {
        let access = Access::from_config(&config)?;
        Ok(Self {
            broker,
            config: Arc::new(config),
            access,
            topology_ready: Arc::default(),
        })
    }

    /// Marks the JetStream topology as created; `/readyz` waits for it.
    pub fn set_topology_ready(&self) {
        self.topology_ready.store(true, Ordering::Release);
    }

    pub(crate) fn topology_ready(&self) -> bool {
        self.topology_ready.load(Ordering::Acquire)
    }

    pub fn access(&self) -> &Access {
        &self.access
    }
}

/// Every route, with its documentation. The route groups decide the access
/// rules, so a new route gets them (and their documentation) by being added
/// to the right group with one `.routes(routes!(module::handler))` line;
/// its `#[utoipa::path]` annotation documents the rest.
fn app(access: &Access) -> OpenApiRouter<AppState> {
    // Everything under /users/{user}/: a token for that user.
    // (POST's segment is a task type and GET's a task id: axum needs one
    // parameter name per position, hence `{task}` for both.)
    let users = OpenApiRouter::new()
        .routes(routes!(tasks::create, tasks::show))
        .routes(routes!(replay::redeliver))
        .routes(routes!(replay::recover))
        .routes(routes!(replay::enable));
    // Open or token-protected, as `api.metrics_require_token` says.
    let metrics = OpenApiRouter::new().routes(routes!(health::metrics));
    // Always open: probes and the document itself.
    let open = OpenApiRouter::new()
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(openapi::serve));
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(auth::for_users(users, access))
        .merge(auth::for_metrics(metrics, access))
        .merge(open)
}

pub fn router(state: AppState) -> Router {
    let (router, _) = app(state.access()).split_for_parts();
    router
        .route_layer(axum::middleware::from_fn(access::remember_route))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::from_fn(access::log))
        .with_state(state)
}

/// Serves the API on `listener` until `shutdown` fires, then lets requests
/// in progress finish. Slow clients are cut off and connections capped as
/// `api.header_read_timeout`, `api.body_read_timeout` and
/// `api.max_connections` say ([`serve`](mod@serve)).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    state.access().log_state();
    // The tokens file's reload runs beside the server, not detached: it
    // ends with `shutdown`, and the server is done only when it is.
    let reload = state.access().clone().watch(shutdown.clone());
    let config = state.config.clone();
    let ((), served) = tokio::join!(
        reload,
        serve::run(listener, router(state), &config, shutdown)
    );
    served
}
