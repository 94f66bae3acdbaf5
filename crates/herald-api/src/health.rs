//! Probes: `/healthz` says the process runs; `/readyz` says it can accept
//! tasks (NATS connected, streams present).

use axum::{Json, extract::State, http::StatusCode};
use serde_json::{Value, json};

use crate::AppState;

pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let connected = state.broker.is_connected();
    let streams = connected
        && state.topology_ready()
        && herald_queue::topology::streams_exist(&state.broker).await;
    let status = if streams {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({ "ready": streams, "nats_connected": connected, "streams": streams })),
    )
}
