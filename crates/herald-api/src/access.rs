//! One access-log line per request, and the request id that ties it to
//! everything logged while serving it.
//!
//! The id is the client's `x-request-id` when it sends a usable one (a
//! proxy in front, say), otherwise a new one; either way the response
//! carries it back. What a client sends is never logged as it is: an id
//! longer than [`MAX_REQUEST_ID`] or with characters outside
//! `[A-Za-z0-9._:-]` is replaced, so a hostile header cannot forge or
//! flood log lines. The line names the route template (`/users/{user}/...`),
//! never the path itself, which holds user ids and task ids of any length.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request},
    http::{HeaderName, HeaderValue},
    middleware::Next,
    response::Response,
};
use herald_queue::trace_context::continue_from_carrier;
use tracing::Instrument;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-sent request id kept.
pub const MAX_REQUEST_ID: usize = 128;

/// The route template a request matched, handed from the routing layer
/// (which knows it) to the access log (which wraps the fallback too).
#[derive(Clone)]
struct Route(MatchedPath);

/// Inner layer, on the routes: remembers the matched template on the
/// response.
pub(crate) async fn remember_route(request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().cloned();
    if let Some(route) = &route {
        // Named now, before anything starts the span's trace (a span's
        // name is fixed once its trace context is first used).
        let span = tracing::Span::current();
        span.record(
            "otel.name",
            format!("{} {}", request.method(), route.as_str()),
        );
        span.record("http.route", route.as_str());
    }
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(Route(route));
    }
    response
}

/// Outer layer: the request id, a span around the request, and the line.
pub(crate) async fn log(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|id| usable(id))
        .map(str::to_string)
        .unwrap_or_else(new_id);
    let method = request.method().clone();
    // A usable id is a valid header value, and so is a new one.
    let header = HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("-"));
    request.headers_mut().insert(REQUEST_ID, header.clone());
    let span = if is_probe(request.uri().path()) {
        // Probes and scrapes are logged but never traced: a trace every
        // few seconds per kubelet and Prometheus says nothing.
        tracing::info_span!(PROBE_SPAN, request_id = %id)
    } else {
        tracing::info_span!(
            "request",
            otel.name = %method,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %method,
            http.route = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            request_id = %id,
        )
    };
    // The client's trace, if it sent a valid `traceparent`: Herald's spans
    // join it (only its ids and sampled flag are taken).
    continue_from_carrier(
        &span,
        &opentelemetry_http::HeaderExtractor(request.headers()),
    );
    let mut response = next.run(request).instrument(span.clone()).await;
    let route = response
        .extensions()
        .get::<Route>()
        .map_or("unmatched", |route| route.0.as_str());
    let status = response.status();
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    span.in_scope(|| {
        tracing::info!(
            target: "herald::access",
            method = %method,
            route,
            status = status.as_u16(),
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    });
    response.headers_mut().insert(REQUEST_ID, header);
    response
}

/// The name of the span of a probe or scrape request, which is not traced.
pub const PROBE_SPAN: &str = "probe";

fn is_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

fn usable(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_plain_ids_are_taken_from_the_client() {
        assert!(usable("req-42.a:b_c"));
        assert!(usable(&"a".repeat(MAX_REQUEST_ID)));
        for hostile in [
            "",
            "two words",
            "line\nbreak",
            "quote\"",
            "ünïcode",
            &"a".repeat(MAX_REQUEST_ID + 1),
        ] {
            assert!(!usable(hostile), "{hostile:?}");
        }
        assert!(usable(&new_id()), "a new id is usable too");
    }
}
