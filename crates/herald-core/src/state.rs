//! A task's state, derived from its record and its events.
//!
//! The task worker writes a task's record once; webhook and mail workers only
//! append events to `HERALD_ATTEMPTS`. The states DESIGN.md lists for
//! `herald-tasks` (delivering, delivered, mailed...) are computed here from
//! those, so no worker rewrites the record on the hot path and concurrent
//! deliveries to several endpoints never contend for one key.

use serde::Serialize;

use crate::{
    EndpointId,
    payload::{AttemptOutcome, HandlerOutcome, MailReason, TaskEvent, TaskRecord},
};

/// The state of a task as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Accepted and stored; no worker has finished it yet.
    Queued,
    /// The handler ran; webhooks are on their way or being retried.
    Delivering,
    /// Every endpoint answered 2xx.
    Delivered,
    /// The handler ran and the user had no endpoint.
    NoEndpoint,
    /// The handler failed or the task type is unknown; `<type>.failed`
    /// webhooks report it to the user's endpoints.
    Failed,
    /// Some endpoint never accepted the webhook and its owner was emailed.
    Mailed,
    /// Some endpoint never accepted the webhook and its owner could not be
    /// told (no email address, or the mail itself failed).
    Undelivered,
    /// Some endpoint is disabled: its webhook was kept, not sent, and goes
    /// out when the endpoint is enabled (or on a recover call).
    Held,
}

/// Where the delivery to one endpoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EndpointDeliveryState {
    Pending,
    Retrying,
    Delivered,
    /// Attempts ended in failure; the mail to the owner is on its way.
    Failed,
    Mailed,
    MailFailed,
    /// Attempts ended in failure and the endpoint has no email.
    Abandoned,
    /// The endpoint was removed before the webhook went out.
    EndpointRemoved,
    /// The endpoint is disabled; the delivery waits for the recover call.
    Held,
}

impl EndpointDeliveryState {
    fn is_settled(self) -> bool {
        !matches!(self, Self::Pending | Self::Retrying | Self::Failed)
    }
}

/// The state of delivery to `endpoint`, from the task's events in order.
pub fn endpoint_state(endpoint: &EndpointId, events: &[TaskEvent]) -> EndpointDeliveryState {
    let mut state = EndpointDeliveryState::Pending;
    for event in events {
        match event {
            TaskEvent::Delivery(attempt) if &attempt.endpoint == endpoint => {
                if state == EndpointDeliveryState::Delivered {
                    continue; // a duplicate after success changes nothing
                }
                state = match attempt.outcome {
                    AttemptOutcome::Delivered => EndpointDeliveryState::Delivered,
                    AttemptOutcome::Retrying => EndpointDeliveryState::Retrying,
                    AttemptOutcome::Exhausted | AttemptOutcome::Gone => {
                        EndpointDeliveryState::Failed
                    }
                    AttemptOutcome::Abandoned => EndpointDeliveryState::Abandoned,
                    AttemptOutcome::EndpointRemoved => EndpointDeliveryState::EndpointRemoved,
                    AttemptOutcome::Held => EndpointDeliveryState::Held,
                };
            }
            // A mail after a late success (a duplicate delivery) changes
            // nothing either.
            TaskEvent::Mail(mail)
                if &mail.endpoint == endpoint
                    && state != EndpointDeliveryState::Delivered
                    && mail.reason.is_none_or(MailReason::ends_delivery) =>
            {
                state = if mail.sent {
                    EndpointDeliveryState::Mailed
                } else {
                    EndpointDeliveryState::MailFailed
                };
            }
            _ => {}
        }
    }
    state
}

