//! Sending deliveries again: redeliver a task, recover what failed for an
//! endpoint since a time, and enable a disabled endpoint (which recovers
//! what it held). The API's side of it, behind the routes of [`super`]: it
//! checks the call against the stored state and stores a [`ReplayRequest`]
//! per task in `HERALD_TASKS`; the task worker carries it out
//! (`herald_worker::replays`).
//!
//! Every re-send is a new *round* of attempts for one task and endpoint: a
//! delivery job carrying the round's id, so its `Nats-Msg-Id`s
//! ([`herald_core::names::attempt_msg_id`]) stay apart from earlier rounds' and the
//! stream's duplicate window does not drop it, while the `webhook-id` (and
//! the body, rebuilt from the task's record) stay the same, so receivers can
//! still de-duplicate. Attempt numbers start at 1 in each round, which also
//! gives the round the whole retry schedule. A `RedeliveryQueued` event
//! in the task's history marks the round; from then on the latest round
//! decides the delivery's state ([`herald_core::state`]).
//!
//! The API never builds a delivery job: a request names a task, endpoints
//! and a round, never a body, so the API's NATS user needs no right to
//! publish delivery jobs or history (docs/design.md, "NATS permissions").
//! A call's "queued" means its requests are stored (JetStream's publish
//! ack); the task worker then queues the jobs, and a request it cannot
//! carry out ends recorded in the task's history.

use std::{collections::HashMap, time::Duration};

use futures::{StreamExt, TryStreamExt, stream};
use herald_core::{
    EndpointId, TaskId, UserId,
    outgoing::Outgoing,
    payload::{EndpointHealth, RedeliveryCause, ReplayRequest, TaskEvent},
    state::endpoint_state,
};
use herald_queue::{
    Broker, QueueError, endpoints, health,
    history::{self, Record, StoredTask},
};

/// At most this many tasks are examined by one recover call; the answer
/// says where to continue.
pub const RECOVER_LIMIT: usize = 10_000;

/// Deliveries a worker held on its own (after a 410, before its write
/// marking the endpoint disabled was stored) are this much older than
/// `disabled_at_ms`; enabling recovers from this far before it.
const HELD_BEFORE_DISABLED: Duration = Duration::from_secs(60);

/// Why a redelivery was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("no such task")]
    TaskNotFound,
    /// The task is queued or its handler is running: there is no webhook
    /// to send yet.
    #[error("the task has not finished; its webhook is not built yet")]
    NotFinished,
    #[error("endpoint {0} is not an endpoint of this user or task")]
    EndpointNotFound(String),
    /// Attempts of an earlier round are still to come for these endpoints.
    #[error("delivery to {} is still in progress", list(.0))]
    InProgress(Vec<EndpointId>),
    #[error("none of the task's endpoints exists any more")]
    NoEndpoints,
    #[error("the endpoint is disabled: enable it, which recovers what it held")]
    Disabled,
    /// The task's stored record cannot be read, so its webhook cannot be
    /// rebuilt.
    #[error("the task's stored record cannot be read, so its webhook cannot be rebuilt: {0}")]
    Unreadable(String),
}

