//! Every message Herald publishes, built in one place: its subject, its
//! `Nats-Msg-Id` and its payload come from here, so a role cannot put a
//! payload on another payload's subject or give one message two ids.
//!
//! The id rules (DESIGN.md, "JetStream contracts"): a message that a retry
//! of the same work may publish again carries a `Nats-Msg-Id`, and the
//! stream's duplicate window stores it once. A message that is new every
//! time (an attempt record of a delivery, the task's record put) carries
//! none.

use crate::{
    TaskId, UserId, names,
    payload::{
        DeliveryJob, MailJob, ReplayRequest, TaskEvent, TaskEventMessage, TaskMessage, TaskRecord,
        encode,
    },
};

/// A message to publish: subject, `Nats-Msg-Id` for de-duplication, payload,
/// and, for a message schedule, when and where it fires.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub msg_id: Option<String>,
    pub payload: Vec<u8>,
    pub schedule: Option<Schedule>,
}

/// A JetStream message schedule (nats-server 2.12+, ADR-51): the stream
/// keeps the message on its own subject and publishes its payload to
/// `target`, in the same stream, at `at_ms`.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub target: String,
    pub at_ms: u64,
}

impl Outgoing {
    /// A message on `subject`; for payloads this module has no constructor
    /// for (tests, tools).
    pub fn new(subject: String, msg_id: impl Into<Option<String>>, payload: Vec<u8>) -> Self {
        Self {
            subject,
            msg_id: msg_id.into(),
            payload,
            schedule: None,
        }
    }

    /// A task as the API accepts it: a retried POST stores it once.
    pub fn task(task: &TaskMessage) -> Self {
        Self::new(
            names::task_subject(&task.task_type, &task.user, &task.id),
            names::task_msg_id(&task.id),
            encode(task),
        )
    }

    /// The task's record in `herald-tasks`: a KV put is a publish to the
    /// key's subject, so it can be published with the delivery jobs and
    /// acknowledged with them.
    pub fn task_record(record: &TaskRecord) -> Self {
        Self::new(names::task_record_subject(&record.id), None, encode(record))
    }

    /// `event` appended to the history of `user`'s task `task`.
    pub fn task_event(user: &UserId, task: &TaskId, event: TaskEvent) -> Self {
        Self::new(
            names::attempts_subject(user, task),
            None,
            encode(&TaskEventMessage::new(task.clone(), event)),
        )
    }

    /// [`Self::task_event`] for an event that a retry of the same work must
    /// not record twice.
    pub fn task_event_once(user: &UserId, task: &TaskId, event: TaskEvent, msg_id: String) -> Self {
        Self {
            msg_id: Some(msg_id),
            ..Self::task_event(user, task, event)
        }
    }

    /// The first attempt of a delivery (of the fan-out, or of a redelivery
    /// round), on its webhook subject.
    pub fn delivery(job: &DeliveryJob) -> Self {
        Self::new(
            names::webhook_subject(&job.user, &job.endpoint),
            job.first_msg_id(),
            encode(job),
        )
    }

    /// `job` held as a message schedule that fires onto its webhook subject
    /// at `at_ms`: a retry, or a delivery handed back until later. One
    /// schedule per delivery and round is pending at a time: storing
    /// another replaces it.
    pub fn delivery_at(job: &DeliveryJob, at_ms: u64, msg_id: String) -> Self {
        Self {
            schedule: Some(Schedule {
                target: names::webhook_subject(&job.user, &job.endpoint),
                at_ms,
            }),
            ..Self::new(
                names::retry_subject(
                    &job.user,
                    &job.endpoint,
                    &job.task,
                    job.redelivery.as_deref(),
                ),
                msg_id,
                encode(job),
            )
        }
    }

    /// A mail to an endpoint's owner, stored once under `msg_id` (the
    /// mail's own rule: [`MailJob::ending_delivery`] jobs use
    /// [`names::mail_msg_id`], endpoint news
    /// [`names::endpoint_news_msg_id`]).
    pub fn mail(job: &MailJob, msg_id: String) -> Self {
        Self::new(names::mail_subject(&job.user), msg_id, encode(job))
    }

    /// A replay request as stored: its subject and `Nats-Msg-Id` name the
    /// task and round, so the same round is stored once.
    pub fn replay_request(request: &ReplayRequest) -> Self {
        Self::new(
            names::replay_subject(&request.user, &request.task, &request.redelivery),
            names::replay_msg_id(&request.task, &request.redelivery),
            encode(request),
        )
    }
}
