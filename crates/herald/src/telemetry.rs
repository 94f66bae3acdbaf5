//! Logs to stderr, as `log.filter` and `log.format` say (`RUST_LOG` wins
//! over the filter), and traces over OTLP when `[tracing]` or the standard
//! `OTEL_*` variables name a collector.
//!
//! Traces are made with the OpenTelemetry API where the work is (the API's
//! request span, each consumed message's span: task, attempt, mail) and
//! continued across NATS by the `traceparent` header
//! ([`herald_queue::trace_context`]). Without a collector no tracer and no
//! propagator is installed, so no span is made and no header is written.
//! With one, ended spans are queued for
//! the SDK's batch processor thread, which is woken once per batch (512
//! spans, or every `OTEL_BSP_SCHEDULE_DELAY`), not once per span as the
//! async-runtime processor was: its wakes cost another 7% of the throughput
//! on two cores (docs/benchmarks.md, "The cost of tracing").

use std::time::Duration;

use anyhow::{Context, bail};
use herald_queue::trace_context::{self, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
};
use tracing::{Level, Subscriber};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::filter_fn,
    fmt::{self, FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::config::{self, LogConfig, TracingConfig};

/// How long a shutting-down process waits for its last spans to be sent.
const EXPORT_GRACE: Duration = Duration::from_secs(5);

/// What outlives start-up: the trace pipeline, flushed by [`Self::shutdown`].
#[must_use = "call shutdown() at the end, or the last spans are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered (for at most [`EXPORT_GRACE`]).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The provider blocks until its export thread has sent the last
        // batch, which for gRPC needs the runtime: off the runtime's workers.
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(EXPORT_GRACE)).await;
        if let Ok(Err(e)) = flushed {
            eprintln!("herald: the last traces were not all exported: {e}");
        }
    }
}

/// Starts logging, and tracing if a collector is configured. Must run
/// inside the tokio runtime (the gRPC exporter's connection lives there).
/// An invalid tracing configuration is an error: traces an operator asked
/// for must not silently go missing.
pub fn init(log: &LogConfig, tracing: &TracingConfig) -> anyhow::Result<Telemetry> {
    let provider = match Exporting::from_config(tracing)? {
        Some(exporting) => Some(exporting.provider()?),
        None => None,
    };
    install(log, provider.is_some());
    if let Some(provider) = &provider {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider.clone());
        trace_context::install(opentelemetry::global::tracer("herald"));
    }
    Ok(Telemetry { provider })
}

/// Starts logging only, for commands whose work is no trace's business.
pub fn init_logs(log: &LogConfig) {
    install(log, false);
}

fn install(log: &LogConfig, traced: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.filter));
    let logs = match log.format {
        config::LogFormat::Json => fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .map_event_format(WithTraceIds)
            .with_filter(filter)
            .boxed(),
        config::LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let span_events = traced.then(span_events);
    // A second init in one process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(span_events)
        .try_init();
}

/// Herald's warnings and errors also become events of the trace span they
/// happen in; the log filter does not apply, so quiet logs keep them.
fn span_events<S>() -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    SpanEvents.with_filter(
        filter_fn(|metadata| {
            metadata.is_event()
                && metadata.target().starts_with("herald")
                && *metadata.level() <= Level::WARN
        })
        // Keeps the global level at that of the logs: the libraries' debug
        // and trace events stay off at their callsites.
        .with_max_level_hint(Level::WARN),
    )
}

/// Adds each event it sees to the current trace span, with its fields as
/// attributes.
struct SpanEvents;

impl<S: Subscriber> Layer<S> for SpanEvents {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        trace_context::with_current(|span| {
            let mut fields = EventFields::default();
            event.record(&mut fields);
            fields.attributes.push(KeyValue::new(
                "level",
                event.metadata().level().as_str().to_lowercase(),
            ));
            span.add_event(fields.message, fields.attributes);
        });
    }
}

/// An event's message and its other fields.
#[derive(Default)]
struct EventFields {
    message: String,
    attributes: Vec<KeyValue>,
}