fn list(endpoints: &[EndpointId]) -> String {
    endpoints
        .iter()
        .map(EndpointId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A redelivery queued by [`redeliver`].
#[derive(Debug, Clone)]
pub struct Redelivered {
    pub redelivery: String,
    pub endpoints: Vec<EndpointId>,
}

/// Sends a finished task's webhook again to `endpoint`, or to every
/// endpoint it was fanned out to that still exists.
pub async fn redeliver(
    broker: &Broker,
    user: &UserId,
    task: &TaskId,
    endpoint: Option<&EndpointId>,
) -> Result<Redelivered, ReplayError> {
    let record = match history::find_task(broker, user, task).await? {
        None => return Err(ReplayError::TaskNotFound),
        Some(StoredTask::Queued(_)) => return Err(ReplayError::NotFinished),
        Some(StoredTask::Unreadable(unreadable)) => {
            return Err(ReplayError::Unreadable(unreadable.reason));
        }
        Some(StoredTask::Recorded(record)) => record,
    };
    let targets = match endpoint {
        Some(endpoint) => {
            if !record.endpoints.contains(endpoint)
                || !endpoints::exists(broker, user, endpoint).await?
            {
                return Err(ReplayError::EndpointNotFound(endpoint.to_string()));
            }
            vec![endpoint.clone()]
        }
        None => {
            let mut existing = Vec::new();
            for endpoint in &record.endpoints {
                if endpoints::exists(broker, user, endpoint).await? {
                    existing.push(endpoint.clone());
                }
            }
            if existing.is_empty() {
                return Err(ReplayError::NoEndpoints);
            }
            existing
        }
    };
    // One round at a time: a round beside a running one would send the
    // webhook twice over. A round is running from when its request is
    // stored (until the task worker has stored the round's events, the
    // request is still in the stream) to its last attempt. (Two calls
    // racing past this check run two rounds; the latest decides.)
    let events = history::task_events(broker, user, task).await?;
    let requested = history::pending_replays(broker, user, task).await?;
    let busy: Vec<_> = targets
        .iter()
        .filter(|e| {
            endpoint_state(e, &events).is_in_progress()
                || requested.iter().any(|r| r.endpoints.contains(e))
        })
        .cloned()
        .collect();
    if !busy.is_empty() {
        return Err(ReplayError::InProgress(busy));
    }
    let round = herald_core::ids::redelivery_id();
    let request = ReplayRequest::new(
        user.clone(),
        task.clone(),
        targets.clone(),
        round.clone(),
        RedeliveryCause::Redeliver,
    );
    broker
        .publish_all(vec![Outgoing::replay_request(&request)])
        .await?;
    Ok(Redelivered {
        redelivery: round,
        endpoints: targets,
    })
}

/// What a recover call queued.
#[derive(Debug, Clone, Default)]
pub struct Recovered {
    /// Tasks whose delivery was queued again, in the order they failed.
    pub tasks: Vec<TaskId>,
    /// Recoverable deliveries queued by an identical call moments before.
    pub already_queued: usize,
    /// Recoverable deliveries whose task record has expired.
    pub expired: usize,
    /// Recoverable deliveries whose task record cannot be read (logged):
    /// skipped, so one bad record does not stop the others.
    pub unreadable: Vec<TaskId>,
    /// Set when [`RECOVER_LIMIT`] tasks were examined before the end of
    /// the history: call again from this time for the rest.
    pub next_since_ms: Option<u64>,
}

/// Re-sends every delivery to `endpoint` whose latest round, as recorded
/// since `since_ms`, ended without the endpoint accepting it (exhausted,
/// gone, abandoned or held). Refused while the endpoint is disabled.
pub async fn recover(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
    since_ms: u64,
) -> Result<Recovered, ReplayError> {
    if !endpoints::exists(broker, user, endpoint).await? {
        return Err(ReplayError::EndpointNotFound(endpoint.to_string()));
    }
    if health::read(broker, user, endpoint)
        .await?
        .is_some_and(|h| h.disabled)
    {
        return Err(ReplayError::Disabled);
    }
    Ok(recover_since(broker, user, endpoint, since_ms).await?)
}

/// What enabling an endpoint did.
#[derive(Debug, Clone)]
pub struct Enabled {
    /// False when the endpoint was not disabled: nothing was changed.
    pub was_disabled: bool,
    /// The time the recovery of held deliveries started from, and its
    /// result.
    pub recovered: Option<(u64, Recovered)>,
}

/// Clears an endpoint's disabled flag (and its failure streak), then
/// recovers what failed or was held since shortly before it was disabled.
/// The flag is cleared first, so that what is re-sent is not held again;
/// when the recovery fails, the endpoint is disabled again as it was, so
/// the call can simply be repeated.
pub async fn enable(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
) -> Result<Enabled, ReplayError> {
    if !endpoints::exists(broker, user, endpoint).await? {
        return Err(ReplayError::EndpointNotFound(endpoint.to_string()));
    }
    let Some(disabled) = clear_disabled(broker, user, endpoint).await? else {
        return Ok(Enabled {
            was_disabled: false,
            recovered: None,
        });
    };
    let disabled_at = disabled
        .disabled_at_ms
        .or(disabled.failing_since_ms)
        .unwrap_or_else(herald_core::now_ms);
    let since = disabled_at.saturating_sub(HELD_BEFORE_DISABLED.as_millis() as u64);
    let recovered = match recover_since(broker, user, endpoint, since).await {
        Ok(recovered) => recovered,
        Err(e) => {
            tracing::warn!(%user, %endpoint, error = %e, "recovery after enabling failed; disabling the endpoint again");
            if let Err(restore) = restore_disabled(broker, user, endpoint, &disabled).await {
                tracing::error!(%user, %endpoint, error = %restore, "could not disable the endpoint again after a failed enable");
            }
            return Err(e.into());
        }
    };
    Ok(Enabled {
        was_disabled: true,
        recovered: Some((since, recovered)),
    })
}

/// Writes the health record without the disabled flag and failure streak
/// ([`EndpointHealth::enabled`]), compare-and-set, so a worker's
/// concurrent merge is not lost. Returns the record as it was when it was
/// disabled, or `None` when it was not.
async fn clear_disabled(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
) -> Result<Option<EndpointHealth>, QueueError> {
    let cleared = health::update(broker, user, endpoint, |stored| {
        let before = stored.filter(|h| h.disabled)?;
        Some((before.enabled(), before))
    })
    .await?;
    Ok(cleared.map(|written| written.outcome))
}

/// Puts back the disabled state `before` (as [`clear_disabled`] found
/// it) onto the current health record, keeping what workers wrote since.
async fn restore_disabled(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
    before: &EndpointHealth,
) -> Result<(), QueueError> {
    health::update(broker, user, endpoint, |stored| {
        let current = stored.unwrap_or_else(|| before.clone());
        Some((current.disabled_again(before), ()))
    })
    .await?;
    Ok(())
}

/// The events of one task's delivery to the endpoint being recovered.
struct Candidate {
    task: TaskId,
    events: Vec<TaskEvent>,
    /// Stream sequence of the latest of them: names the recovery round, so
    /// two identical calls queue one round (same `Nats-Msg-Id`s).
    last_sequence: u64,
}

async fn recover_since(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
    since_ms: u64,
) -> Result<Recovered, QueueError> {
    let (candidates, next_since_ms) = read_deliveries(broker, user, endpoint, since_ms).await?;
    let failed: Vec<_> = candidates
        .into_iter()
        .filter(|c| endpoint_state(endpoint, &c.events).is_recoverable())
        .collect();
    // Owned inputs: a stream of futures borrowing the candidates trips the
    // compiler's higher-ranked lifetime inference in axum handlers.
    let tasks: Vec<TaskId> = failed.iter().map(|c| c.task.clone()).collect();
    let records: Vec<Option<Record>> = stream::iter(tasks)
        .map(|task| {
            let broker = broker.clone();
            async move { history::task_record(&broker, &task).await }
        })
        .buffered(16)
        .try_collect()
        .await?;
    let mut recovered = Recovered {
        next_since_ms,
        ..Default::default()
    };
    let mut requests = Vec::new();
    for (candidate, record) in failed.iter().zip(&records) {
        match record {
            Some(Record::Readable(record)) if &record.user == user => {
                requests.push(ReplayRequest::new(
                    user.clone(),
                    record.id.clone(),
                    vec![endpoint.clone()],
                    format!("rc-{}", candidate.last_sequence),
                    RedeliveryCause::Recover,
                ))
            }
            // The history is the user's (its subjects name them), so the
            // task is, even when its owner cannot be read from the record.
            Some(Record::Unreadable(_)) => recovered.unreadable.push(candidate.task.clone()),
            _ => recovered.expired += 1,
        }
    }
    for chunk in requests.chunks(256) {
        let acks = broker
            .publish_all(chunk.iter().map(Outgoing::replay_request).collect())
            .await?;
        for (request, ack) in chunk.iter().zip(acks) {
            // A duplicate: an identical call (same history, so the same
            // round and `Nats-Msg-Id`) stored it moments before.
            if ack.duplicate {
                recovered.already_queued += 1;
            } else {
                recovered.tasks.push(request.task.clone());
            }
        }
    }
    Ok(recovered)
}

/// Reads the user's history from `since_ms` up to the stream's end at the
/// time of the call, keeping the events about `endpoint` per task. Stops
/// taking new tasks after [`RECOVER_LIMIT`] (but still follows the ones it
/// took to the end), and then returns the time to continue from.
async fn read_deliveries(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
    since_ms: u64,
) -> Result<(Vec<Candidate>, Option<u64>), QueueError> {
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut index: HashMap<TaskId, usize> = HashMap::new();
    let mut next_since_ms = None;
    history::user_events_since(broker, user, since_ms, |sequence, event| {
        if event.event.endpoint() != endpoint {
            return;
        }
        match index.get(&event.task) {
            Some(&i) => {
                candidates[i].events.push(event.event);
                candidates[i].last_sequence = sequence;
            }
            None if candidates.len() < RECOVER_LIMIT => {
                index.insert(event.task.clone(), candidates.len());
                candidates.push(Candidate {
                    task: event.task,
                    events: vec![event.event],
                    last_sequence: sequence,
                });
            }
            None => {
                next_since_ms.get_or_insert(event.event.at_ms());
            }
        }
    })
    .await?;
    Ok((candidates, next_since_ms))
}
