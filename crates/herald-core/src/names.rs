//! Names of every stream, consumer, bucket and subject (DESIGN.md, "JetStream
//! contracts"). Roles build subjects only through these functions.

use crate::{EndpointId, TaskId, TaskType, UserId};

pub const TASKS_STREAM: &str = "HERALD_TASKS";
pub const WEBHOOKS_STREAM: &str = "HERALD_WEBHOOKS";
pub const MAIL_STREAM: &str = "HERALD_MAIL";
pub const ATTEMPTS_STREAM: &str = "HERALD_ATTEMPTS";
/// Captures the MAX_DELIVERIES advisories of the three work-queue streams,
/// so one published while no worker listens is kept until a worker reads it.
pub const ADVISORIES_STREAM: &str = "HERALD_ADVISORIES";

pub const TASKS_CONSUMER: &str = "tasks";
pub const WEBHOOKS_CONSUMER: &str = "webhooks";
pub const MAIL_CONSUMER: &str = "mail";

/// The MAX_DELIVERIES advisory of `consumer` on `stream`: core NATS,
/// published by the server when a message of that consumer reaches its
/// `max_deliver`.
pub fn max_deliveries_advisory_subject(stream: &str, consumer: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}")
}

/// The consumers of `HERALD_ADVISORIES`, one per work-queue stream, each
/// filtered to that stream's MAX_DELIVERIES advisories and read by the
/// workers of that stream.
pub const TASKS_MAX_DELIVERIES_CONSUMER: &str = "tasks-max-deliveries";
pub const WEBHOOKS_MAX_DELIVERIES_CONSUMER: &str = "webhooks-max-deliveries";
pub const MAIL_MAX_DELIVERIES_CONSUMER: &str = "mail-max-deliveries";

pub const ENDPOINTS_BUCKET: &str = "herald-endpoints";
pub const TASKS_BUCKET: &str = "herald-tasks";
pub const HEALTH_BUCKET: &str = "herald-endpoint-health";
/// Per-endpoint rate-limit state shared by every webhook worker.
pub const RATE_LIMITS_BUCKET: &str = "herald-rate-limits";

pub const TASKS_SUBJECTS: &str = "herald.tasks.>";
pub const WEBHOOKS_SUBJECTS: &str = "herald.webhooks.>";
/// Scheduled retries and deferrals of deliveries, held in `HERALD_WEBHOOKS`
/// as JetStream message schedules until they fire onto a webhook subject.
pub const RETRIES_SUBJECTS: &str = "herald.retries.>";
/// Replay requests (redeliver, recover, enable), held in `HERALD_TASKS`
/// beside the tasks and taken by the same consumer.
pub const REPLAYS_SUBJECTS: &str = "herald.replays.>";
pub const MAIL_SUBJECTS: &str = "herald.mail.>";
pub const ATTEMPTS_SUBJECTS: &str = "herald.attempts.>";

/// `herald.tasks.<type>.<user>.<task>`. The trailing task id (an addition
/// to DESIGN.md's `herald.tasks.<type>.<user>`) lets the API find a task that
/// is still queued with one direct get, without writing a "queued" record.
pub fn task_subject(task_type: &TaskType, user: &UserId, task: &TaskId) -> String {
    format!("herald.tasks.{task_type}.{user}.{task}")
}

/// Any queued task of `user` with id `task`, whatever its type.
pub fn queued_task_filter(user: &UserId, task: &TaskId) -> String {
    format!("herald.tasks.*.{user}.{task}")
}

/// `herald.replays.<user>.<task>.<round>`: the API's request that the task
/// worker send round `round` of a finished task's webhook.
pub fn replay_subject(user: &UserId, task: &TaskId, redelivery: &str) -> String {
    format!("herald.replays.{user}.{task}.{redelivery}")
}

/// Every replay request for `user`'s task `task`, whatever its round.
pub fn replay_filter(user: &UserId, task: &TaskId) -> String {
    format!("herald.replays.{user}.{task}.*")
}

