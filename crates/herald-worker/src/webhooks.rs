//! The webhook worker: signs and POSTs each delivery job, records the
//! attempt, and decides what happens to the job.
//!
//! What a response leads to is one table, [`ResponseClass::of`]:
//!
//! | response                                   | class                       |
//! |--------------------------------------------|-----------------------------|
//! | 2xx                                        | delivered                   |
//! | 410 Gone                                   | gone: disable the endpoint  |
//! | 429, 503                                   | retry, honour `Retry-After` |
//! | 1xx, 3xx (redirects are never followed)    | retry                       |
//! | other 4xx (400, 401, 403, 404, 408, 413…)  | retry                       |
//! | other 5xx (500, 502, 504…)                 | retry                       |
//! | timeout, connection error, SSRF refusal    | retry                       |
//!
//! and a class leads to:
//!
//! | class                   | job                                 | attempt outcome |
//! |-------------------------|-------------------------------------|-----------------|
//! | delivered               | ack                                 | `delivered`     |
//! | gone                    | mail job, then term                 | `gone`          |
//! | retry, attempts left    | next attempt scheduled, then ack    | `retrying`      |
//! | retry, none left        | mail job, then term                 | `exhausted`     |
//!
//! Other 4xx are retried like 5xx: receivers answer 401/404 while they are
//! being deployed or misconfigured, and the schedule gives them days to
//! recover; only 410 says "never again". A `Retry-After` (seconds or an HTTP
//! date) on 429/503 that is longer than the scheduled delay is honoured up
//! to `max_retry_after`; a shorter one never shortens the schedule.
//!
//! The next attempt is not a nak with delay: it is published as a JetStream
//! message schedule on `herald.retries.<user>.<endpoint>.<task>` that fires
//! onto the webhook subject when due, and the current message is acked. A
//! dead endpoint's backlog is then stored messages, not pending ones, and
//! cannot fill the consumer's `max_ack_pending` window that every other
//! endpoint shares. The attempt number travels in the job.
//!
//! A URL the SSRF guard refuses ([`crate::ssrf`]) is a failed attempt like
//! a connection error: DNS answers change, so it follows the same schedule.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{AckKind, Message};
use herald_core::{
    metrics::Metrics,
    names,
    payload::{
        AttemptOutcome, DeliveryAttempt, DeliveryJob, EndpointConfig, MailJob, MailReason,
        RESPONSE_BODY_LIMIT, TaskEvent, VERSION, decode, encode,
    },
    redact::RedactedUrl,
    schedule::RetrySchedule,
    signing::signature_header,
};
use herald_queue::{
    Broker,
    consume::{MessageHandler, delivery_count, with_progress},
    endpoints::EndpointCache,
    health::{Failure, HealthTracker},
    publish::Outgoing,
    rate_limit::RateLimiter,
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
    /// How long an endpoint may fail without a single success before it is
    /// disabled and its owner mailed (410 Gone disables at once).
    #[serde(with = "crate::duration_serde")]
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
    #[serde(with = "crate::duration_serde")]
    pub endpoint_removed_grace: Duration,
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

/// A rate-limit slot this close is waited for in the worker; a later one
/// defers the delivery to it as a message schedule.
const RATE_LIMIT_WAIT_IN_WORKER: Duration = Duration::from_millis(250);

/// How long a delivery waits for its endpoint's in-flight share before it
/// is deferred.
const IN_FLIGHT_WAIT: Duration = Duration::from_millis(250);

/// How late a deferred delivery may reach a worker and still use its
/// rate-limit slot. Schedules fire up to ~100 ms late under load; a delivery
/// later than this reserves again, so late arrivals can bunch into at most
/// this much of the limit.
const RATE_SLOT_TOLERANCE: Duration = Duration::from_secs(1);

pub struct WebhookWorker {
    broker: Broker,
    endpoints: EndpointCache,
    health: HealthTracker,
    rate_limiter: RateLimiter,
    in_flight: InFlight,
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
            rate_limiter: RateLimiter::new(broker.clone()),
            in_flight: InFlight::default(),
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
            endpoint.signing_secrets(timestamp * 1000),
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
                let keep = self.response_body_bytes(response.remote_addr());
                let mut body = Vec::new();
                while body.len() < keep {
                    match response.chunk().await {
                        Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                body.truncate(keep);
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
                    SendError::Refused(refused) => {
                        refused.describe(self.config.ssrf.reveal_refused_address)
                    }
                    // Without the URL: its query or path may hold a secret.
                    SendError::Http(e) => describe_request_error(&e.without_url()),
                }),
                latency: started.elapsed(),
            },
        }
    }

    /// How much of the body of a response from `peer` the attempt keeps:
    /// an address only the allow-list opens is an internal service, whose
    /// answer is kept only as far as `ssrf.allowed_response_body_bytes`
    /// says (an unknown peer counts as one).
    fn response_body_bytes(&self, peer: Option<std::net::SocketAddr>) -> usize {
        let limit = if peer.is_some_and(|p| SsrfGuard::is_global(p.ip())) {
            self.config.response_body_bytes
        } else {
            self.config.ssrf.allowed_response_body_bytes
        };
        limit.min(RESPONSE_BODY_LIMIT)
    }

    /// The delay before the next attempt, or `None` when none is left.
    fn next_delay(
        &self,
        endpoint: &EndpointConfig,
        attempt: u32,
        response: &Response,
        honour_retry_after: bool,
    ) -> Option<Duration> {
        let schedule = endpoint
            .retry_schedule
            .as_ref()
            .unwrap_or(&self.config.retry_schedule);
        let scheduled = schedule.delay_after(attempt)?;
        Some(match response.retry_after {
            Some(asked) if honour_retry_after => {
                scheduled.max(asked.min(self.config.max_retry_after))
            }
            _ => scheduled,
        })
    }

    async fn deliver(&self, message: &Message, mut job: DeliveryJob) {
        let attempt = attempt_number(message, &job);
        let Some(endpoint) = self.endpoints.get(&job.user, &job.endpoint) else {
            let key = names::endpoint_key(&job.user, &job.endpoint);
            if let Some(why) = self.endpoints.unreadable().get(&key) {
                // The record exists but this process cannot open it (a
                // keyring missing its key): keep the delivery, not an
                // attempt, until a fixed keyring reads it.
                tracing::error!(task = %job.task, endpoint = %job.endpoint, reason = %why, "endpoint record unreadable; keeping its delivery");
                let later = herald_core::now_ms() + self.config.paused_recheck.as_millis() as u64;
                let deferred = reschedule(&job, job.attempt, later, None);
                self.finish(message, &job, vec![deferred], AckKind::Ack)
                    .await;
                return;
            }
            // Gone from the bucket: held for the grace period first, since
            // a record can vanish and come back (an operator rewriting it,
            // a grant withdrawn by mistake); only then dropped.
            let now = herald_core::now_ms();
            let missing_since = job.endpoint_missing_since_ms.unwrap_or(now);
            let grace_ends = missing_since + self.config.endpoint_removed_grace.as_millis() as u64;
            if now < grace_ends {
                tracing::info!(task = %job.task, endpoint = %job.endpoint, "endpoint record missing; holding its delivery");
                let look_again =
                    (now + self.config.paused_recheck.as_millis() as u64).min(grace_ends);
                let holding = DeliveryJob {
                    endpoint_missing_since_ms: Some(missing_since),
                    ..job.clone()
                };
                let held = reschedule(&holding, job.attempt, look_again, None);
                self.finish(message, &job, vec![held], AckKind::Ack).await;
                return;
            }
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
        // Found (again): a later disappearance starts its own grace.
        job.endpoint_missing_since_ms = None;
        // Held only when the bucket agrees: an enable whose change has not
        // reached this worker's watch yet must not hold a delivery after the
        // enable's recover has looked for held ones.
        let disabled = self.health.is_disabled(&job.user, &job.endpoint)
            && self
                .health
                .confirm_disabled(&self.broker, &job.user, &job.endpoint)
                .await;
        if disabled {
            // Kept in the task's history, not sent: the recover call (or
            // enabling the endpoint) re-sends it.
            let event = self.attempt_event(
                &job,
                &endpoint.url,
                attempt,
                AttemptOutcome::Held,
                None,
                None,
            );
            self.finish(message, &job, vec![event], AckKind::Ack).await;
            return;
        }
        if endpoint.paused {
            // Stored as a schedule, not pending: a paused endpoint's backlog
            // costs the other endpoints nothing. Not an attempt.
            let later = herald_core::now_ms() + self.config.paused_recheck.as_millis() as u64;
            let deferred = defer(&job, attempt, later, None);
            self.finish(message, &job, vec![deferred], AckKind::Ack)
                .await;
            return;
        }
        let key = names::endpoint_key(&job.user, &job.endpoint);
        // The rate limit first: waiting for a slot (deferred, or up to
        // RATE_LIMIT_WAIT_IN_WORKER here) is not a request in flight, and
        // must not push the endpoint's own deliveries over its share.
        let rate_slot = if let Some(per_second) = endpoint.rate_limit_per_second {
            // A slot the job was deferred to is used as is, unless the
            // schedule fired it more than RATE_SLOT_TOLERANCE late: sending
            // then would burst with the slots after it, so it takes a new one.
            let carried = job.rate_slot_ms.filter(|slot| {
                herald_core::now_ms() <= slot + RATE_SLOT_TOLERANCE.as_millis() as u64
            });
            let slot = match carried {
                Some(slot) => slot,
                None => {
                    match self.rate_limiter.reserve(&key, per_second).await {
                        Ok(slot) => slot,
                        Err(e) => {
                            tracing::warn!(endpoint = %job.endpoint, error = %e, "no rate-limit slot; retrying the job shortly");
                            // Stored again a second later, not nak'd: a
                            // redelivery would count an attempt never sent.
                            let later = herald_core::now_ms() + 1000;
                            let deferred = defer(&job, attempt, later, None);
                            self.finish(message, &job, vec![deferred], AckKind::Ack)
                                .await;
                            return;
                        }
                    }
                }
            };
            if slot.saturating_sub(herald_core::now_ms())
                > RATE_LIMIT_WAIT_IN_WORKER.as_millis() as u64
            {
                // Stored until its slot, holding no worker meanwhile.
                let deferred = defer(&job, attempt, slot, Some(slot));
                self.finish(message, &job, vec![deferred], AckKind::Ack)
                    .await;
                return;
            }
            Some(slot)
        } else {
            None
        };

        if let Some(slot) = rate_slot {
            tokio::time::sleep(Duration::from_millis(
                slot.saturating_sub(herald_core::now_ms()),
            ))
            .await;
        }

        let Some(_in_flight) = self
            .in_flight
            .enter(&key, self.config.max_in_flight_per_endpoint)
            .await
        else {
            // This endpoint already holds its share of the workers: come
            // back after about one request timeout, spread out, without
            // counting an attempt (and without the rate-limit slot, which
            // goes unused).
            let timeout = endpoint
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(self.config.timeout);
            let spread = rand::random_range(1.0..2.0);
            let later = herald_core::now_ms() + timeout.mul_f64(spread).as_millis() as u64;
            let deferred = defer(&job, attempt, later, None);
            self.finish(message, &job, vec![deferred], AckKind::Ack)
                .await;
            return;
        };
        let response =
            with_progress(message, self.progress_interval, self.post(&endpoint, &job)).await;
        let now = herald_core::now_ms();
        let class = ResponseClass::of(&response);

        let next_delay = match class {
            ResponseClass::Retry { honour_retry_after } => {
                self.next_delay(&endpoint, attempt, &response, honour_retry_after)
            }
            ResponseClass::Delivered | ResponseClass::Gone => None,
        };
        let outcome = match class {
            ResponseClass::Delivered => AttemptOutcome::Delivered,
            _ if next_delay.is_some() => AttemptOutcome::Retrying,
            _ if endpoint.email.is_none() => {
                tracing::warn!(endpoint = %job.endpoint, task = %job.task, "delivery failed for good and the endpoint has no email to notify");
                AttemptOutcome::Abandoned
            }
            ResponseClass::Gone => AttemptOutcome::Gone,
            ResponseClass::Retry { .. } => AttemptOutcome::Exhausted,
        };
        let mails_owner = endpoint.email.is_some()
            && matches!(outcome, AttemptOutcome::Exhausted | AttemptOutcome::Gone);
        if outcome == AttemptOutcome::Delivered {
            self.health
                .record_success(&job.user, &job.endpoint, &job.task, now);
        } else {
            self.health.record_failure(Failure {
                user: &job.user,
                endpoint: &job.endpoint,
                task: &job.task,
                at_ms: now,
                error: response.error.as_deref().unwrap_or("failed"),
                gone: class == ResponseClass::Gone,
                owner_notified: mails_owner,
            });
        }

        let mut outgoing = vec![self.attempt_event(
            &job,
            &endpoint.url,
            attempt,
            outcome,
            Some(&response),
            next_delay,
        )];
        if let Some(delay) = next_delay {
            outgoing.push(reschedule(
                &job,
                attempt + 1,
                now + delay.as_millis() as u64,
                None,
            ));
        }
        if let Some(email) = &endpoint.email
            && mails_owner
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
            // Ack: delivered, or the next attempt is stored as a schedule.
            AttemptOutcome::Delivered | AttemptOutcome::Retrying => AckKind::Ack,
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
                url: shown_url(url),
                attempt,
                at_ms: herald_core::now_ms(),
                outcome,
                status: response.and_then(|r| r.status).map(|s| s.as_u16()),
                latency_ms: response.map(|r| r.latency.as_millis() as u64).unwrap_or(0),
                error: response.and_then(|r| r.error.clone()),
                response_body: response.and_then(|r| r.body.clone()),
                next_attempt_in_ms: next_delay.map(|d| d.as_millis() as u64),
                redelivery: job.redelivery.clone(),
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

/// Requests in flight per endpoint in this process: a semaphore each, kept
/// for the life of the process (one per endpoint it has delivered to).
#[derive(Default)]
struct InFlight(std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>);

impl InFlight {
    /// A permit for one more request to `key`, waiting up to
    /// [`IN_FLIGHT_WAIT`] for one of its `limit` to free up; `None` when the
    /// endpoint keeps them all (it is slow or hanging). A fast endpoint
    /// frees permits within milliseconds, so bursts to it wait briefly
    /// instead of being deferred.
    async fn enter(&self, key: &str, limit: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let semaphore = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(limit)))
            .clone();
        tokio::time::timeout(IN_FLIGHT_WAIT, semaphore.acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

/// How a response is handled; the table in the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseClass {
    Delivered,
    Gone,
    Retry { honour_retry_after: bool },
}

impl ResponseClass {
    fn of(response: &Response) -> Self {
        Self::of_status(response.status)
    }

    /// `None`: no response at all (timeout, connection error, SSRF refusal).
    fn of_status(status: Option<StatusCode>) -> Self {
        match status {
            Some(s) if s.is_success() => ResponseClass::Delivered,
            Some(StatusCode::GONE) => ResponseClass::Gone,
            Some(StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) => {
                ResponseClass::Retry {
                    honour_retry_after: true,
                }
            }
            _ => ResponseClass::Retry {
                honour_retry_after: false,
            },
        }
    }
}

/// The number of the HTTP attempt this delivery would make. The job carries
/// the number of the next request; a path that sends nothing hands the job
/// back as a new message with the same number ([`defer`]), never with a
/// nak, whose redelivery would look like a request. So a message delivered
/// again means its previous delivery ended without an outcome (a worker
/// died or hung holding it) after it may have reached the endpoint: one
/// more attempt each. The one exception: when NATS refuses even the
/// hand-back, the nak that remains counts once too often, never too rarely.
fn attempt_number(message: &Message, job: &DeliveryJob) -> u32 {
    job.attempt
        .saturating_add(delivery_count(message).saturating_sub(1))
}

/// The job handed back without a request: stored as a message schedule
/// that fires at `at_ms` carrying the same attempt number `attempt` (and
/// the rate-limit slot it was deferred to, if that is why). Deferrals may
/// repeat; the time keeps each one's `Nats-Msg-Id` apart.
fn defer(job: &DeliveryJob, attempt: u32, at_ms: u64, rate_slot_ms: Option<u64>) -> Outgoing {
    let next = DeliveryJob {
        attempt,
        rate_slot_ms,
        ..job.clone()
    };
    let attempt_id =
        names::attempt_msg_id(&job.task, &job.endpoint, job.redelivery.as_deref(), attempt);
    Outgoing::scheduled(
        names::retry_subject(
            &job.user,
            &job.endpoint,
            &job.task,
            job.redelivery.as_deref(),
        ),
        names::webhook_subject(&job.user, &job.endpoint),
        at_ms,
        format!("{attempt_id}.{at_ms}"),
        encode(&next),
    )
}

/// The job again, as a message schedule that fires onto its webhook subject
/// at `at_ms` carrying attempt `attempt` (and the rate-limit slot it was
/// deferred to, if that is why).
fn reschedule(job: &DeliveryJob, attempt: u32, at_ms: u64, rate_slot_ms: Option<u64>) -> Outgoing {
    let next = DeliveryJob {
        attempt,
        rate_slot_ms,
        ..job.clone()
    };
    let attempt_id =
        names::attempt_msg_id(&job.task, &job.endpoint, job.redelivery.as_deref(), attempt);
    // The next attempt has one id, so a worker repeating its work after a
    // lost ack cannot schedule it twice. A deferral keeps the attempt number
    // and may happen many times; its time keeps each one's id apart.
    let msg_id = if attempt > job.attempt {
        attempt_id
    } else {
        format!("{attempt_id}.{at_ms}")
    };
    Outgoing::scheduled(
        names::retry_subject(
            &job.user,
            &job.endpoint,
            &job.task,
            job.redelivery.as_deref(),
        ),
        names::webhook_subject(&job.user, &job.endpoint),
        at_ms,
        msg_id,
        encode(&next),
    )
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
        url: shown_url(url),
        to: email.to_string(),
        reason: if outcome == AttemptOutcome::Gone {
            MailReason::EndpointGone
        } else {
            MailReason::AttemptsExhausted
        },
        attempts,
        last_error: response.error.clone().unwrap_or_default(),
        failed_at_ms: herald_core::now_ms(),
        redelivery: job.redelivery.clone(),
    };
    Outgoing::new(
        names::mail_subject(&job.user),
        names::mail_msg_id(&job.task, &job.endpoint, job.redelivery.as_deref()),
        encode(&mail),
    )
}

/// An endpoint URL as records and mails show it: redacted
/// ([`RedactedUrl`]), empty when there is none (endpoint removed).
fn shown_url(url: &str) -> String {
    if url.is_empty() {
        return String::new();
    }
    RedactedUrl::from_text(url).to_string()
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 10.2.3); a date
/// in the past means "now".
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
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

    /// At shutdown: stored again to fire at once, not nak'd, so the
    /// delivery keeps its attempt number ([`attempt_number`]).
    async fn hand_back(&self, message: Message) {
        let Ok(job) = decode::<DeliveryJob>(&message.payload) else {
            let _ = message.ack_with(AckKind::Nak(None)).await;
            return;
        };
        let again = defer(
            &job,
            attempt_number(&message, &job),
            herald_core::now_ms(),
            job.rate_slot_ms,
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

/// Builds the worker and its companion, which runs until `shutdown`: the
/// health tracker's flusher. (Jobs past max_deliver:
/// [`crate::max_deliveries`].)
pub fn start(
    broker: Broker,
    endpoints: EndpointCache,
    config: WebhookWorkerConfig,
    ack_wait: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> Arc<WebhookWorker> {
    let health = HealthTracker::start(
        broker.clone(),
        endpoints.clone(),
        config.health_flush_interval,
        config.disable_after,
        shutdown.clone(),
    );
    Arc::new(WebhookWorker::new(
        broker, endpoints, health, config, ack_wait,
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_status_has_its_row_in_the_table() {
        let retry = ResponseClass::Retry {
            honour_retry_after: false,
        };
        let throttled = ResponseClass::Retry {
            honour_retry_after: true,
        };
        let table = [
            (Some(200), ResponseClass::Delivered),
            (Some(202), ResponseClass::Delivered),
            (Some(204), ResponseClass::Delivered),
            (Some(299), ResponseClass::Delivered),
            (Some(101), retry),
            (Some(301), retry),
            (Some(307), retry),
            (Some(400), retry),
            (Some(401), retry),
            (Some(404), retry),
            (Some(408), retry),
            (Some(410), ResponseClass::Gone),
            (Some(413), retry),
            (Some(429), throttled),
            (Some(500), retry),
            (Some(502), retry),
            (Some(503), throttled),
            (Some(504), retry),
            (None, retry),
        ];
        for (status, class) in table {
            let status = status.map(|s| StatusCode::from_u16(s).unwrap());
            assert_eq!(ResponseClass::of_status(status), class, "{status:?}");
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let headers = |value: &str| {
            let mut map = header::HeaderMap::new();
            map.insert(header::RETRY_AFTER, value.parse().unwrap());
            map
        };
        assert_eq!(retry_after(&headers("120")), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(&headers(" 7 ")), Some(Duration::from_secs(7)));
        let in_a_minute = std::time::SystemTime::now() + Duration::from_secs(61);
        let from_date = retry_after(&headers(&httpdate::fmt_http_date(in_a_minute))).unwrap();
        assert!(
            (Duration::from_secs(59)..=Duration::from_secs(61)).contains(&from_date),
            "{from_date:?}"
        );
        assert_eq!(
            retry_after(&headers("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers("soon")), None);
        assert_eq!(retry_after(&headers("-5")), None);
        assert_eq!(retry_after(&header::HeaderMap::new()), None);
    }
}
