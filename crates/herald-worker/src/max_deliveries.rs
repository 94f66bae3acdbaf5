//! The safety net under the retry schedules: jobs that reached
//! `max_deliver`.
//!
//! Workers end a job themselves after its last scheduled attempt. A job can
//! still reach its consumer's `max_deliver` if its deliveries keep ending
//! without an ack (a worker crashing on it, acks lost while NATS restarts).
//! JetStream then stops delivering it, leaves it in the work-queue stream,
//! and publishes a MAX_DELIVERIES advisory, a core NATS message.
//!
//! Core NATS is heard only by whoever subscribes at that moment, so the
//! advisories are not subscribed to: the `HERALD_ADVISORIES` stream captures
//! them (its subjects are the three advisory subjects, created with the
//! other streams before any consumer exists), and each worker kind reads
//! its own stream's advisories through a durable consumer with explicit
//! ack. An advisory published while no worker runs waits there; an
//! advisory is acked only after the job it names has ended recorded and
//! has been deleted. How each job ends:
//!
//! | stream           | recorded as                                    | owner told            |
//! |------------------|------------------------------------------------|-----------------------|
//! | `HERALD_TASKS`   | task `failed` ("gave up after N deliveries")   | `<type>.failed` webhook, as any failed task |
//! | `HERALD_TASKS` (replay request) | an `abandoned` attempt 0 in its round, per endpoint | (the history; the delivery can be recovered) |
//! | `HERALD_WEBHOOKS`| attempt `exhausted` (`abandoned` without email) | failure mail          |
//! | `HERALD_MAIL`    | mail outcome `sent: false`                     | (the mail was the telling) |

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use herald_core::{
    names,
    payload::{
        AttemptOutcome, DeliveryAttempt, DeliveryJob, EndpointConfig, MailJob, MailOutcome,
        MailReason, ReplayRequest, TaskEvent, TaskMessage, decode,
    },
    redact::RedactedUrl,
};
use herald_queue::{
    Broker, QueueError,
    consume::{ConsumerSettings, MessageHandler},
    endpoints::EndpointCache,
    publish::Outgoing,
};
use serde::Deserialize;

use crate::{handlers::HandlerRegistry, tasks::TaskWorker};

/// The part of the advisory this needs.
#[derive(Debug, Deserialize)]
struct MaxDeliveriesAdvisory {
    stream: String,
    stream_seq: u64,
    deliveries: u64,
}

/// How long an advisory that could not be handled (NATS refusing a write,
/// an endpoint this process cannot read yet) waits before it is tried again.
const RETRY_DELAY: Duration = Duration::from_secs(5);

/// Which work-queue stream's abandoned jobs a [`MaxDeliveries`] ends, with
/// what it needs to record them.
pub enum Abandoned {
    /// Reuses the task worker's outputs, so an abandoned task is reported
    /// exactly like a task whose handler failed.
    Tasks(Box<TaskWorker>),
    Webhooks(EndpointCache),
    Mail,
}

impl Abandoned {
    pub fn tasks(broker: Broker, endpoints: EndpointCache, ack_wait: Duration) -> Self {
        Self::Tasks(Box::new(TaskWorker::new(
            broker,
            endpoints,
            HandlerRegistry::new(),
            ack_wait,
        )))
    }

    fn stream(&self) -> &'static str {
        match self {
            Abandoned::Tasks(_) => names::TASKS_STREAM,
            Abandoned::Webhooks(_) => names::WEBHOOKS_STREAM,
            Abandoned::Mail => names::MAIL_STREAM,
        }
    }

    fn consumer(&self) -> &'static str {
        match self {
            Abandoned::Tasks(_) => names::TASKS_MAX_DELIVERIES_CONSUMER,
            Abandoned::Webhooks(_) => names::WEBHOOKS_MAX_DELIVERIES_CONSUMER,
            Abandoned::Mail => names::MAIL_MAX_DELIVERIES_CONSUMER,
        }
    }
}

