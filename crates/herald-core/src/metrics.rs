//! The Prometheus metrics every role records, served at `/metrics`.
//!
//! One process-wide set: a process that runs several roles reports them
//! together, as one scrape target.

mod exposition;

use std::sync::LazyLock;

pub use exposition::{Format, render_as};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// What an attempt got back: the status class (`2xx`...), or `timeout`,
/// `connection` or `refused` (the SSRF guard) when there was no response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseClassLabel {
    pub class: &'static str,
}

/// A durable consumer of a stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub stream: &'static str,
    pub consumer: &'static str,
}

/// The SSRF guard's range that refused an address, by its description
/// (`loopback`, `private, RFC 1918`...: a fixed list, so a
/// bounded label).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedRange {
    pub range: &'static str,
}

/// A delivery state of an endpoint (`active`, `failing`, `disabled`,
/// `paused`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointStateLabel {
    pub state: &'static str,
}

/// Whether an endpoint lookup found the user's endpoints in the worker's
/// cache (`hit`) or read them from the bucket (`miss`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheResult {
    pub result: &'static str,
}

/// The step a failed operator reconcile failed at.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailedStep {
    pub error: &'static str,
}

pub struct Metrics {
    /// Tasks the API stored (idempotent replays excluded).
    pub tasks_accepted: Counter,
    /// Tasks whose handler ran, by `completed` or `failed`.
    pub tasks_handled: Family<Outcome, Counter>,
    /// Webhook attempts by outcome (`delivered`, `retrying`, `exhausted`...).
    pub webhook_attempts: Family<Outcome, Counter>,
    /// Webhook attempts by what came back (`2xx`... `timeout`).
    pub webhook_responses: Family<ResponseClassLabel, Counter>,
    /// Deliveries that ended (or were held), by the attempt outcome that
    /// ended them: `delivered`, `exhausted`, `gone`, `abandoned`,
    /// `endpoint_removed`, `held`.
    pub deliveries: Family<Outcome, Counter>,
    /// Time from sending a webhook to its response (or failure), seconds.
    pub webhook_duration: Histogram,
    /// Failure mails by `sent`, `retrying` or `failed`.
    pub mails: Family<Outcome, Counter>,
    /// Webhook requests the SSRF guard refused, by the refusing range.
    pub ssrf_refusals: Family<RefusedRange, Counter>,
    /// Messages of a consumer not yet delivered, as its last sample said
    /// (every replica reports the same consumer: aggregate with `max`).
    pub consumer_pending: Family<ConsumerLabels, Gauge>,
    /// Messages delivered and not yet acknowledged.
    pub consumer_ack_pending: Family<ConsumerLabels, Gauge>,
    /// `WebhookEndpoint`s by the delivery state their status shows (the
    /// operator's leader keeps it).
    pub endpoints: Family<EndpointStateLabel, Gauge>,
    /// `WebhookEndpoint` reconciles the operator ran.
    pub operator_reconciles: Counter,
    /// Reconciles that failed, by the step (`secret_read`, `record_write`...).
    pub operator_reconcile_failures: Family<FailedStep, Counter>,
    /// Endpoint lookups by `hit` or `miss` of the worker's bounded cache,
    /// or `carried`: answered by the record the delivery job carried.
    pub endpoint_cache_lookups: Family<CacheResult, Counter>,
    /// Users whose endpoints the worker's cache holds.
    pub endpoint_cache_users: Gauge,
    registry: Registry,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let tasks_accepted = Counter::default();
    let tasks_handled = Family::default();
    let webhook_attempts = Family::default();
    let webhook_responses = Family::default();
    let deliveries = Family::default();
    // 1 ms to about 131 s: past the longest endpoint timeout (120 s).
    let webhook_duration = Histogram::new(exponential_buckets(0.001, 2.0, 18));
    let mails = Family::default();
    let ssrf_refusals = Family::default();
    let consumer_pending = Family::default();
    let consumer_ack_pending = Family::default();
    let endpoints = Family::default();
    let operator_reconciles = Counter::default();
    let operator_reconcile_failures = Family::default();
    let endpoint_cache_lookups = Family::default();
    let endpoint_cache_users = Gauge::default();
    let mut registry = Registry::with_prefix("herald");
    let build_info: Family<Vec<(&'static str, &'static str)>, Gauge> = Family::default();
    build_info
        .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION"))])
        .set(1);
    registry.register("build_info", "Herald's version, as a label", build_info);
    registry.register(
        "tasks_accepted",
        "Tasks stored by the API",
        tasks_accepted.clone(),
    );
    registry.register(
        "tasks_handled",
        "Tasks whose handler ran, by outcome",
        tasks_handled.clone(),
    );
    registry.register(
        "webhook_attempts",
        "Webhook delivery attempts, by outcome",
        webhook_attempts.clone(),
    );
    registry.register(
        "webhook_responses",
        "Webhook delivery attempts, by response class (2xx..., timeout, connection, refused)",
        webhook_responses.clone(),
    );
    registry.register(
        "deliveries",
        "Deliveries ended or held, by the outcome of their last attempt",
        deliveries.clone(),
    );
    registry.register(
        "webhook_duration_seconds",
        "Time from sending a webhook to its answer or failure",
        webhook_duration.clone(),
    );
    registry.register("mails", "Failure mails, by outcome", mails.clone());
    registry.register(
        "ssrf_refusals",
        "Webhook requests the SSRF guard refused, by the refusing range",
        ssrf_refusals.clone(),
    );
    registry.register(
        "consumer_pending_messages",
        "Messages a consumer has not delivered yet (its backlog), sampled by its workers",
        consumer_pending.clone(),
    );
    registry.register(
        "consumer_ack_pending_messages",
        "Messages a consumer delivered that are not acknowledged yet, sampled by its workers",
        consumer_ack_pending.clone(),
    );
    registry.register(
        "endpoints",
        "WebhookEndpoints by the delivery state their status shows, as the operator's leader wrote it",
        endpoints.clone(),
    );
    registry.register(
        "operator_reconciles",
        "WebhookEndpoint reconciles the operator ran",
        operator_reconciles.clone(),
    );
    registry.register(
        "operator_reconcile_failures",
        "WebhookEndpoint reconciles that failed, by the failed step",
        operator_reconcile_failures.clone(),
    );
    registry.register(
        "endpoint_cache_lookups",
        "Endpoint lookups of the workers, by whether the cache held the user's endpoints (hit), the delivery job carried the record and nothing newer exists (carried), or it was read from herald-endpoints (miss)",
        endpoint_cache_lookups.clone(),
    );
    registry.register(
        "endpoint_cache_users",
        "Users whose endpoints the worker's bounded cache holds",
        endpoint_cache_users.clone(),
    );
    Metrics {
        tasks_accepted,
        tasks_handled,
        webhook_attempts,
        webhook_responses,
        deliveries,
        webhook_duration,
        mails,
        ssrf_refusals,
        consumer_pending,
        consumer_ack_pending,
        endpoints,
        operator_reconciles,
        operator_reconcile_failures,
        endpoint_cache_lookups,
        endpoint_cache_users,
        registry,
    }
});

pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// The OpenMetrics text exposition of every metric ([`render_as`] serves
/// either format).
pub fn render() -> String {
    let mut text = String::new();
    encode(&mut text, &METRICS.registry).expect("writing to a String cannot fail");
    text
}

impl Metrics {
    pub fn count(family: &Family<Outcome, Counter>, outcome: &'static str) {
        family.get_or_create(&Outcome { outcome }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_values_appear_in_the_exposition() {
        Metrics::count(&metrics().webhook_attempts, "delivered");
        metrics().webhook_duration.observe(0.02);
        let text = render();
        assert!(
            text.contains("herald_webhook_attempts_total{outcome=\"delivered\"}"),
            "{text}"
        );
        assert!(
            text.contains("herald_webhook_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("herald_tasks_accepted_total"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
