//! Probes: `/healthz` says the process runs; `/readyz` says it can accept
//! tasks (NATS connected, streams present). And `/metrics` for Prometheus.

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};
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

/// Every metric of this process (`herald_core::metrics`), in the OpenMetrics
/// text format.
pub async fn metrics() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        herald_core::metrics::render(),
    )
}