impl tracing::field::Visit for EventFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_string();
        } else {
            self.attributes
                .push(KeyValue::new(field.name(), value.to_string()));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.attributes
                .push(KeyValue::new(field.name(), format!("{value:?}")));
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// Where and how spans are exported, from `[tracing]` and the `OTEL_*`
/// variables it falls back to.
#[derive(Debug)]
struct Exporting {
    /// `None`: the exporter reads `OTEL_EXPORTER_OTLP_*` itself.
    endpoint: Option<String>,
    protocol: Protocol,
    service_name: Option<String>,
    sample_ratio: Option<f64>,
}

impl Exporting {
    fn from_config(config: &TracingConfig) -> anyhow::Result<Option<Self>> {
        Self::from(config, |name| std::env::var(name).ok())
    }

    /// `None` when nothing is to be exported. `env` reads a variable.
    fn from(
        config: &TracingConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        let set = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
            || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none")
        {
            return Ok(None);
        }
        let endpoint = (!config.otlp_endpoint.is_empty()).then(|| config.otlp_endpoint.clone());
        if endpoint.is_none()
            && set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
            && set("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        {
            return Ok(None);
        }
        let protocol = Some(config.protocol.clone())
            .filter(|p| !p.is_empty())
            .or_else(|| set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
            .or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL"));
        let protocol = match protocol.as_deref().map(str::trim) {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => {
                bail!("tracing protocol {other:?} is not supported: use grpc or http/protobuf")
            }
        };
        if let Some(ratio) = config.sample_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            bail!("tracing.sample_ratio must be between 0 and 1, not {ratio}");
        }
        Ok(Some(Exporting {
            endpoint,
            protocol,
            service_name: Some(config.service_name.clone())
                .filter(|name| !name.is_empty())
                .or_else(|| set("OTEL_SERVICE_NAME").is_none().then(|| "herald".into())),
            sample_ratio: config.sample_ratio,
        }))
    }

    /// The endpoint the exporter is given: a base URL, as
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is, with the traces path for HTTP.
    fn exporter_endpoint(&self) -> Option<String> {
        let base = self.endpoint.as_deref()?;
        Some(match self.protocol {
            Protocol::Grpc => base.to_string(),
            Protocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
        })
    }

    fn provider(&self) -> anyhow::Result<SdkTracerProvider> {
        // The HTTP exporter's reqwest client and the gRPC client's TLS use
        // rustls, built without a default crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let endpoint = self.exporter_endpoint();
        let exporter = match self.protocol {
            Protocol::Grpc => {
                let builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                match endpoint {
                    Some(endpoint) => builder.with_endpoint(endpoint).build(),
                    None => builder.build(),
                }
            }
            Protocol::HttpProtobuf => {
                let builder = opentelemetry_otlp::SpanExporter::builder().with_http();
                match endpoint {
                    Some(endpoint) => builder.with_endpoint(endpoint).build(),
                    None => builder.build(),
                }
            }
        }
        .context("cannot set up the OTLP trace exporter")?;
        let mut resource = Resource::builder();
        if let Some(name) = &self.service_name {
            resource = resource.with_service_name(name.clone());
        }
        let mut provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build());
        if let Some(ratio) = self.sample_ratio {
            provider = provider.with_sampler(Sampler::ParentBased(Box::new(
                Sampler::TraceIdRatioBased(ratio),
            )));
        }
        Ok(provider.build())
    }
}

/// The JSON log line with the `trace_id` and `span_id` of the trace span it
/// was logged in, if any, so a log search finds the trace.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some((trace_id, span_id)) = trace_context::current_ids() else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn exporting(
        config: &TracingConfig,
        vars: &[(&str, &str)],
    ) -> anyhow::Result<Option<Exporting>> {
        Exporting::from(config, |name| {
            vars.iter()
                .find(|(var, _)| *var == name)
                .map(|(_, value)| value.to_string())
        })
    }

    #[test]
    fn warnings_and_errors_in_a_trace_span_become_its_events() {
        use std::collections::HashMap;

        use herald_queue::trace_context::{SpanKind, TraceSpan};
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_sdk::trace::InMemorySpanExporter;

        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        trace_context::install(opentelemetry::global::BoxedTracer::new(Box::new(
            provider.tracer("test"),
        )));
        let subscriber = tracing_subscriber::registry().with(span_events());
        tracing::subscriber::with_default(subscriber, || {
            let span = TraceSpan::start(
                || "work",
                SpanKind::Internal,
                &HashMap::<String, String>::new(),
                Vec::new,
            );
            span.in_scope(|| {
                tracing::warn!(target: "herald::test", code = 7, "something odd");
                tracing::error!(target: "herald::test", "something wrong");
                tracing::info!(target: "herald::test", "routine");
                tracing::warn!(target: "hyper::test", "a library's");
            });
            // Outside any trace span: nothing to add it to.
            tracing::warn!(target: "herald::test", "unattached");
        });
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(spans.len(), 1);
        let events: Vec<(String, Vec<String>)> = spans[0]
            .events
            .iter()
            .map(|event| {
                let attributes = event
                    .attributes
                    .iter()
                    .map(|kv| format!("{}={}", kv.key, kv.value))
                    .collect();
                (event.name.to_string(), attributes)
            })
            .collect();
        assert_eq!(
            events,
            [
                (
                    "something odd".to_string(),
                    vec!["code=7".to_string(), "level=warn".to_string()]
                ),
                (
                    "something wrong".to_string(),
                    vec!["level=error".to_string()]
                ),
            ]
        );
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        assert!(exporting(&TracingConfig::default(), &[]).unwrap().is_none());
        let configured = TracingConfig {
            otlp_endpoint: "http://collector:4318".into(),
            ..Default::default()
        };
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert!(exporting(&configured, &[off]).unwrap().is_none(), "{off:?}");
        }
    }

    #[test]
    fn the_standard_variables_fill_what_the_config_leaves_empty() {
        let from_env = exporting(
            &TracingConfig::default(),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_SERVICE_NAME", "billing-herald"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(from_env.protocol, Protocol::Grpc);
        // The exporter reads the endpoint itself; the SDK reads the name.
        assert_eq!(from_env.exporter_endpoint(), None);
        assert_eq!(from_env.service_name, None);

        let config = TracingConfig {
            otlp_endpoint: "http://collector:4318/".into(),
            protocol: "http/protobuf".into(),
            ..Default::default()
        };
        let from_config = exporting(&config, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])
            .unwrap()
            .unwrap();
        assert_eq!(from_config.protocol, Protocol::HttpProtobuf);
        assert_eq!(
            from_config.exporter_endpoint().as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(from_config.service_name.as_deref(), Some("herald"));
    }

    #[test]
    fn a_bad_protocol_or_ratio_is_refused() {
        let endpoint = [(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces",
        )];
        let protocol = TracingConfig {
            protocol: "http/json".into(),
            ..Default::default()
        };
        let error = exporting(&protocol, &endpoint).unwrap_err().to_string();
        assert!(error.contains("http/json"), "{error}");
        let ratio = TracingConfig {
            sample_ratio: Some(1.5),
            ..Default::default()
        };
        let error = exporting(&ratio, &endpoint).unwrap_err().to_string();
        assert!(error.contains("sample_ratio"), "{error}");
    }
}