/// Reads one stream's advisories from `HERALD_ADVISORIES`; run it with
/// [`herald_queue::consume::run`] and [`MaxDeliveries::settings`].
pub struct MaxDeliveries {
    broker: Broker,
    abandoned: Abandoned,
}

/// Why an advisory is handed back to be tried again later.
#[derive(Debug, thiserror::Error)]
enum NotYet {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("an endpoint of the user is unreadable: {0}")]
    UnreadableEndpoint(String),
}

impl MaxDeliveries {
    pub fn new(broker: Broker, abandoned: Abandoned) -> Self {
        Self { broker, abandoned }
    }

    /// Advisories are rare: a few at a time is plenty.
    pub fn settings(&self, grace: Duration, manage_topology: bool) -> ConsumerSettings {
        ConsumerSettings {
            stream: names::ADVISORIES_STREAM,
            consumer: self.abandoned.consumer(),
            concurrency: 4,
            grace,
            manage_topology,
        }
    }

    /// Records the abandoned job's end, then deletes it. `Ok` also when the
    /// job is gone already (an earlier try deleted it).
    async fn end(&self, advisory: &MaxDeliveriesAdvisory) -> Result<(), NotYet> {
        let stream = self.abandoned.stream();
        let Some(stored) = self
            .broker
            .stored_message(stream, advisory.stream_seq)
            .await?
        else {
            return Ok(());
        };
        let error = format!(
            "gave up after {} deliveries without an outcome (max_deliver)",
            advisory.deliveries
        );
        match self
            .outgoing(&stored.subject, &stored.payload, advisory, error)
            .await?
        {
            Some(outgoing) => {
                self.broker.publish_all(outgoing).await?;
            }
            None => {
                tracing::error!(
                    stream = self.abandoned.stream(),
                    sequence = advisory.stream_seq,
                    "deleting an unreadable abandoned job"
                );
            }
        }
        self.broker
            .delete_stored(stream, advisory.stream_seq)
            .await?;
        Ok(())
    }

    /// What records the end of the job in `payload`; `None` when it does
    /// not parse (it never will: deleted without a record).
    async fn outgoing(
        &self,
        subject: &str,
        payload: &[u8],
        advisory: &MaxDeliveriesAdvisory,
        error: String,
    ) -> Result<Option<Vec<Outgoing>>, NotYet> {
        // The record of an abandoned job has one id per stream message, so
        // a second try after a failed delete records nothing twice.
        let record_id = names::abandoned_record_msg_id(&advisory.stream, advisory.stream_seq);
        let deliveries = u32::try_from(advisory.deliveries).unwrap_or(u32::MAX);
        Ok(match &self.abandoned {
            Abandoned::Tasks(worker) if names::is_replay_subject(subject) => {
                let Ok(request) = decode::<ReplayRequest>(payload) else {
                    return Ok(None);
                };
                let endpoints = worker.endpoints().user(&request.user).await?;
                Some(crate::replays::refusals(
                    &endpoints,
                    &request,
                    &request.endpoints,
                    &error,
                ))
            }
            Abandoned::Tasks(worker) => {
                let Ok(task) = decode::<TaskMessage>(payload) else {
                    return Ok(None);
                };
                let endpoints = worker.endpoints().user(&task.user).await?;
                if let Some((key, why)) = endpoints.unreadable_without_earlier_version() {
                    // Fanning the failure out now would skip that endpoint.
                    return Err(NotYet::UnreadableEndpoint(format!("{key}: {why}")));
                }
                tracing::warn!(task = %task.id, deliveries, "task reached max_deliver; recording it as failed");
                Some(worker.outputs(&task, &endpoints, Err(error)).messages)
            }
            Abandoned::Webhooks(endpoints) => {
                let Ok(job) = decode::<DeliveryJob>(payload) else {
                    return Ok(None);
                };
                tracing::warn!(task = %job.task, endpoint = %job.endpoint, deliveries, "delivery reached max_deliver; recording it and mailing the owner");
                let endpoint = endpoints.get(&job.user, &job.endpoint).await?;
                Some(abandoned_delivery(
                    endpoint.as_deref(),
                    &job,
                    deliveries,
                    error,
                    record_id,
                ))
            }
            Abandoned::Mail => {
                let Ok(job) = decode::<MailJob>(payload) else {
                    return Ok(None);
                };
                tracing::error!(task = %job.task, deliveries, "mail job reached max_deliver; recording it as failed");
                let event = TaskEvent::Mail(MailOutcome {
                    endpoint: job.endpoint.clone(),
                    reason: Some(job.reason),
                    to: job.to.clone(),
                    attempt: deliveries,
                    at_ms: herald_core::now_ms(),
                    sent: false,
                    error: Some(error),
                    redelivery: job.redelivery.clone(),
                });
                Some(vec![Outgoing::task_event_once(
                    &job.user, &job.task, event, record_id,
                )])
            }
        })
    }
}

