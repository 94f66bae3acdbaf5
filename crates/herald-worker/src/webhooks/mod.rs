//! The webhook worker: signs and POSTs each delivery job, records the
//! attempt, and decides what happens to the job.
//!
//! A delivery runs through five phases, one module each, read in the order
//! of `WebhookWorker::deliver`:
//!
//! 1. `gate`: may it be sent now? Its endpoint's record (unreadable or
//!    vanished: held), disabled, paused, its rate-limit slot, its share of
//!    the requests in flight. A delivery the gate stops sends nothing and
//!    is no attempt.
//! 2. `request`: the signed POST, and what came back.
//! 3. `classify`: what the response means (the table there).
//! 4. `decide`: the attempt's outcome, the delay before the next one, and
//!    whether the owner is mailed (the table there); `spread` moves the
//!    retries of an endpoint failing many deliveries at once apart.
//! 5. `settle`: the records (attempt, next attempt, mail) stored, the
//!    endpoint's health and the metrics updated, then the job acked or
//!    termed.
//!
//! The gate's decisions, the classification and the decision are pure
//! functions of what they are given, tested without NATS.

mod classify;
mod decide;
mod gate;
pub mod health;
mod request;
mod settle;
mod spread;

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use health::HealthTracker;
use herald_core::{
    metrics::Metrics,
    payload::{AttemptOutcome, DeliveryJob, RESPONSE_BODY_LIMIT, TaskEvent, decode},
    redact::RedactedUrl,
    schedule::RetrySchedule,
};
use herald_queue::{
    Broker,
    consume::{MessageHandler, delivery_count, with_progress},
    endpoints::EndpointCache,
    history,
    rate_limit::RateLimiter,
    trace_context::{self, KeyValue, SpanKind, SpanRef, Status, TraceSpan},
};
pub use request::{http_client, http_client_with};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use self::{
    classify::ResponseClass,
    decide::{Decision, RetryPolicy},
    gate::{InFlight, NotSent, Open, Verdict},
    request::{NoResponse, Response},
    settle::{Again, Attempt, settle, store_again},
    spread::RetrySpread,
};
use crate::ssrf::{GuardedClient, SsrfConfig};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookWorkerConfig {
    /// Webhook requests in flight at once in one process.
    pub concurrency: usize,
    /// Request timeout for endpoints that do not set `timeoutSeconds`.
    #[serde(with = "herald_core::duration_serde")]
    pub timeout: Duration,
    /// Delays between attempts for endpoints without a schedule of their own.
    pub retry_schedule: RetrySchedule,
    /// Longest `Retry-After` honoured; longer values are cut to this.
    #[serde(with = "herald_core::duration_serde")]
    pub max_retry_after: Duration,
    /// Delay before looking again at a job for a paused endpoint.
    #[serde(with = "herald_core::duration_serde")]
    pub paused_recheck: Duration,
    /// How often endpoint health is written to `herald-endpoint-health`.
    #[serde(with = "herald_core::duration_serde")]
    pub health_flush_interval: Duration,
    /// How long an endpoint may fail without a single success before it is
    /// disabled and its owner mailed (410 Gone disables at once).
    #[serde(with = "herald_core::duration_serde")]
    pub disable_after: Duration,
    /// Requests in flight at once to one endpoint in one process. A slow
    /// or hanging endpoint can hold at most this many of `concurrency`;
    /// its other deliveries wait as message schedules meanwhile.
    pub max_in_flight_per_endpoint: usize,
    /// Which non-global addresses webhooks may reach anyway.
    pub ssrf: SsrfConfig,
    /// Bytes of a global endpoint's response body kept in the attempt
    /// record (at most 1024; 0 keeps none). What the owner's own server
    /// answered, shown to that owner; for allow-listed addresses see
    /// `ssrf.allowed_response_body_bytes`.
    pub response_body_bytes: usize,
    /// How long a delivery whose endpoint record has vanished is held
    /// (looked at again every `paused_recheck`) before it is recorded as
    /// `endpoint_removed`: at least one `operator.health_resync`, so a
    /// record the operator removes and writes again keeps its deliveries.
    #[serde(with = "herald_core::duration_serde")]
    pub endpoint_removed_grace: Duration,
    /// Retries of one endpoint this process schedules per second at most,
    /// so deliveries that failed together do not all retry at once: a
    /// retry due sooner after the endpoint's last one is moved later, by
    /// at most `max_retry_spread` ([`spread`]). 0: retries keep their
    /// schedule exactly.
    pub retries_per_endpoint_per_second: u32,
    /// The most a retry is moved by `retries_per_endpoint_per_second`.
    #[serde(with = "herald_core::duration_serde")]
    pub max_retry_spread: Duration,
}

