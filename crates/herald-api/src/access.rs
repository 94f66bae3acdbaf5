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
use herald_queue::trace_context::{self, KeyValue, SpanKind, Status, TraceSpan};
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
        trace_context::with_current(|span| {
            span.update_name(format!("{} {}", request.method(), route.as_str()));
            span.set_attribute(KeyValue::new("http.route", route.as_str().to_string()));
        });
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
    // The trace span, continuing the client's trace if it sent a valid
    // `traceparent` (only its ids and sampled flag are taken). Probes and
    // scrapes are logged but never traced: a trace every few seconds per
    // kubelet and Prometheus says nothing.
    let trace = if is_probe(request.uri().path()) {
        TraceSpan::none()
    } else {
        TraceSpan::start(
            || method.to_string(),
            SpanKind::Server,
            &opentelemetry_http::HeaderExtractor(request.headers()),
            || {
                vec![
                    KeyValue::new("http.request.method", method.to_string()),
                    KeyValue::new("request_id", id.clone()),
                ]
            },
        )
    };
    // The logs' span: what every line logged while serving says.
    let span = tracing::info_span!("request", request_id = %id);
    let mut response = trace.run(next.run(request)).instrument(span.clone()).await;
    let route = response
        .extensions()
        .get::<Route>()
        .map_or("unmatched", |route| route.0.as_str());
    let status = response.status();
    trace.with(|span| {
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if status.is_server_error() {
            span.set_status(Status::error(""));
        }
    });
    trace.in_scope(|| {
        span.in_scope(|| {
            tracing::info!(
                target: "herald::access",
                method = %method,
                route,
                status = status.as_u16(),
                latency_ms = started.elapsed().as_secs_f64() * 1000.0,
                "request"
            );
        })
    });
    response.headers_mut().insert(REQUEST_ID, header);
    response
}

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
