//! Probes: `/healthz` says the process runs; `/readyz` says it can accept
//! tasks (NATS connected, streams present). And `/metrics` for Prometheus.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::IntoResponse,
};
use herald_core::metrics::{Format, render_as};
use serde::Serialize;
use utoipa::ToSchema;

use crate::AppState;

#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    /// Always `ok`: the process answers.
    #[schema(value_type = String, example = "ok")]
    status: &'static str,
}

/// Liveness: the process runs.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    operation_id = "healthz",
    responses((status = 200, description = "The process runs.", body = Health)),
)]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Readiness {
    /// Tasks can be accepted.
    ready: bool,
    nats_connected: bool,
    /// The JetStream streams exist.
    streams: bool,
}

/// Readiness: NATS is connected and the streams exist, so a task posted
/// now can be stored.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    operation_id = "readyz",
    responses(
        (status = 200, description = "Ready to accept tasks.", body = Readiness),
        (status = 503, description = "Not ready: NATS or the streams are missing.", body = Readiness),
    ),
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
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
        Json(Readiness {
            ready: streams,
            nats_connected: connected,
            streams,
        }),
    )
}

/// Every metric of this process (`herald_core::metrics`): OpenMetrics text
/// to a scraper that asks for it (Prometheus does), the classic Prometheus
/// text format otherwise.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    operation_id = "metrics",
    responses((
        status = 200,
        description = "Prometheus metrics: OpenMetrics text when `Accept` prefers \
            `application/openmetrics-text`, else the Prometheus text format 0.0.4. \
            Needs a token when `api.metrics_require_token` is set.",
        content(
            (String = "application/openmetrics-text"),
            (String = "text/plain"),
        ),
    )),
)]
pub async fn metrics(headers: HeaderMap) -> impl IntoResponse {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    let format = Format::negotiate(accept);
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            // Caches between scraper and Herald must not hand one format
            // to a client that asked for the other.
            (header::VARY, "accept"),
        ],
        render_as(format),
    )
}
