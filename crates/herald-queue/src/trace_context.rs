//! W3C trace context (`traceparent`, `tracestate`) in the headers of the
//! JetStream messages Herald publishes and consumes, so one trace follows a
//! task from the API's request through every queue to its last attempt.
//!
//! Publishing injects the context of the current `tracing` span
//! ([`inject_current`], called by every publish); a consumer makes its
//! span's parent what the message carries ([`continue_from`]). With no
//! propagator installed (tracing off) both do nothing: no header is
//! written, none is read.

use std::collections::HashMap;

use async_nats::HeaderMap;
use opentelemetry::{
    propagation::{Extractor, Injector},
    trace::TraceContextExt,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// A message's headers, read by the propagator.
struct HeadersOf<'a>(&'a HeaderMap);

impl Extractor for HeadersOf<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// A message's headers, written by the propagator.
struct HeadersFor<'a>(&'a mut HeaderMap);

impl Injector for HeadersFor<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` (the usual case) says nothing: not a byte
        // of it goes into every message.
        if !value.is_empty() {
            self.0.insert(key, value.as_str());
        }
    }
}

/// Writes the current span's trace context into `headers`.
pub fn inject_current(headers: &mut HeaderMap) {
    inject_current_into(&mut HeadersFor(headers));
}

/// Writes the current span's trace context with `carrier` (the headers of
/// an HTTP request, say).
pub fn inject_current_into(carrier: &mut dyn Injector) {
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, carrier);
    });
}

/// Makes the trace context in `headers` (if any) the parent of `span`,
/// which must not have been entered yet.
pub fn continue_from(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if let Some(headers) = headers {
        continue_from_carrier(span, &HeadersOf(headers));
    }
}

/// [`continue_from`] for the trace context `carrier` holds (the headers of
/// an HTTP request, say).
pub fn continue_from_carrier(span: &tracing::Span, carrier: &dyn Extractor) {
    let parent =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(carrier));
    // Fails only when tracing is off (no OpenTelemetry layer): nothing to do.
    let _ = span.set_parent(parent);
}

/// The current span's `traceparent`, to keep with what it produced; `None`
/// when tracing is off.
pub fn current_traceparent() -> Option<String> {
    let mut fields = HashMap::new();
    inject_current_into(&mut fields);
    fields.remove("traceparent")
}

/// Links `span` to the span `traceparent` names (the work it repeats),
/// when that is a valid trace context.
pub fn link_to(span: &tracing::Span, traceparent: &str) {
    let fields = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let context =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&fields));
    let linked = context.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}