impl Default for WebhookWorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 256,
            timeout: Duration::from_secs(15),
            retry_schedule: RetrySchedule::standard(),
            max_retry_after: Duration::from_secs(3600),
            paused_recheck: Duration::from_secs(60),
            health_flush_interval: Duration::from_secs(1),
            disable_after: Duration::from_secs(5 * 24 * 3600),
            max_in_flight_per_endpoint: 32,
            ssrf: SsrfConfig::default(),
            response_body_bytes: RESPONSE_BODY_LIMIT,
            endpoint_removed_grace: Duration::from_secs(300),
            retries_per_endpoint_per_second: 20,
            max_retry_spread: Duration::from_secs(300),
        }
    }
}

pub struct WebhookWorker {
    broker: Broker,
    endpoints: EndpointCache,
    health: HealthTracker,
    rate_limiter: RateLimiter,
    in_flight: InFlight,
    retry_spread: RetrySpread,
    client: GuardedClient,
    config: WebhookWorkerConfig,
    progress_interval: Duration,
}

impl WebhookWorker {
    pub fn new(
        broker: Broker,
        endpoints: EndpointCache,
        health: HealthTracker,
        config: WebhookWorkerConfig,
        ack_wait: Duration,
    ) -> Self {
        Self {
            rate_limiter: RateLimiter::new(broker.clone()),
            in_flight: InFlight::default(),
            retry_spread: RetrySpread::new(
                config.retries_per_endpoint_per_second,
                config.max_retry_spread,
            ),
            broker,
            endpoints,
            health,
            client: http_client(&config.ssrf),
            config,
            progress_interval: ack_wait / 3,
        }
    }

    /// One delivery, attempt number `attempt`, phase by phase: gate,
    /// request, classify, decide, record and settle.
    async fn deliver(&self, message: &Message, job: DeliveryJob, attempt: u32) {
        if delivery_count(message) > 1 && self.delivered_before(&job).await {
            trace_context::with_current(|span| {
                span.set_attribute(KeyValue::new("herald.outcome", "already_delivered"));
            });
            tracing::info!(
                task = %job.task,
                endpoint = %job.endpoint,
                "a job handed out again was delivered before (its ack was lost); acked without sending"
            );
            let _ = message.ack().await;
            return;
        }
        let task = job.task.clone();
        let Open {
            job,
            endpoint,
            permit: _in_flight,
        } = match self.gate(job, attempt).await {
            Verdict::Send(open) => open,
            Verdict::Settle(record, not_sent) => {
                trace_context::with_current(|span| {
                    span.set_attribute(KeyValue::new("herald.outcome", not_sent.as_str()));
                });
                if not_sent != NotSent::HandedBack {
                    let metrics = herald_core::metrics::metrics();
                    Metrics::count(&metrics.deliveries, not_sent.as_str());
                }
                return settle(&self.broker, message, &task, vec![record], AckKind::Ack).await;
            }
        };
        trace_context::with_current(|span| {
            span.update_name("webhook attempt");
            span.set_attribute(KeyValue::new(
                "url.full",
                RedactedUrl::from_text(&endpoint.url).as_str().to_string(),
            ));
        });
        let response = with_progress(
            message,
            self.progress_interval,
            request::send(&self.client, &self.config, &endpoint, &job),
        )
        .await;
        let now = herald_core::now_ms();
        let mut decision = Decision::of(
            ResponseClass::of(&response),
            attempt,
            response.retry_after,
            RetryPolicy::for_endpoint(&endpoint, &self.config),
            endpoint.email.is_some(),
        );
        if decision.outcome == AttemptOutcome::Delivered {
            self.retry_spread.forget(&job.user, &job.endpoint);
        }
        decision.next_delay = decision.next_delay.map(|delay| {
            self.retry_spread
                .delay(&job.user, &job.endpoint, now, delay)
        });
        trace_context::with_current(|span| record_on_span(span, &response, &decision));
        self.record_health(&job, &response, &decision, now);
        let records = Attempt {
            job: &job,
            url: &endpoint.url,
            number: attempt,
            at_ms: now,
        }
        .records(&response, &decision, endpoint.email.as_deref());
        settle(&self.broker, message, &task, records, decision.ack()).await;
    }

    /// Whether an earlier delivery of this job's message recorded its
    /// webhook delivered: it did its work, and only its ack was lost (a
    /// worker killed, or the NATS server it acked to gone, between the
    /// record and the ack). Sending again would deliver the webhook twice.
    /// Asked only of a message handed out again, so the normal path reads
    /// nothing; when the history cannot be read, the job is sent (at least
    /// once wins over at most once).
    async fn delivered_before(&self, job: &DeliveryJob) -> bool {
        let events = match history::task_events(&self.broker, &job.user, &job.task).await {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(task = %job.task, error = %e, "cannot read the task's history to check an earlier delivery; sending");
                return false;
            }
        };
        events.iter().any(|event| {
            matches!(event, TaskEvent::Delivery(recorded)
                if recorded.endpoint == job.endpoint
                    && recorded.redelivery == job.redelivery
                    && recorded.attempt >= job.attempt
                    && recorded.outcome == AttemptOutcome::Delivered)
        })
    }
}