/// The state of a task whose handler has run.
pub fn task_state(record: &TaskRecord, events: &[TaskEvent]) -> TaskState {
    if record.outcome == HandlerOutcome::Failed {
        return TaskState::Failed;
    }
    if record.endpoints.is_empty() {
        return TaskState::NoEndpoint;
    }
    let states: Vec<_> = record
        .endpoints
        .iter()
        .map(|e| endpoint_state(e, events))
        .collect();
    if !states.iter().all(|s| s.is_settled()) {
        TaskState::Delivering
    } else if states
        .iter()
        .all(|s| *s == EndpointDeliveryState::Delivered)
    {
        TaskState::Delivered
    } else if states.iter().all(|s| {
        matches!(
            s,
            EndpointDeliveryState::Delivered | EndpointDeliveryState::Mailed
        )
    }) {
        TaskState::Mailed
    } else if states.contains(&EndpointDeliveryState::Held) {
        TaskState::Held
    } else {
        TaskState::Undelivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        TaskId, TaskType, UserId,
        payload::{DeliveryAttempt, MailOutcome},
    };

    fn ep(name: &str) -> EndpointId {
        EndpointId::new(name).unwrap()
    }

    fn attempt(endpoint: &str, n: u32, outcome: AttemptOutcome) -> TaskEvent {
        TaskEvent::Delivery(DeliveryAttempt {
            endpoint: ep(endpoint),
            url: "http://x".into(),
            attempt: n,
            at_ms: n.into(),
            outcome,
            status: Some(500),
            latency_ms: 1,
            error: None,
            response_body: None,
            next_attempt_in_ms: None,
        })
    }

    fn mail(endpoint: &str, sent: bool) -> TaskEvent {
        TaskEvent::Mail(MailOutcome {
            reason: None,
            endpoint: ep(endpoint),
            to: "a@b.c".into(),
            attempt: 1,
            at_ms: 9,
            sent,
            error: None,
        })
    }

    fn record(endpoints: &[&str], outcome: HandlerOutcome) -> TaskRecord {
        TaskRecord {
            v: 1,
            id: TaskId::new("t").unwrap(),
            user: UserId::new("u").unwrap(),
            task_type: TaskType::new("echo").unwrap(),
            accepted_at_ms: 0,
            finished_at_ms: 0,
            outcome,
            result: None,
            error: None,
            endpoints: endpoints.iter().map(|e| ep(e)).collect(),
        }
    }

    #[test]
    fn delivered_after_retries() {
        let events = [
            attempt("a", 1, AttemptOutcome::Retrying),
            attempt("a", 2, AttemptOutcome::Retrying),
            attempt("a", 3, AttemptOutcome::Delivered),
        ];
        assert_eq!(
            task_state(&record(&["a"], HandlerOutcome::Completed), &events),
            TaskState::Delivered
        );
        assert_eq!(
            task_state(&record(&["a"], HandlerOutcome::Completed), &events[..2]),
            TaskState::Delivering
        );
    }

    #[test]
    fn mailed_only_once_the_mail_is_sent() {
        let mut events = vec![
            attempt("a", 1, AttemptOutcome::Delivered),
            attempt("b", 1, AttemptOutcome::Exhausted),
        ];
        let rec = record(&["a", "b"], HandlerOutcome::Completed);
        assert_eq!(task_state(&rec, &events), TaskState::Delivering);
        events.push(mail("b", true));
        assert_eq!(task_state(&rec, &events), TaskState::Mailed);
        events.pop();
        events.push(mail("b", false));
        assert_eq!(task_state(&rec, &events), TaskState::Undelivered);
    }

    #[test]
    fn handler_failure_and_no_endpoint_win() {
        assert_eq!(
            task_state(&record(&[], HandlerOutcome::Completed), &[]),
            TaskState::NoEndpoint
        );
        assert_eq!(
            task_state(&record(&["a"], HandlerOutcome::Failed), &[]),
            TaskState::Failed
        );
        assert_eq!(
            endpoint_state(
                &ep("a"),
                &[
                    attempt("a", 1, AttemptOutcome::Delivered),
                    attempt("a", 1, AttemptOutcome::Retrying)
                ]
            ),
            EndpointDeliveryState::Delivered
        );
    }

    #[test]
    fn held_deliveries_and_endpoint_mails() {
        let rec = record(&["a", "b"], HandlerOutcome::Completed);
        let mut events = vec![
            attempt("a", 1, AttemptOutcome::Delivered),
            attempt("b", 1, AttemptOutcome::Retrying),
            // A mail about the endpoint as a whole settles no delivery.
            TaskEvent::Mail(MailOutcome {
                reason: Some(MailReason::EndpointDisabled),
                ..match mail("b", true) {
                    TaskEvent::Mail(m) => m,
                    TaskEvent::Delivery(_) => unreachable!(),
                }
            }),
        ];
        assert_eq!(task_state(&rec, &events), TaskState::Delivering);
        events.push(attempt("b", 2, AttemptOutcome::Held));
        assert_eq!(task_state(&rec, &events), TaskState::Held);
        events.push(attempt("b", 2, AttemptOutcome::Delivered));
        assert_eq!(task_state(&rec, &events), TaskState::Delivered);
    }
}
