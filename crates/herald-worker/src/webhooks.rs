//! The webhook worker: signs and POSTs each delivery job, records the
//! attempt, and decides what happens to the job.
//!
//! | response                       | job                                   | attempt outcome |
//! |--------------------------------|---------------------------------------|-----------------|
//! | 2xx                            | ack                                   | `delivered`     |
//! | 410 Gone                       | mail job, then term                   | `gone`          |
//! | anything else, attempts left   | nak with the schedule's delay         | `retrying`      |
//! | anything else, none left       | mail job, then term                   | `exhausted`     |
//!
//! "Anything else" is 1xx/3xx (redirects are never followed), 4xx, 5xx, a
//! timeout or a connection error. For 429 and 503, a `Retry-After` longer
//! than the scheduled delay is honoured up to `max_retry_after`. The attempt
//! number is JetStream's delivery count of the job. A URL the SSRF guard
//! refuses ([`crate::ssrf`]) is a failed attempt like a connection error:
//! DNS answers change, so it follows the same schedule.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{AckKind, Message};
use herald_core::{
    metrics::Metrics,
    names,
    payload::{
        AttemptOutcome, DeliveryAttempt, DeliveryJob, EndpointConfig, MailJob, MailReason,
        RESPONSE_BODY_LIMIT, TaskEvent, VERSION, decode, encode,
    },
    schedule::RetrySchedule,
    signing::signature_header,
};
use herald_queue::{
    Broker,
    consume::{MessageHandler, delivery_count, with_progress},
    endpoints::EndpointCache,
    health::HealthTracker,
    publish::Outgoing,
};
use reqwest::{StatusCode, header};
use serde::{Deserialize, Serialize};

use crate::{
    ssrf::{GuardedClient, Resolver, SendError, SsrfConfig, SsrfGuard, SystemResolver},
    task_event,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookWorkerConfig {
    /// Webhook requests in flight at once in one process.
    pub concurrency: usize,
    /// Request timeout for endpoints that do not set `timeoutSeconds`.
    #[serde(with = "crate::duration_serde")]
    pub timeout: Duration,
    /// Delays between attempts for endpoints without a schedule of their own.
    pub retry_schedule: RetrySchedule,
    /// Longest `Retry-After` honoured; longer values are cut to this.
    #[serde(with = "crate::duration_serde")]
    pub max_retry_after: Duration,
    /// Delay before looking again at a job for a paused endpoint.
    #[serde(with = "crate::duration_serde")]
    pub paused_recheck: Duration,
    /// How often endpoint health is written to `herald-endpoint-health`.
    #[serde(with = "crate::duration_serde")]
    pub health_flush_interval: Duration,
    /// Which non-global addresses webhooks may reach anyway.
    pub ssrf: SsrfConfig,
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
            ssrf: SsrfConfig::default(),
        }
    }
}

/// The connection-pooled client every delivery shares, behind the SSRF
/// guard, resolving names with the system resolver.
pub fn http_client(ssrf: &SsrfConfig) -> GuardedClient {
    http_client_with(ssrf, Arc::new(SystemResolver))
}

/// [`http_client`] with the name resolution the guard checks given (tests
/// choose the DNS answers). Redirects are never followed: a 3xx is a failed
/// attempt, and a `Location` is never reached unchecked. No proxy either:
/// the guard must see the endpoint's own address.
pub fn http_client_with(ssrf: &SsrfConfig, resolver: Arc<dyn Resolver>) -> GuardedClient {
    // reqwest is built without a bundled crypto provider; use ring, as the
    // NATS client does. Installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("Herald/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .no_proxy();
    GuardedClient::new(builder, SsrfGuard::new(ssrf), resolver)
        .expect("the HTTP client configuration is static and valid")
}

pub struct WebhookWorker {
    broker: Broker,
    endpoints: EndpointCache,
    health: HealthTracker,
    client: GuardedClient,
    config: WebhookWorkerConfig,
    progress_interval: Duration,
}

