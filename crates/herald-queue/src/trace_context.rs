//! The spans Herald exports, and the W3C trace context (`traceparent`,
//! `tracestate`) that carries them across every queue: in the headers of
//! the JetStream messages Herald publishes and consumes, and of the HTTP
//! requests it serves and sends.
//!
//! Spans are made with the OpenTelemetry API directly ([`TraceSpan`]), not
//! through `tracing` spans and a bridge layer: a delivery's three spans
//! (request, task, attempt) then cost an OpenTelemetry span each and
//! nothing more, and a span the sampler drops costs almost nothing
//! (docs/benchmarks.md, "The cost of tracing"). The `tracing` spans around
//! the same work are for the logs only.
//!
//! A [`TraceSpan`]'s future runs with its context current, so everything
//! it calls reaches the span without passing it on: publishes inject it
//! ([`inject_current`], called by every publish), attributes found late
//! are set on it ([`with_current`]), JSON log lines name it
//! ([`current_ids`]). Until [`install`] runs (tracing off, the default)
//! every function here returns at once: no span is made, no header is
//! written, none is read.

use std::{borrow::Cow, collections::HashMap, future::Future, sync::OnceLock};

use async_nats::HeaderMap;
use opentelemetry::{
    Context,
    context::FutureExt,
    global::BoxedTracer,
    propagation::{Extractor, Injector},
    trace::{Span, TraceContextExt, Tracer},
};
pub use opentelemetry::{
    KeyValue,
    trace::{SpanKind, SpanRef, Status},
};

/// Where spans go; set once, when the process has a collector.
static TRACER: OnceLock<BoxedTracer> = OnceLock::new();

/// Turns tracing on for this process: spans are made with `tracer`, and
/// trace context is read and written with the global propagator (which the
/// caller installs too). A second call keeps the first tracer.
pub fn install(tracer: BoxedTracer) {
    let _ = TRACER.set(tracer);
}

/// Whether spans are made at all.
pub fn is_on() -> bool {
    TRACER.get().is_some()
}

/// An exported span, or nothing when tracing is off. Clones share the span,
/// which ends when the last of them is dropped (a future run with
/// [`Self::run`] holds one until it is done).
#[derive(Clone, Default)]
pub struct TraceSpan {
    context: Option<Context>,
}

impl TraceSpan {
    /// No span: what every constructor returns while tracing is off, and
    /// what probes get.
    pub fn none() -> TraceSpan {
        TraceSpan::default()
    }

    /// Starts a span continuing the trace context `carrier` holds (a new
    /// trace when it holds none, or an invalid one). The name is made only
    /// when tracing is on, and `attributes` only when the span is recorded
    /// (not when the sampler drops it).
    pub fn start<N: Into<Cow<'static, str>>>(
        name: impl FnOnce() -> N,
        kind: SpanKind,
        carrier: &dyn Extractor,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> TraceSpan {
        let Some(tracer) = TRACER.get() else {
            return TraceSpan::none();
        };
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(carrier)
        });
        let mut span = tracer
            .span_builder(name())
            .with_kind(kind)
            .start_with_context(tracer, &parent);
        if span.is_recording() {
            span.set_attributes(attributes());
        }
        TraceSpan {
            context: Some(parent.with_span(span)),
        }
    }

    /// [`Self::start`] for a consumed message, continuing the trace its
    /// headers carry.
    pub fn for_message<N: Into<Cow<'static, str>>>(
        name: impl FnOnce() -> N,
        kind: SpanKind,
        headers: Option<&HeaderMap>,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> TraceSpan {
        if !is_on() {
            return TraceSpan::none();
        }
        match headers {
            Some(headers) => TraceSpan::start(name, kind, &HeadersOf(headers), attributes),
            None => TraceSpan::start(name, kind, &HashMap::<String, String>::new(), attributes),
        }
    }

    /// Runs `future` with this span current: what it publishes, sets and
    /// logs belongs to the span.
    pub fn run<F: Future>(&self, future: F) -> impl Future<Output = F::Output> {
        let context = self.context.clone();
        async move {
            match context {
                Some(context) => future.with_context(context).await,
                None => future.await,
            }
        }
    }

    /// Runs `f` with this span current.
    pub fn in_scope<T>(&self, f: impl FnOnce() -> T) -> T {
        let _current = self.context.clone().map(Context::attach);
        f()
    }

    /// Runs `f` on the span, if there is one and it is recorded.
    pub fn with(&self, f: impl FnOnce(&SpanRef<'_>)) {
        if let Some(context) = &self.context {
            recorded(context, f);
        }
    }
}

/// Runs `f` on the current span (that of the innermost
/// [`TraceSpan::run`]) if it is recorded: attributes known only later, a
/// better name, the status. Nothing in `f` is computed otherwise (tracing
/// off, or a span the sampler dropped).
pub fn with_current(f: impl FnOnce(&SpanRef<'_>)) {
    if is_on() {
        Context::map_current(|context| recorded(context, f));
    }
}

fn recorded(context: &Context, f: impl FnOnce(&SpanRef<'_>)) {
    let span = context.span();
    if span.is_recording() {
        f(&span);
    }
}

/// The trace and span id of the current span, for a log line.
pub fn current_ids() -> Option<(String, String)> {
    if !is_on() {
        return None;
    }
    Context::map_current(|context| {
        let span = context.span();
        let ids = span.span_context();
        ids.is_valid()
            .then(|| (ids.trace_id().to_string(), ids.span_id().to_string()))
    })
}

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
    if !is_on() {
        return;
    }
    Context::map_current(|context| {
        if context.has_active_span() {
            opentelemetry::global::get_text_map_propagator(|propagator| {
                propagator.inject_context(context, carrier);
            });
        }
    });
}

/// The current span's `traceparent`, to keep with what it produced; `None`
/// when tracing is off.
pub fn current_traceparent() -> Option<String> {
    let mut fields = HashMap::new();
    inject_current_into(&mut fields);
    fields.remove("traceparent")
}

/// Links the current span to the span `traceparent` names (the work it
/// repeats), when that is a valid trace context.
pub fn link_current_to(traceparent: &str) {
    if !is_on() {
        return;
    }
    let fields = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let linked =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&fields));
    let linked = linked.span().span_context().clone();
    if linked.is_valid() {
        with_current(|span| span.add_link(linked, Vec::new()));
    }
}
