//! Replay requests: the task worker's side of redeliver, recover and enable.
//!
//! The API stores a [`ReplayRequest`] (user, task, endpoints, round, cause:
//! never a body) on `herald.replays.<user>.<task>.<round>`, and the task
//! worker, the role that already builds delivery jobs and alone writes
//! `herald-tasks`, carries it out: it reads the task's record, rebuilds the
//! webhook from it with the same function as the fan-out
//! ([`TaskRecord::webhook`]), stores one job per endpoint the record lists,
//! then the round's `redelivery` events, and only then acks. So a request
//! can at most have a user's own finished task re-sent to endpoints it was
//! sent to, with the bytes it was sent with.
//!
//! Every message id comes from the request (`<task>.<endpoint>.<round>.a1`
//! and `...queued`), so a request handled twice (a lost ack) queues nothing
//! twice. Jobs are stored before events, as the history must never show a
//! round that will not run.
//!
//! A request that cannot be carried out (the record expired or is
//! unreadable, the task is not the user's, an endpoint the task was never
//! sent to, a webhook too large for the server now) ends recorded: an
//! `abandoned` attempt numbered 0 (nothing was sent) in the round, with the
//! reason, in the requesting user's history of that task. A request that
//! does not parse is terminated and logged, as an unreadable task is.
//! An endpoint removed since the call is not refused here: its job is held
//! by the webhook worker like any delivery whose endpoint vanished, and
//! recorded `endpoint_removed` if the record does not come back.

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use herald_core::{
    EndpointId, names,
    payload::{
        AttemptOutcome, DeliveryAttempt, RedeliveryQueued, ReplayRequest, TaskEvent, TaskRecord,
        decode,
    },
    redact::RedactedUrl,
};
use herald_queue::{
    Broker, QueueError,
    endpoints::{EndpointCache, UserEndpoints},
    history::{self, Record},
    publish::Outgoing,
};

/// How long a request waits before another try when NATS refused a read
/// or a write.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// What carrying out a request stores: the jobs first, then the events.
struct Plan {
    jobs: Vec<Outgoing>,
    events: Vec<Outgoing>,
}

