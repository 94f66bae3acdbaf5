//! `herald-endpoint-health` as storage: reading an endpoint's record,
//! writing it with compare-and-set, and following which endpoints are
//! disabled.
//!
//! What a record should say is decided elsewhere: the policy in
//! [`herald_core::health`], applied by the webhook workers
//! (`herald_worker::webhooks::health`, which fold outcomes and flush them
//! here) and by the API's enable call. Several workers merge into the same
//! record, so every write is a compare-and-set on the KV revision.

use std::{
    collections::HashSet,
    sync::{Arc, RwLock},
};

use async_nats::jetstream::kv;
use herald_core::{
    EndpointId, UserId, names,
    payload::{EndpointHealth, decode, encode},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{Broker, QueueError, buckets::Bucket, cas, kv_follow};

/// Reads an endpoint's health record; one that does not decode reads as
/// none.
pub async fn read(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
) -> Result<Option<EndpointHealth>, QueueError> {
    let value = broker
        .bucket(Bucket::Health)
        .await?
        .get(names::endpoint_key(user, endpoint))
        .await
        .map_err(|e| QueueError::request("read endpoint health", e))?;
    Ok(value.and_then(|bytes| decode(&bytes).ok()))
}

/// What a successful [`update`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct Updated<T> {
    /// What `change` returned with the record that was written.
    pub outcome: T,
    /// The revision the write replaced (0: the record was new). Only one
    /// write can replace a given revision, so it names the change.
    pub base_revision: u64,
}

/// Writes an endpoint's record as `change` says: it is given the record as
/// stored (`None`: absent, deleted, or unreadable) and returns the record
/// to write with what to report, or `None` to leave it alone. The write is
/// at the revision read; when another writer came first, `change` is
/// called again with theirs.
pub async fn update<T>(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
    mut change: impl FnMut(Option<EndpointHealth>) -> Option<(EndpointHealth, T)>,
) -> Result<Option<Updated<T>>, QueueError> {
    let bucket = broker.bucket(Bucket::Health).await?;
    let key = names::endpoint_key(user, endpoint);
    for _ in 0..10 {
        let current = bucket
            .entry(&key)
            .await
            .map_err(|e| QueueError::request("read endpoint health", e))?;
        let stored = current
            .as_ref()
            .filter(|entry| entry.operation == kv::Operation::Put)
            .and_then(|entry| decode::<EndpointHealth>(&entry.value).ok());
        let Some((health, outcome)) = change(stored) else {
            return Ok(None);
        };
        let revision = current.as_ref().map(|entry| entry.revision);
        let value = encode(&health).into();
        if cas::write_at(&bucket, &key, value, revision, "write endpoint health").await? {
            return Ok(Some(Updated {
                outcome,
                base_revision: revision.unwrap_or(0),
            }));
        }
        // Another writer came first: decide again on their record.
    }
    Err(QueueError::request(
        "write endpoint health",
        "too many concurrent writers",
    ))
}

/// The endpoints the bucket has disabled, kept current by a watch.
#[derive(Debug, Clone, Default)]
pub struct DisabledEndpoints {
    keys: Arc<RwLock<HashSet<String>>>,
}

impl DisabledEndpoints {
    /// Follows the bucket, on `tasks`, until `stop`.
    pub fn follow_on(tasks: &TaskTracker, broker: Broker, stop: CancellationToken) -> Self {
        let disabled = Self::default();
        tasks.spawn(kv_follow::follow(
            broker,
            Bucket::Health,
            "disabled endpoints",
            disabled.clone(),
            stop,
        ));
        disabled
    }

    pub fn contains(&self, user: &UserId, endpoint: &EndpointId) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&names::endpoint_key(user, endpoint))
    }

    /// Marks an endpoint disabled in this process at once (it answered 410
    /// here, or this process's write disabled it), before the watch tells.
    pub fn insert(&self, user: &UserId, endpoint: &EndpointId) {
        self.write().insert(names::endpoint_key(user, endpoint));
    }

    /// Forgets the mark (the bucket says it is enabled again).
    pub fn remove(&self, user: &UserId, endpoint: &EndpointId) {
        self.write().remove(&names::endpoint_key(user, endpoint));
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<String>> {
        self.keys.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl kv_follow::Follower for DisabledEndpoints {
    type View = HashSet<String>;

    fn fold(&self, view: &mut HashSet<String>, entry: &kv::Entry) {
        mark(view, entry);
    }

    fn caught_up(&self, view: HashSet<String>) {
        *self.write() = view;
    }

    fn changed(&self, entry: &kv::Entry) {
        mark(&mut self.write(), entry);
    }
}

fn mark(set: &mut HashSet<String>, entry: &kv::Entry) {
    let disabled = entry.operation == kv::Operation::Put
        && decode::<EndpointHealth>(&entry.value).is_ok_and(|h| h.disabled);
    if disabled {
        set.insert(entry.key.clone());
    } else {
        set.remove(&entry.key);
    }
}
