//! Herald's workers, one module per stream they consume:
//! [`tasks`] runs task handlers and fans results out to endpoints (and
//! carries out the API's replay requests, [`replays`]),
//! [`webhooks`] signs and delivers them with retries, and [`mail`] tells an
//! endpoint's owner when it keeps failing. [`ssrf`] keeps webhooks away
//! from addresses that are not global.

pub mod handlers;
pub mod mail;
pub mod max_deliveries;
pub mod replays;
pub mod ssrf;
pub mod tasks;
pub mod webhooks;

use herald_core::payload::{TaskEvent, TaskEventMessage, VERSION, encode};
use herald_core::{TaskId, UserId, names};
use herald_queue::publish::Outgoing;

/// The message that appends `event` to the history of `task`.
pub(crate) fn task_event(user: &UserId, task: &TaskId, event: TaskEvent) -> Outgoing {
    let message = TaskEventMessage {
        v: VERSION,
        task: task.clone(),
        event,
    };
    Outgoing::new(names::attempts_subject(user, task), None, encode(&message))
}

/// [`task_event`] with a `Nats-Msg-Id`, for an event that a retry of the
/// same work must not record twice.
pub(crate) fn task_event_with_id(
    user: &UserId,
    task: &TaskId,
    event: TaskEvent,
    msg_id: String,
) -> Outgoing {
    Outgoing {
        msg_id: Some(msg_id),
        ..task_event(user, task, event)
    }
}