/// What one HTTP attempt produced.
#[derive(Debug)]
struct Response {
    status: Option<StatusCode>,
    retry_after: Option<Duration>,
    body: Option<String>,
    error: Option<String>,
    latency: Duration,
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
            broker,
            endpoints,
            health,
            client: http_client(&config.ssrf),
            config,
            progress_interval: ack_wait / 3,
        }
    }

    async fn post(&self, endpoint: &EndpointConfig, job: &DeliveryJob) -> Response {
        let webhook_id = names::delivery_msg_id(&job.task, &job.endpoint);
        let timestamp = herald_core::now_ms() / 1000;
        let signature = signature_header(
            &endpoint.secrets,
            &webhook_id,
            timestamp,
            job.body.as_bytes(),
        );
        let timeout = endpoint
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(self.config.timeout);
        let mut request = self
            .client
            .post(&endpoint.url)
            .timeout(timeout)
            .header(header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &webhook_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature);
        for (name, value) in &endpoint.headers {
            request = request.header(name, value);
        }
        let started = tokio::time::Instant::now();
        match self.client.send(request.body(job.body.clone())).await {
            Ok(mut response) => {
                let status = response.status();
                let retry_after = retry_after(response.headers());
                let mut body = Vec::new();
                while body.len() < RESPONSE_BODY_LIMIT {
                    match response.chunk().await {
                        Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                body.truncate(RESPONSE_BODY_LIMIT);
                Response {
                    status: Some(status),
                    retry_after,
                    body: (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned()),
                    error: (!status.is_success()).then(|| format!("HTTP {}", status.as_u16())),
                    latency: started.elapsed(),
                }
            }
            Err(e) => Response {
                status: None,
                retry_after: None,
                body: None,
                error: Some(match e {
                    SendError::Refused(refused) => refused.to_string(),
                    SendError::Http(e) => describe_request_error(&e),
                }),
                latency: started.elapsed(),
            },
        }
    }

    /// The delay before the next attempt, or `None` when none is left.
    fn next_delay(
        &self,
        endpoint: &EndpointConfig,
        attempt: u32,
        response: &Response,
    ) -> Option<Duration> {
        let schedule = endpoint
            .retry_schedule
            .as_ref()
            .unwrap_or(&self.config.retry_schedule);
        let scheduled = schedule.delay_after(attempt)?;
        let honour_retry_after = matches!(
            response.status,
            Some(StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
        );
        Some(match response.retry_after {
            Some(asked) if honour_retry_after => {
                scheduled.max(asked.min(self.config.max_retry_after))
            }
            _ => scheduled,
        })
    }

    async fn deliver(&self, message: &Message, job: DeliveryJob) {
        let attempt = delivery_count(message);
        let Some(endpoint) = self.endpoints.get(&job.user, &job.endpoint) else {
            tracing::info!(task = %job.task, endpoint = %job.endpoint, "endpoint removed; dropping its delivery");
            let event = self.attempt_event(
                &job,
                "",
                attempt,
                AttemptOutcome::EndpointRemoved,
                None,
                None,
            );
            self.finish(message, &job, vec![event], AckKind::Ack).await;
            return;
        };
        if endpoint.paused {
            // Nak with delay: a paused endpoint keeps its deliveries.
            let _ = message
                .ack_with(AckKind::Nak(Some(self.config.paused_recheck)))
                .await;
            return;
        }

        let response =
            with_progress(message, self.progress_interval, self.post(&endpoint, &job)).await;
        let now = herald_core::now_ms();
        let delivered = response.status.is_some_and(|s| s.is_success());
        let gone = response.status == Some(StatusCode::GONE);
        if delivered {
            self.health.record_success(&job.user, &job.endpoint, now);
        } else {
            let error = response.error.as_deref().unwrap_or("failed");
            self.health
                .record_failure(&job.user, &job.endpoint, now, error);
        }

        let next_delay = (!delivered && !gone)
            .then(|| self.next_delay(&endpoint, attempt, &response))
            .flatten();
        let outcome = if delivered {
            AttemptOutcome::Delivered
        } else if next_delay.is_some() {
            AttemptOutcome::Retrying
        } else if endpoint.email.is_none() {
            tracing::warn!(endpoint = %job.endpoint, task = %job.task, "delivery failed for good and the endpoint has no email to notify");
            AttemptOutcome::Abandoned
        } else if gone {
            AttemptOutcome::Gone
        } else {
            AttemptOutcome::Exhausted
        };
        let mut outgoing = vec![self.attempt_event(
            &job,
            &endpoint.url,
            attempt,
            outcome,
            Some(&response),
            next_delay,
        )];
        if let Some(email) = &endpoint.email
            && matches!(outcome, AttemptOutcome::Exhausted | AttemptOutcome::Gone)
        {
            outgoing.push(mail_job(
                &job,
                &endpoint.url,
                email,
                outcome,
                attempt,
                &response,
            ));
        }

        let metrics = herald_core::metrics::metrics();
        Metrics::count(&metrics.webhook_attempts, outcome.as_str());
        metrics
            .webhook_duration
            .observe(response.latency.as_secs_f64());

        let ack = match outcome {
            // Ack: delivered.
            AttemptOutcome::Delivered => AckKind::Ack,
            // Nak with the schedule's delay: JetStream redelivers it then.
            AttemptOutcome::Retrying => AckKind::Nak(next_delay),
            // Term: no further attempt; the mail job (if any) is stored first.
            _ => AckKind::Term,
        };
        self.finish(message, &job, outgoing, ack).await;
    }

    fn attempt_event(
        &self,
        job: &DeliveryJob,
        url: &str,
        attempt: u32,
        outcome: AttemptOutcome,
        response: Option<&Response>,
        next_delay: Option<Duration>,
    ) -> Outgoing {
        task_event(
            &job.user,
            &job.task,
            TaskEvent::Delivery(DeliveryAttempt {
                endpoint: job.endpoint.clone(),
                url: url.to_string(),
                attempt,
                at_ms: herald_core::now_ms(),
                outcome,
                status: response.and_then(|r| r.status).map(|s| s.as_u16()),
                latency_ms: response.map(|r| r.latency.as_millis() as u64).unwrap_or(0),
                error: response.and_then(|r| r.error.clone()),
                response_body: response.and_then(|r| r.body.clone()),
                next_attempt_in_ms: next_delay.map(|d| d.as_millis() as u64),
            }),
        )
    }

    /// Stores the attempt (and mail job), then acks as decided. If storing
    /// fails, the job is retried shortly instead, so no outcome is lost.
    async fn finish(
        &self,
        message: &Message,
        job: &DeliveryJob,
        outgoing: Vec<Outgoing>,
        ack: AckKind,
    ) {
        match self.broker.publish_all(outgoing).await {
            Ok(_) => {
                if let Err(e) = message.ack_with(ack).await {
                    tracing::warn!(task = %job.task, error = %e, "ack failed; the job will be redelivered");
                }
            }
            Err(e) => {
                tracing::warn!(task = %job.task, error = %e, "could not record the attempt; retrying the job");
                // Nak with a short delay: NATS is struggling, so do not spin.
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }
}

fn mail_job(
    job: &DeliveryJob,
    url: &str,
    email: &str,
    outcome: AttemptOutcome,
    attempts: u32,
    response: &Response,
) -> Outgoing {
    let mail = MailJob {
        v: VERSION,
        task: job.task.clone(),
        user: job.user.clone(),
        endpoint: job.endpoint.clone(),
        url: url.to_string(),
        to: email.to_string(),
        reason: if outcome == AttemptOutcome::Gone {
            MailReason::EndpointGone
        } else {
            MailReason::AttemptsExhausted
        },
        attempts,
        last_error: response.error.clone().unwrap_or_default(),
        failed_at_ms: herald_core::now_ms(),
    };
    Outgoing::new(
        names::mail_subject(&job.user),
        names::mail_msg_id(&job.task, &job.endpoint),
        encode(&mail),
    )
}

/// `Retry-After` as delay-seconds (HTTP dates are rare for webhooks and
/// are treated as absent).
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn describe_request_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        format!("connection failed: {}", root_cause(e))
    } else {
        format!("request failed: {}", root_cause(e))
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[async_trait::async_trait]
impl MessageHandler for WebhookWorker {
    async fn handle(&self, message: Message) {
        match decode::<DeliveryJob>(&message.payload) {
            Ok(job) => self.deliver(&message, job).await,
            Err(e) => {
                tracing::error!(subject = %message.subject, error = %e, "terminating unreadable delivery job");
                // Term: it will never parse; retrying is pointless.
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
    }
}

/// Builds the worker and its companions, which run until `shutdown`: the
/// health tracker's flusher and the max-deliveries safety net.
pub fn start(
    broker: Broker,
    endpoints: EndpointCache,
    config: WebhookWorkerConfig,
    ack_wait: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> Arc<WebhookWorker> {
    let health = HealthTracker::start(
        broker.clone(),
        config.health_flush_interval,
        shutdown.clone(),
    );
    tokio::spawn(crate::max_deliveries::watch(
        broker.clone(),
        endpoints.clone(),
        shutdown,
    ));
    Arc::new(WebhookWorker::new(
        broker, endpoints, health, config, ack_wait,
    ))
}
