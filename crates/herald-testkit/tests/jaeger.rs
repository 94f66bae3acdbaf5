//! The Jaeger harness receives OTLP and serves back what it received.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_testkit::{Jaeger, http_client, span_count};
use opentelemetry::trace::{Span, Tracer, TracerProvider};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use serde_json::json;

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_span_sent_over_otlp_http_is_read_back_from_the_query_api() {
    let jaeger = Jaeger::start().await;
    // Distinct per run, so the assertions below cannot meet another span;
    // its leading zeros check that the ids read back are 32 digits too.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let trace_id = format!("{:032x}", now.as_nanos());
    let (parent_id, child_id) = ("00f067aa0ba902b7", "00f067aa0ba902b8");
    let start = now.as_nanos() - 5_000_000;
    let span = |id: &str, parent: Option<&str>, name: &str| {
        let mut span = json!({
            "traceId": trace_id,
            "spanId": id,
            "name": name,
            "kind": 2,
            "startTimeUnixNano": start.to_string(),
            "endTimeUnixNano": (start + 1_000_000).to_string(),
            "attributes": [{"key": "herald.attempt", "value": {"intValue": "1"}}],
        });
        if let Some(parent) = parent {
            span["parentSpanId"] = parent.into();
        }
        span
    };
    // OTLP/JSON, as an exporter with `http/json` would send it.
    let request = json!({
        "resourceSpans": [{
            "resource": {"attributes": [
                {"key": "service.name", "value": {"stringValue": "testkit-probe"}},
            ]},
            "scopeSpans": [{
                "scope": {"name": "herald-testkit"},
                "spans": [
                    span(parent_id, None, "POST /users/{user}/tasks/{type}"),
                    span(child_id, Some(parent_id), "webhook attempt"),
                ],
            }],
        }],
    });
    let response = http_client()
        .post(format!("{}/v1/traces", jaeger.otlp_http_endpoint()))
        .json(&request)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "OTLP/HTTP refused the spans: {} {}",
        response.status(),
        response.text().await.unwrap_or_default()
    );

    let trace = jaeger.wait_for_trace(&trace_id, 2, DEADLINE).await;
    assert_eq!(trace["traceID"], trace_id.as_str());
    assert_eq!(span_count(&trace), 2, "{trace:#}");
    let spans = trace["spans"].as_array().unwrap();
    let child = spans
        .iter()
        .find(|span| span["spanID"] == child_id)
        .unwrap_or_else(|| panic!("no span {child_id} in {trace:#}"));
    assert_eq!(child["operationName"], "webhook attempt");
    assert_eq!(child["references"][0]["refType"], "CHILD_OF");
    assert_eq!(child["references"][0]["spanID"], parent_id);
    assert_eq!(child["references"][0]["traceID"], trace_id.as_str());
    assert_eq!(child["traceID"], trace_id.as_str());
    let process = &trace["processes"][child["processID"].as_str().unwrap()];
    assert_eq!(process["serviceName"], "testkit-probe");

    // Listed by service too, and the gRPC receiver is listening.
    assert!(
        jaeger.services().await.iter().any(|s| s == "testkit-probe"),
        "{:?}",
        jaeger.services().await
    );
    let listed = jaeger.traces("testkit-probe").await;
    assert!(
        listed.iter().any(|t| t["traceID"] == trace_id.as_str()),
        "{listed:#?}"
    );
    assert!(jaeger.trace(&format!("{:032x}", 1)).await.is_none());
}

/// Over gRPC, with the OpenTelemetry SDK and OTLP exporter Herald exports
/// with (`herald/src/telemetry.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_span_exported_over_otlp_grpc_is_read_back() {
    let jaeger = Jaeger::start().await;
    // The gRPC client's TLS stack has no default crypto provider.
    drop(http_client());
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(jaeger.otlp_grpc_endpoint())
        .build()
        .unwrap();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name("testkit-grpc")
                .build(),
        )
        .build();
    let tracer = provider.tracer("herald-testkit");
    let mut span = tracer.start("grpc probe");
    span.set_attribute(opentelemetry::KeyValue::new("herald.attempt", 2));
    let trace_id = span.span_context().trace_id().to_string();
    let span_id = span.span_context().span_id().to_string();
    span.end();
    drop(tracer);
    // Flushes the batch; blocks until the export thread has sent it over
    // the runtime's gRPC connection, so off the runtime's workers.
    tokio::task::spawn_blocking(move || provider.shutdown())
        .await
        .unwrap()
        .unwrap();

    let trace = jaeger.wait_for_trace(&trace_id, 1, DEADLINE).await;
    assert_eq!(trace["traceID"], trace_id.as_str());
    let span = &trace["spans"][0];
    assert_eq!(span["spanID"], span_id.as_str());
    assert_eq!(span["operationName"], "grpc probe");
    let process = &trace["processes"][span["processID"].as_str().unwrap()];
    assert_eq!(process["serviceName"], "testkit-grpc");
}
