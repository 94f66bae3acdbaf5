//! Reading a task back: its record, its queued message, its events.
//!
//! A task is found in one of two places: still queued in `HERALD_TASKS`
//! (found with one direct get on `herald.tasks.*.<user>.<task>`), or recorded
//! in `herald-tasks` once its handler ran. The task worker writes the record
//! before it acks the queued message, so a task is always in at least one of
//! them; [`find_task`] reads the record again after a miss in the stream to
//! close the window between the two.

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use herald_core::{
    TaskId, UserId, names,
    payload::{TaskEvent, TaskEventMessage, TaskMessage, TaskRecord, decode},
};

use crate::{Broker, QueueError};

/// Where a task stands in storage.
#[derive(Debug)]
pub enum StoredTask {
    Queued(TaskMessage),
    Recorded(TaskRecord),
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
        return Ok((&record.user == user).then_some(StoredTask::Recorded(record)));
    }
    let tasks = stream(broker, names::TASKS_STREAM).await?;
    match tasks
        .direct_get_next_for_subject(names::queued_task_filter(user, task), None)
        .await
    {
        Ok(message) => {
            let queued: TaskMessage =
                decode(&message.payload).map_err(|e| QueueError::request("read queued task", e))?;
            return Ok(Some(StoredTask::Queued(queued)));
        }
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => {}
        Err(e) => return Err(QueueError::request("find queued task", e)),
    }
    // The worker may have recorded and acked it between the two reads.
    Ok(task_record(broker, task)
        .await?
        .filter(|record| &record.user == user)
        .map(StoredTask::Recorded))
}

pub async fn task_record(broker: &Broker, task: &TaskId) -> Result<Option<TaskRecord>, QueueError> {
    let bucket = broker
        .jetstream
        .get_key_value(names::TASKS_BUCKET)
        .await
        .map_err(|e| QueueError::request("open tasks bucket", e))?;
    let Some(bytes) = bucket
        .get(names::task_key(task))
        .await
        .map_err(|e| QueueError::request("get task record", e))?
    else {
        return Ok(None);
    };
    decode(&bytes)
        .map(Some)
        .map_err(|e| QueueError::request("read task record", e))
}

/// Every event of a task, oldest first.
pub async fn task_events(
    broker: &Broker,
    user: &UserId,
    task: &TaskId,
) -> Result<Vec<TaskEvent>, QueueError> {
    let attempts = stream(broker, names::ATTEMPTS_STREAM).await?;
    let subject = names::attempts_subject(user, task);
    let mut events = Vec::new();
    let mut next_sequence = None;
    while events.len() < MAX_EVENTS {
        match attempts
            .direct_get_next_for_subject(subject.clone(), next_sequence)
            .await
        {
            Ok(message) => {
                next_sequence = Some(message.sequence + 1);
                match decode::<TaskEventMessage>(&message.payload) {
                    Ok(event) => events.push(event.event),
                    Err(e) => {
                        tracing::warn!(sequence = message.sequence, error = %e, "skipping unreadable task event")
                    }
                }
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(QueueError::request("read task events", e)),
        }
    }
    Ok(events)
}

async fn stream(broker: &Broker, name: &str) -> Result<Stream<()>, QueueError> {
    if !broker.is_connected() {
        return Err(QueueError::Disconnected);
    }
    broker
        .jetstream
        .get_stream_no_info(name)
        .await
        .map_err(|e| QueueError::request("get stream", e))
}
