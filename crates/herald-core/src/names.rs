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

/// Every task event of `user`, whatever the task.
pub fn user_attempts_filter(user: &UserId) -> String {
    format!("herald.attempts.{user}.>")
}

/// Every delivery attempt and mail outcome of one task, in order.
pub fn attempts_subject(user: &UserId, task: &TaskId) -> String {
    format!("herald.attempts.{user}.{task}")
}

/// `Nats-Msg-Id` of a task, so a retried POST cannot enqueue it twice.
pub fn task_msg_id(task: &TaskId) -> String {
    task.to_string()
}

/// `Nats-Msg-Id` of a delivery job of the fan-out, so a redelivered task
/// cannot fan out twice. It is also the Standard Webhooks `webhook-id`
/// ([`crate::payload::DeliveryJob::webhook_id`]), the same on every attempt
/// and every redelivery round.
pub fn delivery_msg_id(task: &TaskId, endpoint: &EndpointId) -> String {
    format!("{task}.{endpoint}")
}

/// `Nats-Msg-Id` of the history record of the attempt made at `at_ms`, so
/// the record is stored once however often its publish is sent again
/// through a NATS failover, while a second real attempt with the same
/// number (after a lost ack) is recorded as the separate try it was.
pub fn attempt_record_msg_id(
    task: &TaskId,
    endpoint: &EndpointId,
    redelivery: Option<&str>,
    attempt: u32,
    at_ms: u64,
) -> String {
    format!(
        "{}.at{at_ms}",
        attempt_msg_id(task, endpoint, redelivery, attempt)
    )
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

/// `Nats-Msg-Id` of a mail about an endpoint as a whole (disabled,
/// recovered): `news` names the change, `base_revision` the health record's
/// revision the write that made it replaced (0: the record was new). Only
/// one write can replace a given revision, so the id is the same for every
/// try to queue that mail and different for the next change.
pub fn endpoint_news_msg_id(
    user: &UserId,
    endpoint: &EndpointId,
    news: &str,
    base_revision: u64,
) -> String {
    format!("health.{user}.{endpoint}.{news}.r{base_revision}")
}

/// `Nats-Msg-Id` of what records the end of the job at `sequence` of
/// `stream`, abandoned at `max_deliver`: one per stream message, so a
/// second try after a failed delete records nothing twice.
pub fn abandoned_record_msg_id(stream: &str, sequence: u64) -> String {
    format!("{stream}.{sequence}.max-deliver")
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

/// The user and endpoint an [`endpoint_key`] names; `None` for a key that
/// is not `<user>.<endpoint>` with valid tokens (neither token can hold a
/// dot, so the split is unambiguous).
pub fn parse_endpoint_key(key: &str) -> Option<(UserId, EndpointId)> {
    let (user, endpoint) = key.split_once('.')?;
    Some((UserId::new(user).ok()?, EndpointId::new(endpoint).ok()?))
}

/// The keys of every user's endpoint named `endpoint`.
pub fn endpoint_keys_named(endpoint: &EndpointId) -> String {
    format!("*.{endpoint}")
}

/// The subject a KV put of `key` in `bucket` is a publish to.
pub fn kv_subject(bucket: &str, key: &str) -> String {
    format!("$KV.{bucket}.{key}")
}

/// The subject of a task's record in `herald-tasks` ([`kv_subject`]).
pub fn task_record_subject(task: &TaskId) -> String {
    kv_subject(TASKS_BUCKET, &task_key(task))
}

/// Key of a task's record in `herald-tasks`.
pub fn task_key(task: &TaskId) -> String {
    task.to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_endpoint_key_parses_back_into_what_built_it() {
        let user = UserId::new("alice").unwrap();
        let endpoint = EndpointId::new("team-a_hook").unwrap();
        let key = endpoint_key(&user, &endpoint);
        assert_eq!(parse_endpoint_key(&key), Some((user, endpoint)));
        for hostile in ["alice", "alice.", ".hook", "al ice.hook", "alice.ho.ok", ""] {
            assert_eq!(parse_endpoint_key(hostile), None, "{hostile:?}");
        }
    }

    #[test]
    fn endpoint_news_ids_are_stable_per_write_and_apart_per_change() {
        let user = UserId::new("7").unwrap();
        let endpoint = EndpointId::new("hooks").unwrap();
        let id = |news, revision| endpoint_news_msg_id(&user, &endpoint, news, revision);
        assert_eq!(id("recovered", 12), id("recovered", 12));
        assert_ne!(id("recovered", 12), id("recovered", 15));
        assert_ne!(id("recovered", 12), id("disabled", 12));
        assert_eq!(
            id("disabled", 3),
            "health.7.hooks.disabled.r3",
            "ids already stored keep de-duplicating"
        );
    }
}