/// The number of the HTTP attempt this delivery would make. The job carries
/// the number of the next request; a path that sends nothing hands the job
/// back as a new message with the same number ([`Again::HandBack`]), never
/// with a nak, whose redelivery would look like a request. So a message
/// delivered again means its previous delivery ended without an outcome (a
/// worker died or hung holding it) after it may have reached the endpoint:
/// one more attempt each. The one exception: when NATS refuses even the
/// hand-back, the nak that remains counts once too often, never too rarely.
/// A redelivery whose earlier delivery recorded the webhook delivered is
/// not sent at all ([`WebhookWorker::delivered_before`]).
fn attempt_number(message: &Message, job: &DeliveryJob) -> u32 {
    job.attempt
        .saturating_add(delivery_count(message).saturating_sub(1))
}

/// What the attempt's span says of its response and outcome. The SSRF
/// verdict is the response class `refused` (with the range in the error).
fn record_on_span(span: &SpanRef<'_>, response: &Response, decision: &Decision) {
    if let Some(status) = response.status {
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
    }
    let ssrf = if response.no_response == Some(NoResponse::Refused) {
        "refused"
    } else {
        "allowed"
    };
    span.set_attributes([
        KeyValue::new("herald.response_class", response.class_label()),
        KeyValue::new("herald.ssrf", ssrf),
        KeyValue::new("herald.outcome", decision.outcome.as_str()),
    ]);
    if let Some(error) = &response.error {
        span.set_attribute(KeyValue::new("error.message", error.clone()));
    }
    if decision.outcome != AttemptOutcome::Delivered {
        span.set_status(Status::error(""));
    }
}

#[async_trait::async_trait]
impl MessageHandler for WebhookWorker {
    async fn handle(&self, message: Message) {
        let job = match decode::<DeliveryJob>(&message.payload) {
            Ok(job) => job,
            Err(e) => {
                tracing::error!(subject = %message.subject, error = %e, "terminating unreadable delivery job");
                // Term: it will never parse; retrying is pointless.
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let attempt = attempt_number(&message, &job);
        // Named "webhook attempt" once the gate lets the request go; a
        // delivery held or handed back keeps "webhook gate".
        let trace = TraceSpan::for_message(
            || "webhook gate",
            SpanKind::Client,
            message.headers.as_ref(),
            || {
                let mut attributes = vec![
                    KeyValue::new("herald.task", job.task.to_string()),
                    KeyValue::new("herald.user", job.user.to_string()),
                    KeyValue::new("herald.endpoint", job.endpoint.to_string()),
                    KeyValue::new("herald.attempt", i64::from(attempt)),
                ];
                if let Some(redelivery) = &job.redelivery {
                    attributes.push(KeyValue::new("herald.redelivery", redelivery.to_string()));
                }
                attributes
            },
        );
        let span = tracing::info_span!(
            "webhook",
            task = %job.task,
            endpoint = %job.endpoint,
            attempt,
        );
        trace
            .run(self.deliver(&message, job, attempt))
            .instrument(span)
            .await
    }

    /// At shutdown: stored again to fire at once, not nak'd, so the
    /// delivery keeps its attempt number ([`attempt_number`]).
    async fn hand_back(&self, message: Message) {
        let Ok(job) = decode::<DeliveryJob>(&message.payload) else {
            let _ = message.ack_with(AckKind::Nak(None)).await;
            return;
        };
        let again = store_again(
            &job,
            herald_core::now_ms(),
            Again::HandBack {
                attempt: attempt_number(&message, &job),
                rate_slot_ms: job.rate_slot_ms,
            },
        );
        match self.broker.publish(again).await {
            Ok(_) => {
                let _ = message.ack().await;
            }
            Err(_) => {
                let _ = message.ack_with(AckKind::Nak(None)).await;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! What the phases' tests share: a delivery job and an endpoint.

    #![allow(clippy::unwrap_used)]

    use herald_core::{
        EndpointId, TaskId, UserId,
        payload::{DeliveryJob, EndpointConfig, VERSION},
        signing::SigningSecret,
    };

    /// Attempt 1 of a delivery of a small JSON body.
    pub(crate) fn job() -> DeliveryJob {
        DeliveryJob {
            v: VERSION,
            task: TaskId::new("task-1").unwrap(),
            user: UserId::new("acme").unwrap(),
            endpoint: EndpointId::new("orders").unwrap(),
            event_type: "echo.completed".to_string(),
            body: r#"{"type":"echo.completed","data":{"n":1}}"#.to_string(),
            accepted_at_ms: 1_000,
            attempt: 1,
            redelivery: None,
            rate_slot_ms: None,
            endpoint_missing_since_ms: None,
            record: None,
        }
    }

    /// An endpoint at `url` with one signing secret and nothing else set.
    pub(crate) fn endpoint(url: &str) -> EndpointConfig {
        serde_json::from_value(serde_json::json!({
            "v": VERSION,
            "user": "acme",
            "id": "orders",
            "url": url,
            "secrets": [SigningSecret::generate()],
        }))
        .unwrap()
    }
}
