//! Reading a task back: its record, its queued message, its events.
//!
//! A task is found in one of two places: still queued in `HERALD_TASKS`
//! (found with one direct get on `herald.tasks.*.<user>.<task>`), or recorded
//! in `herald-tasks` once its handler ran. The task worker writes the record
//! before it acks the queued message, so a task is always in at least one of
//! them; [`find_task`] reads the record again after a miss in the stream to
//! close the window between the two.
//!
//! No stored payload makes a read fail: one this build cannot read (written
//! by a newer build, damaged, or nested past serde_json's limit by a build
//! without the API's depth limit) is [`StoredTask::Unreadable`], logged,
//! and shown as such, instead of a 503 for every read of it.

use std::time::Duration;

use async_nats::jetstream::{
    consumer::{DeliverPolicy, pull::OrderedConfig},
    stream::{DirectGetErrorKind, Stream},
};
use futures::StreamExt;
use herald_core::{
    TaskId, TaskType, UserId, json, names,
    payload::{ReplayRequest, TaskEvent, TaskEventMessage, TaskMessage, TaskRecord, decode},
};

use crate::{Broker, QueueError, buckets::Bucket};

/// Where a task stands in storage.
#[derive(Debug)]
pub enum StoredTask {
    Queued(TaskMessage),
    Recorded(TaskRecord),
    /// Stored, but not readable by this build.
    Unreadable(Unreadable),
}

/// A stored task payload that does not decode, with what could be read of
/// its top-level fields.
#[derive(Debug, Clone)]
pub struct Unreadable {
    pub task: TaskId,
    pub user: Option<UserId>,
    pub task_type: Option<TaskType>,
    pub accepted_at_ms: Option<u64>,
    /// Why it does not decode.
    pub reason: String,
}

impl Unreadable {
    fn new(task: &TaskId, bytes: &[u8], reason: String) -> Self {
        let text = String::from_utf8_lossy(bytes);
        let fields = json::top_level_scalars(&text);
        let field = |name: &str| {
            fields
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, raw)| *raw)
        };
        let string =
            |name: &str| field(name).and_then(|raw| serde_json::from_str::<String>(raw).ok());
        Unreadable {
            task: task.clone(),
            user: string("user").and_then(|u| UserId::new(u).ok()),
            task_type: string("type").and_then(|t| TaskType::new(t).ok()),
            accepted_at_ms: field("accepted_at_ms").and_then(|raw| raw.parse().ok()),
            reason,
        }
    }

    /// Whether it is `user`'s: only when its owner could be read.
    pub fn belongs_to(&self, user: &UserId) -> bool {
        self.user.as_ref() == Some(user)
    }
}

/// A task's record as stored: readable, or not.
#[derive(Debug)]
pub enum Record {
    Readable(TaskRecord),
    Unreadable(Unreadable),
}

impl Record {
    pub fn belongs_to(&self, user: &UserId) -> bool {
        match self {
            Record::Readable(record) => &record.user == user,
            Record::Unreadable(unreadable) => unreadable.belongs_to(user),
        }
    }

    fn into_stored(self) -> StoredTask {
        match self {
            Record::Readable(record) => StoredTask::Recorded(record),
            Record::Unreadable(unreadable) => StoredTask::Unreadable(unreadable),
        }
    }
}

/// Upper bound on events read for one task; a task has a handful per
/// endpoint, this only guards against a runaway history.
const MAX_EVENTS: usize = 10_000;

pub async fn find_task(
    broker: &Broker,
    user: &UserId,
    task: &TaskId,
) -> Result<Option<StoredTask>, QueueError> {
    if !broker.is_connected() {
        return Err(QueueError::Disconnected);
    }
    if let Some(record) = task_record(broker, task).await? {
        return Ok(record.belongs_to(user).then(|| record.into_stored()));
    }
    let tasks = broker.stream(names::TASKS_STREAM).await?;
    match tasks
        .direct_get_next_for_subject(names::queued_task_filter(user, task), None)
        .await
    {
        Ok(message) => {
            // The subject names the user, so the owner is known either way.
            return Ok(Some(match decode::<TaskMessage>(&message.payload) {
                Ok(queued) => StoredTask::Queued(queued),
                Err(e) => {
                    tracing::error!(task = %task, sequence = message.sequence, error = %e, "queued task is unreadable");
                    let mut unreadable = Unreadable::new(task, &message.payload, e.to_string());
                    unreadable.user = Some(user.clone());
                    StoredTask::Unreadable(unreadable)
                }
            }));
        }
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => {}
        Err(e) => return Err(QueueError::request("find queued task", e)),
    }
    // The worker may have recorded and acked it between the two reads.
    Ok(task_record(broker, task)
        .await?
        .filter(|record| record.belongs_to(user))
        .map(Record::into_stored))
}