/// Whether `subject` is a replay request's (rather than a task's).
pub fn is_replay_subject(subject: &str) -> bool {
    subject.starts_with("herald.replays.")
}

/// `Nats-Msg-Id` of a replay request, so a retried API call (a recovery
/// round is named after the history it read) stores it once.
pub fn replay_msg_id(task: &TaskId, redelivery: &str) -> String {
    format!("{task}.{redelivery}.replay")
}

pub fn webhook_subject(user: &UserId, endpoint: &EndpointId) -> String {
    format!("herald.webhooks.{user}.{endpoint}")
}

/// The schedule that holds the next attempt of one delivery (in
/// redelivery round `redelivery`, if any). A subject holds one schedule, so
/// scheduling again replaces what was pending; rounds do not replace each
/// other's.
pub fn retry_subject(
    user: &UserId,
    endpoint: &EndpointId,
    task: &TaskId,
    redelivery: Option<&str>,
) -> String {
    match redelivery {
        Some(round) => format!("herald.retries.{user}.{endpoint}.{task}.{round}"),
        None => format!("herald.retries.{user}.{endpoint}.{task}"),
    }
}

pub fn mail_subject(user: &UserId) -> String {
    format!("herald.mail.{user}")
}

/// Every delivery attempt and mail outcome of one task, in order.
pub fn attempts_subject(user: &UserId, task: &TaskId) -> String {
    format!("herald.attempts.{user}.{task}")
}

/// `Nats-Msg-Id` of a task, so a retried POST cannot enqueue it twice.
pub fn task_msg_id(task: &TaskId) -> String {
    task.to_string()
}

/// `Nats-Msg-Id` of a delivery job, so a redelivered task cannot fan out twice.
/// It is also the Standard Webhooks `webhook-id`, stable across retries.
pub fn delivery_msg_id(task: &TaskId, endpoint: &EndpointId) -> String {
    format!("{task}.{endpoint}")
}

/// `Nats-Msg-Id` of attempt `attempt` of a delivery (in redelivery round
/// `redelivery`, if any), so a worker that repeats its work after a lost ack
/// cannot schedule the same attempt twice.
pub fn attempt_msg_id(
    task: &TaskId,
    endpoint: &EndpointId,
    redelivery: Option<&str>,
    attempt: u32,
) -> String {
    match redelivery {
        Some(round) => format!("{task}.{endpoint}.{round}.a{attempt}"),
        None => format!("{task}.{endpoint}.a{attempt}"),
    }
}

/// `Nats-Msg-Id` of the mail that ends a delivery (in redelivery round
/// `redelivery`, if any: a round that fails again mails again).
pub fn mail_msg_id(task: &TaskId, endpoint: &EndpointId, redelivery: Option<&str>) -> String {
    match redelivery {
        Some(round) => format!("{task}.{endpoint}.{round}.mail"),
        None => format!("{task}.{endpoint}.mail"),
    }
}

/// `Nats-Msg-Id` of the event that records a redelivery round.
pub fn redelivery_event_msg_id(task: &TaskId, endpoint: &EndpointId, redelivery: &str) -> String {
    format!("{task}.{endpoint}.{redelivery}.queued")
}

/// `Nats-Msg-Id` of the attempt that records a replay request the task
/// worker could not carry out for `endpoint`.
pub fn replay_refused_msg_id(task: &TaskId, endpoint: &EndpointId, redelivery: &str) -> String {
    format!("{task}.{endpoint}.{redelivery}.refused")
}

/// Key of an endpoint in `herald-endpoints` and `herald-endpoint-health`.
pub fn endpoint_key(user: &UserId, endpoint: &EndpointId) -> String {
    format!("{user}.{endpoint}")
}

/// Key of a task's record in `herald-tasks`.
pub fn task_key(task: &TaskId) -> String {
    task.to_string()
}