/// An `exhausted` attempt and the failure mail (or `abandoned` when the
/// endpoint has no email), as the webhook worker's last attempt would.
fn abandoned_delivery(
    endpoint: Option<&EndpointConfig>,
    job: &DeliveryJob,
    deliveries: u32,
    error: String,
    record_id: String,
) -> Vec<Outgoing> {
    let url = endpoint
        .map(|e| RedactedUrl::from_text(&e.url).to_string())
        .unwrap_or_default();
    let email = endpoint.and_then(|e| e.email.clone());
    // Each delivery of the message that ended without an outcome may have
    // reached the endpoint: one more attempt after the one the job carried.
    let attempts = job.attempt.saturating_add(deliveries.saturating_sub(1));
    let attempt = TaskEvent::Delivery(DeliveryAttempt {
        endpoint: job.endpoint.clone(),
        url: url.clone(),
        attempt: attempts,
        at_ms: herald_core::now_ms(),
        outcome: if email.is_some() {
            AttemptOutcome::Exhausted
        } else {
            AttemptOutcome::Abandoned
        },
        status: None,
        latency_ms: 0,
        error: Some(error.clone()),
        response_body: None,
        next_attempt_in_ms: None,
        redelivery: job.redelivery.clone(),
    });
    let mut outgoing = vec![Outgoing::task_event_once(
        &job.user, &job.task, attempt, record_id,
    )];
    if let Some(to) = email {
        let mail = MailJob::ending_delivery(
            job,
            MailReason::AttemptsExhausted,
            to,
            url,
            attempts,
            error,
            herald_core::now_ms(),
        );
        outgoing.push(Outgoing::mail(&mail, mail.ending_delivery_msg_id()));
    }
    outgoing
}

#[async_trait::async_trait]
impl MessageHandler for MaxDeliveries {
    async fn handle(&self, message: Message) {
        let advisory = match serde_json::from_slice::<MaxDeliveriesAdvisory>(&message.payload) {
            Ok(a) if a.stream == self.abandoned.stream() => a,
            Ok(a) => {
                tracing::error!(stream = %a.stream, consumer = self.abandoned.consumer(), "advisory for another stream; dropping it");
                // Term: the consumer's filter should make this impossible.
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
            Err(e) => {
                tracing::error!(subject = %message.subject, error = %e, "unreadable max-deliveries advisory; dropping it");
                // Term: it will never parse.
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        match self.end(&advisory).await {
            Ok(()) => {
                // Plain ack: a lost ack redelivers the advisory, and a second
                // try finds the job deleted.
                let _ = message.ack().await;
            }
            Err(e) => {
                tracing::warn!(stream = %advisory.stream, sequence = advisory.stream_seq, error = %e, "could not end an abandoned job yet; retrying");
                // Nak with a delay: the advisory stays until the job has ended.
                let _ = message.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
            }
        }
    }
}