/// The task's record, if stored; one that does not decode is
/// [`Record::Unreadable`] (and logged), never an error.
pub async fn task_record(broker: &Broker, task: &TaskId) -> Result<Option<Record>, QueueError> {
    let bucket = broker.bucket(Bucket::Tasks).await?;
    let Some(bytes) = bucket
        .get(names::task_key(task))
        .await
        .map_err(|e| QueueError::request("get task record", e))?
    else {
        return Ok(None);
    };
    Ok(Some(match decode::<TaskRecord>(&bytes) {
        Ok(record) => Record::Readable(record),
        Err(e) => {
            tracing::error!(task = %task, error = %e, "task record is unreadable");
            Record::Unreadable(Unreadable::new(task, &bytes, e.to_string()))
        }
    }))
}

/// Every event of a task, oldest first.
pub async fn task_events(
    broker: &Broker,
    user: &UserId,
    task: &TaskId,
) -> Result<Vec<TaskEvent>, QueueError> {
    let attempts = broker.stream(names::ATTEMPTS_STREAM).await?;
    let subject = names::attempts_subject(user, task);
    read_subject(
        &attempts,
        subject,
        MAX_EVENTS,
        "read task events",
        |sequence, payload| match decode::<TaskEventMessage>(payload) {
            Ok(event) => Some(event.event),
            Err(e) => {
                tracing::warn!(sequence, error = %e, "skipping unreadable task event");
                None
            }
        },
    )
    .await
}

/// Longest wait for the next event while reading a user's history; the
/// read stops at the stream's last message, so this only bounds a stalled
/// server.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Gives `visit` every readable task event of `user` stored since
/// `since_ms`, oldest first, with its stream sequence, up to the stream's
/// last message at the time of the call (an ordered consumer: one pass,
/// no state left on the server). Unreadable events are logged and skipped.
pub async fn user_events_since(
    broker: &Broker,
    user: &UserId,
    since_ms: u64,
    mut visit: impl FnMut(u64, TaskEventMessage),
) -> Result<(), QueueError> {
    if !broker.is_connected() {
        return Err(QueueError::Disconnected);
    }
    if since_ms > herald_core::now_ms() {
        return Ok(());
    }
    let attempts = broker
        .jetstream
        .get_stream(names::ATTEMPTS_STREAM)
        .await
        .map_err(|e| QueueError::request("get stream", e))?;
    let end = attempts.cached_info().state.last_sequence;
    let start_time = async_nats::datetime::from_nanos(i128::from(since_ms) * 1_000_000)
        .map_err(|e| QueueError::request("read task history", e))?;
    let consumer = attempts
        .create_consumer(OrderedConfig {
            filter_subject: names::user_attempts_filter(user),
            deliver_policy: DeliverPolicy::ByStartTime { start_time },
            ..Default::default()
        })
        .await
        .map_err(|e| QueueError::request("read task history", e))?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| QueueError::request("read task history", e))?;
    loop {
        let message = match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(QueueError::request("read task history", e)),
            Ok(None) => break,
            Err(_) => return Err(QueueError::request("read task history", "timed out")),
        };
        let info = message
            .info()
            .map_err(|e| QueueError::request("read task history", e))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        match decode::<TaskEventMessage>(&message.payload) {
            Ok(event) => visit(sequence, event),
            Err(e) => tracing::warn!(sequence, error = %e, "skipping unreadable task event"),
        }
        if pending == 0 || sequence >= end {
            break;
        }
    }
    Ok(())
}

/// Replay requests are read this many at most per task: more than one or
/// two waiting for the same task means something is flooding it.
const MAX_PENDING_REPLAYS: usize = 100;

/// The replay requests for `user`'s task `task` that are stored and not
/// yet carried out (the task worker acks, so removes, a request only after
/// its round's events are stored). Unreadable ones are skipped.
pub async fn pending_replays(
    broker: &Broker,
    user: &UserId,
    task: &TaskId,
) -> Result<Vec<ReplayRequest>, QueueError> {
    let tasks = broker.stream(names::TASKS_STREAM).await?;
    let filter = names::replay_filter(user, task);
    read_subject(
        &tasks,
        filter,
        MAX_PENDING_REPLAYS,
        "read replay requests",
        |_, payload| decode::<ReplayRequest>(payload).ok(),
    )
    .await
}

/// The messages on `subject` (a filter may have wildcards), oldest first,
/// read one direct get at a time: at most `limit` of those `parse` keeps
/// (it is given each message's sequence and payload).
async fn read_subject<T>(
    stream: &Stream<()>,
    subject: String,
    limit: usize,
    operation: &'static str,
    mut parse: impl FnMut(u64, &[u8]) -> Option<T>,
) -> Result<Vec<T>, QueueError> {
    let mut kept = Vec::new();
    let mut next_sequence = None;
    while kept.len() < limit {
        match stream
            .direct_get_next_for_subject(subject.clone(), next_sequence)
            .await
        {
            Ok(message) => {
                next_sequence = Some(message.sequence + 1);
                kept.extend(parse(message.sequence, &message.payload));
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(QueueError::request(operation, e)),
        }
    }
    Ok(kept)
}