/// Carries out the replay request in `message` and acks it; see the module
/// documentation.
pub(crate) async fn handle(broker: &Broker, endpoints: &EndpointCache, message: Message) {
    let request: ReplayRequest = match decode(&message.payload) {
        Ok(request) => request,
        Err(e) => {
            tracing::error!(subject = %message.subject, error = %e, "terminating an unreadable replay request");
            // Term: it will never parse.
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    if !is_token(&request.redelivery)
        || names::replay_subject(&request.user, &request.task, &request.redelivery)
            != message.subject.as_str()
    {
        // Only a publisher other than the API writes these: a round id
        // that is no subject token cannot name a round's messages.
        tracing::error!(subject = %message.subject, "terminating a replay request whose round or subject is malformed");
        let _ = message.ack_with(AckKind::Term).await;
        return;
    }
    let user_endpoints = match endpoints.user(&request.user).await {
        Ok(found) => found,
        Err(e) => return retry(message, &request, &e).await,
    };
    let endpoints = &*user_endpoints;
    let plan = match history::task_record(broker, &request.task).await {
        Ok(record) => {
            if let Some(Record::Readable(task)) = &record
                && let Some(traceparent) = &task.traceparent
            {
                // The replay's own trace starts at the request that asked
                // for it; the link leads back to the task it repeats.
                herald_queue::trace_context::link_current_to(traceparent);
            }
            plan(endpoints, &request, record)
        }
        Err(e) => return retry(message, &request, &e).await,
    };
    let stored = match broker.publish_all(plan.jobs).await {
        Ok(_) => broker.publish_all(plan.events).await.map(|_| ()),
        Err(e) if e.is_too_large() => {
            let why = format!("the webhook is too large for the NATS server now: {e}");
            broker
                .publish_all(refusals(endpoints, &request, &request.endpoints, &why))
                .await
                .map(|_| ())
        }
        Err(e) => Err(e),
    };
    match stored {
        Ok(()) => {
            if let Err(e) = message.ack().await {
                tracing::warn!(task = %request.task, error = %e, "ack failed; the replay request will be handled again and deduplicated");
            }
        }
        Err(e) => retry(message, &request, &e).await,
    }
}

async fn retry(message: Message, request: &ReplayRequest, error: &QueueError) {
    tracing::warn!(task = %request.task, round = %request.redelivery, %error, "could not carry out a replay request yet; retrying");
    // Nak with a delay: NATS is struggling, so do not spin.
    let _ = message.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
}

/// What the request stores, given the task's record as read.
fn plan(endpoints: &UserEndpoints, request: &ReplayRequest, record: Option<Record>) -> Plan {
    let refuse_all = |why: &str| Plan {
        jobs: Vec::new(),
        events: refusals(endpoints, request, &request.endpoints, why),
    };
    let record = match record {
        Some(Record::Readable(record)) if record.user == request.user => record,
        // Another user's task reads as no task: the request learns nothing.
        Some(Record::Readable(_)) | None => {
            return refuse_all(
                "there is no record of this task (it expired, or is not this user's), so its webhook cannot be rebuilt",
            );
        }
        Some(Record::Unreadable(unreadable)) => {
            return refuse_all(&format!(
                "the task's stored record cannot be read, so its webhook cannot be rebuilt: {}",
                unreadable.reason
            ));
        }
    };
    let (sent_to, never_sent_to): (Vec<EndpointId>, Vec<EndpointId>) = request
        .endpoints
        .iter()
        .cloned()
        .partition(|endpoint| record.endpoints.contains(endpoint));
    let webhook = record.webhook();
    let jobs = sent_to
        .iter()
        .map(|endpoint| job(&record, endpoint, &webhook, &request.redelivery))
        .collect();
    let mut events: Vec<Outgoing> = sent_to
        .iter()
        .map(|endpoint| queued_event(request, endpoint))
        .collect();
    events.extend(refusals(
        endpoints,
        request,
        &never_sent_to,
        "the task was never sent to this endpoint",
    ));
    Plan { jobs, events }
}

/// Attempt 1 of the round's delivery to `endpoint`.
fn job(
    record: &TaskRecord,
    endpoint: &EndpointId,
    webhook: &(String, String),
    round: &str,
) -> Outgoing {
    Outgoing::delivery(&record.delivery_job(endpoint, webhook, Some(round.to_string())))
}

/// The event that starts the round in the task's history.
fn queued_event(request: &ReplayRequest, endpoint: &EndpointId) -> Outgoing {
    let event = TaskEvent::Redelivery(RedeliveryQueued {
        endpoint: endpoint.clone(),
        redelivery: request.redelivery.clone(),
        cause: request.cause,
        at_ms: herald_core::now_ms(),
    });
    Outgoing::task_event_once(
        &request.user,
        &request.task,
        event,
        names::redelivery_event_msg_id(&request.task, endpoint, &request.redelivery),
    )
}

/// The records of a request not carried out for `refused`: an `abandoned`
/// attempt 0 (no request was sent) in the round, saying why. Written to
/// the requesting user's history, whose subject the request names, so it
/// can reach no other user's.
pub(crate) fn refusals(
    endpoints: &UserEndpoints,
    request: &ReplayRequest,
    refused: &[EndpointId],
    why: &str,
) -> Vec<Outgoing> {
    tracing::warn!(task = %request.task, user = %request.user, round = %request.redelivery, reason = why, "replay request not carried out; recording it");
    refused
        .iter()
        .map(|endpoint| {
            let event = TaskEvent::Delivery(DeliveryAttempt {
                endpoint: endpoint.clone(),
                url: endpoints
                    .get(endpoint)
                    .map(|e| RedactedUrl::from_text(&e.url).to_string())
                    .unwrap_or_default(),
                attempt: 0,
                at_ms: herald_core::now_ms(),
                outcome: AttemptOutcome::Abandoned,
                status: None,
                latency_ms: 0,
                error: Some(format!("the redelivery was not carried out: {why}")),
                response_body: None,
                next_attempt_in_ms: None,
                redelivery: Some(request.redelivery.clone()),
            });
            Outgoing::task_event_once(
                &request.user,
                &request.task,
                event,
                names::replay_refused_msg_id(&request.task, endpoint, &request.redelivery),
            )
        })
        .collect()
}

/// Whether `round` can be one token of a subject and of a message id
/// (what [`herald_core::ids::redelivery_id`] and recover's `rc-<seq>` are).
fn is_token(round: &str) -> bool {
    (1..=128).contains(&round.len())
        && round
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_subject_tokens_name_a_round() {
        assert!(is_token("rd-0190e0c8a1b27c3d8e9f001122334455"));
        assert!(is_token("rc-42"));
        for bad in ["", "a.b", "*", ">", "a b", &"x".repeat(129)] {
            assert!(!is_token(bad), "{bad:?}");
        }
    }
}
