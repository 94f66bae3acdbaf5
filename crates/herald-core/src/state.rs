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
    /// The task is stored, but its stored payload cannot be read by this
    /// build (damaged, or written by another version); `error` says why.
    Unreadable,
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

    /// Whether attempts are still to come in the current round, so a new
    /// round now would run beside it.
    pub fn is_in_progress(self) -> bool {
        matches!(self, Self::Pending | Self::Retrying)
    }

    /// Whether the current round ended without the endpoint accepting the
    /// webhook, so recovering it can help.
    pub fn is_recoverable(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Mailed | Self::MailFailed | Self::Abandoned | Self::Held
        )
    }
}

/// The state of delivery to `endpoint`, from the task's events in order.
///
/// A delivery is attempted in rounds: the fan-out, then one round per
/// redelivery (each with its own id, carried by its attempts and mail). The
/// latest round decides: when a round starts, the state is pending again,
/// and events of a round it superseded (a late mail, say) change nothing.
pub fn endpoint_state(endpoint: &EndpointId, events: &[TaskEvent]) -> EndpointDeliveryState {
    follow_rounds(endpoint, events).0
}

/// The redelivery round that decides the delivery to `endpoint`; `None`
/// while the fan-out's does.
pub fn current_round<'a>(endpoint: &EndpointId, events: &'a [TaskEvent]) -> Option<&'a str> {
    follow_rounds(endpoint, events).1
}

fn follow_rounds<'a>(
    endpoint: &EndpointId,
    events: &'a [TaskEvent],
) -> (EndpointDeliveryState, Option<&'a str>) {
    let mut state = EndpointDeliveryState::Pending;
    let mut round: Option<&str> = None;
    let mut superseded: Vec<Option<&str>> = Vec::new();
    for event in events.iter().filter(|e| e.endpoint() == endpoint) {
        if let TaskEvent::Mail(mail) = event
            && !mail.reason.is_none_or(MailReason::ends_delivery)
        {
            // About the endpoint as a whole (disabled, recovered): in no
            // round, and settles no delivery.
            continue;
        }
        let event_round = event.redelivery();
        if event_round != round {
            if superseded.contains(&event_round) {
                continue;
            }
            superseded.push(round);
            round = event_round;
            state = EndpointDeliveryState::Pending;
        }
        match event {
            TaskEvent::Delivery(attempt) => {
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
            TaskEvent::Mail(mail) if state != EndpointDeliveryState::Delivered => {
                state = if mail.sent {
                    EndpointDeliveryState::Mailed
                } else {
                    EndpointDeliveryState::MailFailed
                };
            }
            // Its jobs may be attempted before the event is stored: it only
            // starts the round when no attempt of the round came first.
            TaskEvent::Mail(_) | TaskEvent::Redelivery(_) => {}
        }
    }
    (state, round)
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
        payload::{DeliveryAttempt, MailOutcome, RedeliveryCause, RedeliveryQueued},
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
            redelivery: None,
        })
    }

    fn in_round(event: TaskEvent, round: &str) -> TaskEvent {
        match event {
            TaskEvent::Delivery(a) => TaskEvent::Delivery(DeliveryAttempt {
                redelivery: Some(round.into()),
                ..a
            }),
            TaskEvent::Mail(m) => TaskEvent::Mail(MailOutcome {
                redelivery: Some(round.into()),
                ..m
            }),
            other => other,
        }
    }

    fn queued(endpoint: &str, round: &str) -> TaskEvent {
        TaskEvent::Redelivery(RedeliveryQueued {
            endpoint: ep(endpoint),
            redelivery: round.into(),
            cause: RedeliveryCause::Redeliver,
            at_ms: 50,
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
            redelivery: None,
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
            traceparent: None,
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
                    _ => unreachable!(),
                }
            }),
        ];
        assert_eq!(task_state(&rec, &events), TaskState::Delivering);
        events.push(attempt("b", 2, AttemptOutcome::Held));
        assert_eq!(task_state(&rec, &events), TaskState::Held);
        events.push(attempt("b", 2, AttemptOutcome::Delivered));
        assert_eq!(task_state(&rec, &events), TaskState::Delivered);
    }

    #[test]
    fn the_latest_round_decides() {
        let rec = record(&["a", "b"], HandlerOutcome::Completed);
        let mut events = vec![
            attempt("a", 1, AttemptOutcome::Delivered),
            attempt("b", 1, AttemptOutcome::Exhausted),
            mail("b", true),
        ];
        assert_eq!(task_state(&rec, &events), TaskState::Mailed);
        // Queued again: delivering, though no attempt of the round ran yet.
        events.push(queued("b", "r1"));
        assert_eq!(
            endpoint_state(&ep("b"), &events),
            EndpointDeliveryState::Pending
        );
        assert_eq!(task_state(&rec, &events), TaskState::Delivering);
        events.push(in_round(attempt("b", 1, AttemptOutcome::Retrying), "r1"));
        assert_eq!(task_state(&rec, &events), TaskState::Delivering);
        events.push(in_round(attempt("b", 2, AttemptOutcome::Delivered), "r1"));
        assert_eq!(task_state(&rec, &events), TaskState::Delivered);
        // A late event of the superseded round changes nothing.
        events.push(mail("b", false));
        assert_eq!(task_state(&rec, &events), TaskState::Delivered);

        // A delivered endpoint sent again is delivering, then delivered.
        events.push(queued("a", "r2"));
        assert_eq!(task_state(&rec, &events), TaskState::Delivering);
        events.push(in_round(attempt("a", 1, AttemptOutcome::Delivered), "r2"));
        assert_eq!(task_state(&rec, &events), TaskState::Delivered);
        assert_eq!(current_round(&ep("a"), &events), Some("r2"));
        assert_eq!(current_round(&ep("b"), &events), Some("r1"));
    }

    #[test]
    fn a_mail_about_the_endpoint_starts_no_round() {
        // Events since a time, as recover reads them: a recovered mail about
        // the endpoint (no round) after the round's attempts.
        let events = [
            in_round(attempt("a", 1, AttemptOutcome::Held), "r1"),
            TaskEvent::Mail(MailOutcome {
                reason: Some(MailReason::EndpointRecovered),
                ..match mail("a", true) {
                    TaskEvent::Mail(m) => m,
                    _ => unreachable!(),
                }
            }),
        ];
        assert_eq!(
            endpoint_state(&ep("a"), &events),
            EndpointDeliveryState::Held
        );
        assert_eq!(current_round(&ep("a"), &events), Some("r1"));
    }

    #[test]
    fn a_round_attempted_before_its_event_was_stored_is_not_restarted() {
        let events = [
            attempt("a", 1, AttemptOutcome::Held),
            in_round(attempt("a", 1, AttemptOutcome::Delivered), "r1"),
            queued("a", "r1"),
        ];
        assert_eq!(
            endpoint_state(&ep("a"), &events),
            EndpointDeliveryState::Delivered
        );
    }

    #[test]
    fn a_failed_round_is_recoverable_and_a_running_one_in_progress() {
        let events = [
            attempt("a", 1, AttemptOutcome::Delivered),
            queued("a", "r1"),
            in_round(attempt("a", 1, AttemptOutcome::Exhausted), "r1"),
            in_round(mail("a", true), "r1"),
        ];
        let state = endpoint_state(&ep("a"), &events);
        assert_eq!(state, EndpointDeliveryState::Mailed);
        assert!(state.is_recoverable() && !state.is_in_progress());
        let state = endpoint_state(&ep("a"), &events[..2]);
        assert!(state.is_in_progress() && !state.is_recoverable());
    }
}
