//! The safety net under the retry schedule.
//!
//! Workers end a job themselves after its last scheduled attempt. A job can
//! still reach the consumer's `max_deliver` if its deliveries keep ending
//! without an ack (a worker crashing on it, acks lost while NATS restarts).
//! JetStream then stops delivering it, leaves it in the work-queue stream,
//! and publishes a MAX_DELIVERIES advisory. This turns each such job into an
//! `exhausted` attempt and a mail job, then deletes it: nothing is dropped
//! silently.
//!
//! Advisories are core NATS messages: one sent while no webhook worker is
//! subscribed is not seen, and its job stays in the stream for an operator
//! to find (`nats stream view HERALD_WEBHOOKS`).

use async_nats::jetstream::stream::DirectGetErrorKind;
use futures::StreamExt;
use herald_core::{
    names,
    payload::{
        AttemptOutcome, DeliveryAttempt, DeliveryJob, MailJob, MailReason, TaskEvent, VERSION,
        decode, encode,
    },
};
use herald_queue::{Broker, QueueError, endpoints::EndpointCache, publish::Outgoing};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::task_event;

/// The part of the advisory this needs.
#[derive(Debug, Deserialize)]
pub struct MaxDeliveriesAdvisory {
    pub stream_seq: u64,
    pub deliveries: u64,
}

pub fn advisory_subject() -> String {
    format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
        names::WEBHOOKS_STREAM,
        names::WEBHOOKS_CONSUMER
    )
}

/// Handles advisories until `shutdown`. Webhook workers share them through
/// a queue group, so each advisory is handled once.
pub async fn watch(broker: Broker, endpoints: EndpointCache, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let mut advisories = match broker
            .client
            .queue_subscribe(advisory_subject(), "herald-webhooks".into())
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to max-deliveries advisories");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = advisories.next() => message,
            };
            let Some(message) = message else { break };
            match serde_json::from_slice::<MaxDeliveriesAdvisory>(&message.payload) {
                Ok(advisory) => {
                    if let Err(e) = handle(&broker, &endpoints, &advisory).await {
                        tracing::error!(sequence = advisory.stream_seq, error = %e, "could not turn an abandoned job into a mail job");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable max-deliveries advisory"),
            }
        }
    }
}

/// Records the abandoned job as exhausted, queues the mail, deletes the job.
pub async fn handle(
    broker: &Broker,
    endpoints: &EndpointCache,
    advisory: &MaxDeliveriesAdvisory,
) -> Result<(), QueueError> {
    let stream = broker
        .jetstream
        .get_stream_no_info(names::WEBHOOKS_STREAM)
        .await
        .map_err(|e| QueueError::request("get stream", e))?;
    let stored = match stream.direct_get(advisory.stream_seq).await {
        Ok(m) => m,
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(()), // handled already
        Err(e) => return Err(QueueError::request("read abandoned job", e)),
    };
    let job: DeliveryJob = match decode(&stored.payload) {
        Ok(job) => job,
        Err(e) => {
            tracing::error!(sequence = advisory.stream_seq, error = %e, "deleting unreadable abandoned job");
            let _ = stream.delete_message(advisory.stream_seq).await;
            return Ok(());
        }
    };
    let endpoint = endpoints.get(&job.user, &job.endpoint);
    let url = endpoint.as_ref().map(|e| e.url.clone()).unwrap_or_default();
    let email = endpoint.as_ref().and_then(|e| e.email.clone());
    let error = format!(
        "gave up after {} deliveries without an outcome (max_deliver)",
        advisory.deliveries
    );
    // Each delivery of the message was one more HTTP attempt after the
    // attempt the job carried.
    let deliveries = u32::try_from(advisory.deliveries).unwrap_or(u32::MAX);
    let attempts = job.attempt.saturating_add(deliveries.saturating_sub(1));
    let mut outgoing = vec![task_event(
        &job.user,
        &job.task,
        TaskEvent::Delivery(DeliveryAttempt {
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
        }),
    )];
    if let Some(to) = email {
        let mail = MailJob {
            v: VERSION,
            task: job.task.clone(),
            user: job.user.clone(),
            endpoint: job.endpoint.clone(),
            url,
            to,
            reason: MailReason::AttemptsExhausted,
            attempts,
            last_error: error,
            failed_at_ms: herald_core::now_ms(),
            redelivery: job.redelivery.clone(),
        };
        outgoing.push(Outgoing::new(
            names::mail_subject(&job.user),
            names::mail_msg_id(&job.task, &job.endpoint, job.redelivery.as_deref()),
            encode(&mail),
        ));
    }
    broker.publish_all(outgoing).await?;
    stream
        .delete_message(advisory.stream_seq)
        .await
        .map_err(|e| QueueError::request("delete abandoned job", e))?;
    tracing::warn!(task = %job.task, endpoint = %job.endpoint, "job reached max_deliver; recorded and mailed");
    Ok(())
}
