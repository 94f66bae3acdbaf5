//! The local cache of `herald-endpoints`, fed by a KV watch.
//!
//! Workers look endpoints up here, so a delivery needs no round trip for
//! configuration. The first load completes before [`EndpointCache::start`]
//! returns ready; when the watch breaks (a NATS restart), it is re-created
//! and the cache rebuilt from the bucket's current contents, so deletes made
//! while it was down are not missed.
//!
//! Records are sealed with the [`Keyring`] (see
//! [`herald_core::endpoint_secrets`]). One that cannot be opened (a key
//! missing from this process's keyring, a record written in clear or
//! altered) is logged as an error and listed by
//! [`EndpointCache::unreadable`]; if an earlier version of it was readable,
//! that version stays in use rather than the endpoint vanishing.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use async_nats::jetstream::kv::{self, Operation};
use futures::StreamExt;
use herald_core::{
    EndpointId, UserId,
    endpoint_secrets::{OpenedRecord, RecordError, open_record, seal_record},
    keyring::Keyring,
    names,
    payload::EndpointConfig,
};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{Broker, QueueError, buckets::Bucket, cas, kv_follow};

#[derive(Debug, Default, Clone)]
struct Endpoints {
    by_user: HashMap<UserId, Vec<Arc<EndpointConfig>>>,
    /// Keys whose record could not be read, with the reason.
    unreadable: BTreeMap<String, String>,
}

/// A shared, always-current view of every endpoint.
#[derive(Clone)]
pub struct EndpointCache {
    endpoints: Arc<std::sync::RwLock<Endpoints>>,
    loaded: watch::Receiver<bool>,
}

impl EndpointCache {
    /// Starts watching the bucket, on `tasks`, until `shutdown`. Use
    /// [`Self::wait_loaded`] before relying on the contents.
    pub fn start(
        tasks: &TaskTracker,
        broker: Broker,
        keyring: Arc<Keyring>,
        shutdown: CancellationToken,
    ) -> Self {
        let (loaded_tx, loaded) = watch::channel(false);
        let cache = Self {
            endpoints: Arc::default(),
            loaded,
        };
        let follower = CacheFollower {
            shared: cache.endpoints.clone(),
            keyring,
            loaded: loaded_tx,
        };
        tasks.spawn(kv_follow::follow(
            broker,
            Bucket::Endpoints,
            "endpoint cache",
            follower,
            shutdown,
        ));
        cache
    }

    /// Waits until the first full load of the bucket is in the cache.
    pub async fn wait_loaded(&self) {
        let mut loaded = self.loaded.clone();
        let _ = loaded.wait_for(|loaded| *loaded).await;
    }

    /// Every endpoint of `user`, in a stable order.
    pub fn for_user(&self, user: &UserId) -> Vec<Arc<EndpointConfig>> {
        self.read().by_user.get(user).cloned().unwrap_or_default()
    }

    pub fn get(&self, user: &UserId, endpoint: &EndpointId) -> Option<Arc<EndpointConfig>> {
        self.read()
            .by_user
            .get(user)
            .and_then(|list| list.iter().find(|e| &e.id == endpoint).cloned())
    }

    /// Records that could not be read (`<user>.<endpoint>` and why), such
    /// as one sealed under a key this process's keyring does not hold.
    pub fn unreadable(&self) -> BTreeMap<String, String> {
        self.read().unreadable.clone()
    }

    /// An endpoint of `user` whose record cannot be read and of which no
    /// earlier version is cached, with why; `None` in the normal case, at
    /// the cost of one lookup in an empty map.
    pub fn unreadable_for(&self, user: &UserId) -> Option<(String, String)> {
        let map = self.read();
        if map.unreadable.is_empty() {
            return None;
        }
        let prefix = format!("{user}.");
        let cached = map.by_user.get(user);
        map.unreadable
            .iter()
            .filter(|(key, _)| key.starts_with(&prefix))
            .find(|(key, _)| {
                !cached.is_some_and(|endpoints| {
                    endpoints
                        .iter()
                        .any(|e| names::endpoint_key(&e.user, &e.id) == **key)
                })
            })
            .map(|(key, why)| (key.clone(), why.clone()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Endpoints> {
        self.endpoints
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Keeps an [`EndpointCache`] true to the bucket.
struct CacheFollower {
    shared: Arc<std::sync::RwLock<Endpoints>>,
    keyring: Arc<Keyring>,
    loaded: watch::Sender<bool>,
}

impl kv_follow::Follower for CacheFollower {
    type View = Endpoints;

    fn fold(&self, view: &mut Endpoints, entry: &kv::Entry) {
        apply(view, &self.keyring, entry);
    }

    fn caught_up(&self, view: Endpoints) {
        let count: usize = view.by_user.values().map(Vec::len).sum();
        tracing::info!(
            endpoints = count,
            unreadable = view.unreadable.len(),
            "endpoint cache loaded"
        );
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = view;
        self.loaded.send_replace(true);
    }

    fn changed(&self, entry: &kv::Entry) {
        let mut map = self.shared.write().unwrap_or_else(|p| p.into_inner());
        apply(&mut map, &self.keyring, entry);
    }
}

fn apply(map: &mut Endpoints, keyring: &Keyring, entry: &kv::Entry) {
    let Some((user, endpoint)) = names::parse_endpoint_key(&entry.key) else {
        tracing::warn!(
            key = entry.key,
            "ignoring endpoint key that is not <user>.<endpoint> with valid tokens"
        );
        return;
    };
    let list = map.by_user.entry(user.clone()).or_default();
    if entry.operation != Operation::Put {
        list.retain(|e| e.id != endpoint);
        map.unreadable.remove(&entry.key);
    } else {
        match open_record(&entry.key, &entry.value, keyring) {
            Ok(OpenedRecord { config, .. }) => {
                list.retain(|e| e.id != endpoint);
                list.push(Arc::new(config));
                list.sort_by(|a, b| a.id.cmp(&b.id));
                map.unreadable.remove(&entry.key);
            }
            Err(e) => {
                let kept = list.iter().any(|e| e.id == endpoint);
                tracing::error!(
                    key = entry.key,
                    reason = e.label(),
                    error = %e,
                    kept_previous_version = kept,
                    "cannot read endpoint record"
                );
                map.unreadable.insert(entry.key.clone(), e.to_string());
            }
        }
    }
    if list.is_empty() {
        map.by_user.remove(&user);
    }
}

/// How endpoint records are written: sealed under the keyring's primary
/// key, and with a replaced signing secret signing on for
/// `rotation_overlap`.
#[derive(Debug, Clone)]
pub struct RecordWriter {
    pub keyring: Arc<Keyring>,
    pub rotation_overlap: Duration,
}

/// What writing an endpoint record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    /// Created, or replaced by the new config.
    Written,
    /// The bucket already held the same config sealed under the primary key.
    Unchanged,
    /// The key holds another writer's record (its `owner`); nothing was
    /// written.
    OwnedElsewhere { owner: String },
}

/// Writes an endpoint record (the operator, `herald dev` and `herald
/// endpoints` do) unless the bucket already holds the same config sealed
/// under the primary key, or a record another writer owns.
///
/// Ownership: a stored record naming an owner other than `config.owner` is
/// never replaced. A stored record naming none (written before records had
/// owners) is adopted: the key is derived from the writer's own identity
/// (for a resource, its namespace and name), so nobody else could have
/// written it through Herald. A stored record this keyring cannot open is
/// replaced, as before owners: its owner cannot be read, and replacing it
/// is how a lost key is recovered from.
///
/// The stored record is read first: the secrets it signs with carry over
/// into the new one for the rotation overlap, and replaced secrets whose
/// overlap ended are dropped. Configs are compared decrypted, since every
/// seal uses a fresh nonce; a record sealed under an older key is rewritten
/// even when unchanged, which is how a key rotation re-encrypts the bucket.
/// Periodic resyncs therefore write only what changed, and an unchanged
/// write would wake every worker's watch for nothing.
pub async fn put(
    broker: &Broker,
    writer: &RecordWriter,
    config: &EndpointConfig,
) -> Result<Put, QueueError> {
    let bucket = broker.bucket(Bucket::Endpoints).await?;
    let key = names::endpoint_key(&config.user, &config.id);
    // Compare-and-set on the revision read: the operator and `herald
    // endpoints` may write the same record, and a blind put could drop a
    // secret still inside its rotation overlap, or replace a record whose
    // owner changed since it was read.
    for _ in 0..10 {
        let current = bucket
            .entry(&key)
            .await
            .map_err(|e| QueueError::request("read endpoint", e))?
            .filter(|entry| entry.operation == kv::Operation::Put);
        let stored = match current
            .as_ref()
            .map(|entry| open_record(&key, &entry.value, &writer.keyring))
        {
            None => None,
            Some(Ok(opened)) => Some(opened),
            Some(Err(e)) => {
                warn_unreadable_replaced(&key, &e);
                None
            }
        };
        if let Some(owner) = stored
            .as_ref()
            .and_then(|s| foreign_owner(&s.config, config.owner.as_deref()))
        {
            return Ok(Put::OwnedElsewhere { owner });
        }
        let mut wanted = config.clone();
        wanted.carry_over_secrets(
            stored.as_ref().map(|s| &s.config),
            herald_core::now_ms(),
            writer.rotation_overlap,
        );
        let primary = writer.keyring.primary().id();
        if let Some(stored) = &stored {
            if stored.config == wanted && stored.kid == primary {
                return Ok(Put::Unchanged);
            }
            if stored.config.owner.is_none() {
                tracing::info!(key, owner = ?wanted.owner, "adopting an endpoint record written without an owner");
            }
            if stored.kid != primary {
                tracing::info!(
                    key,
                    from = stored.kid,
                    to = primary,
                    "re-encrypting endpoint record"
                );
            }
        }
        let sealed = seal_record(&wanted, &writer.keyring).into();
        let revision = current.as_ref().map(|entry| entry.revision);
        if cas::write_at(&bucket, &key, sealed, revision, "put endpoint").await? {
            return Ok(Put::Written);
        }
        // Another writer came first: read its record and decide again.
    }
    Err(QueueError::request(
        "put endpoint",
        "too many concurrent writers",
    ))
}

/// [`put`] for writers that own every record they write (tests, tools):
/// true when it wrote; a record owned elsewhere is an error.
pub async fn put_if_changed(
    broker: &Broker,
    writer: &RecordWriter,
    config: &EndpointConfig,
) -> Result<bool, QueueError> {
    match put(broker, writer, config).await? {
        Put::Written => Ok(true),
        Put::Unchanged => Ok(false),
        Put::OwnedElsewhere { owner } => Err(QueueError::request(
            "put endpoint",
            format!(
                "{} belongs to {owner}",
                names::endpoint_key(&config.user, &config.id)
            ),
        )),
    }
}

/// The owner of `stored` when it is someone other than `writer`; `None`
/// when `writer` may replace or remove it (its own, or no owner recorded).
fn foreign_owner(stored: &EndpointConfig, writer: Option<&str>) -> Option<String> {
    match stored.owner.as_deref() {
        Some(owner) if Some(owner) != writer => Some(owner.to_string()),
        _ => None,
    }
}

/// What removing an endpoint record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    Removed,
    /// There was no record under the key.
    Absent,
    /// The key holds another writer's record; it was left alone.
    OwnedElsewhere {
        owner: String,
    },
}

/// Removes the record under `<user>.<endpoint>` if `owner` may (see
/// [`put`]: its own, one without an owner, or one this keyring cannot
/// open), at the revision whose owner was checked.
pub async fn remove_owned(
    broker: &Broker,
    keyring: &Keyring,
    user: &UserId,
    endpoint: &EndpointId,
    owner: &str,
) -> Result<Removed, QueueError> {
    let bucket = broker.bucket(Bucket::Endpoints).await?;
    let key = names::endpoint_key(user, endpoint);
    for _ in 0..10 {
        let Some(entry) = bucket
            .entry(&key)
            .await
            .map_err(|e| QueueError::request("read endpoint", e))?
            .filter(|entry| entry.operation == kv::Operation::Put)
        else {
            return Ok(Removed::Absent);
        };
        if let Ok(opened) = open_record(&key, &entry.value, keyring)
            && let Some(theirs) = foreign_owner(&opened.config, Some(owner))
        {
            return Ok(Removed::OwnedElsewhere { owner: theirs });
        }
        match bucket
            .delete_expect_revision(&key, Some(entry.revision))
            .await
        {
            Ok(()) => return Ok(Removed::Removed),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
            Err(e) => return Err(QueueError::request("delete endpoint", e)),
        }
    }
    Err(QueueError::request(
        "delete endpoint",
        "too many concurrent writers",
    ))
}

/// The users under whom the bucket holds a record for `endpoint` (keys
/// `*.<endpoint>`), found by the server from its subjects, without
/// listing the whole bucket.
pub async fn users_of(broker: &Broker, endpoint: &EndpointId) -> Result<Vec<UserId>, QueueError> {
    let bucket = broker.bucket(Bucket::Endpoints).await?;
    let filter = format!("{}{}", bucket.prefix, names::endpoint_keys_named(endpoint));
    let mut subjects = bucket
        .stream
        .info_with_subjects(&filter)
        .await
        .map_err(|e| QueueError::request("list endpoint keys", e))?;
    let mut users = Vec::new();
    while let Some(subject) = subjects.next().await {
        let (subject, _) = subject.map_err(|e| QueueError::request("list endpoint keys", e))?;
        let user = subject
            .strip_prefix(bucket.prefix.as_str())
            .and_then(names::parse_endpoint_key)
            .map(|(user, _)| user);
        // A subject whose last message is a delete marker is listed too;
        // the caller reads the entry anyway.
        if let Some(user) = user {
            users.push(user);
        }
    }
    users.sort();
    users.dedup();
    Ok(users)
}

/// Whether the bucket holds a record for the endpoint. Records are sealed
/// and the API has no keyring: presence is what it can know, and all it
/// needs to tell an endpoint from a mistyped id.
pub async fn exists(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
) -> Result<bool, QueueError> {
    if !broker.is_connected() {
        return Err(QueueError::Disconnected);
    }
    let bucket = broker.bucket(Bucket::Endpoints).await?;
    let value = bucket
        .get(names::endpoint_key(user, endpoint))
        .await
        .map_err(|e| QueueError::request("read endpoint", e))?;
    Ok(value.is_some())
}

fn warn_unreadable_replaced(key: &str, error: &RecordError) {
    tracing::warn!(
        key,
        reason = error.label(),
        %error,
        "replacing an endpoint record this keyring cannot read; a secret rotation in progress in it ends now"
    );
}

/// Removes an endpoint record.
pub async fn delete(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
) -> Result<(), QueueError> {
    let bucket = broker.bucket(Bucket::Endpoints).await?;
    bucket
        .delete(names::endpoint_key(user, endpoint))
        .await
        .map_err(|e| QueueError::request("delete endpoint", e))
}

/// Keys of every endpoint in the bucket.
pub async fn keys(broker: &Broker) -> Result<Vec<String>, QueueError> {
    let bucket = broker.bucket(Bucket::Endpoints).await?;
    let mut keys = bucket
        .keys()
        .await
        .map_err(|e| QueueError::request("list endpoints", e))?;
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        out.push(key.map_err(|e| QueueError::request("list endpoints", e))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned_by(owner: Option<&str>) -> EndpointConfig {
        serde_json::from_value(serde_json::json!({
            "v": herald_core::payload::VERSION, "user": "alice", "id": "team-a_hook",
            "url": "https://example.com/hook", "secrets": [], "owner": owner,
        }))
        .unwrap()
    }

    #[test]
    fn only_another_owner_keeps_a_writer_out() {
        let mine = "kubernetes:team-a/hook";
        // Its own record, and one from before owners (adopted).
        assert_eq!(foreign_owner(&owned_by(Some(mine)), Some(mine)), None);
        assert_eq!(foreign_owner(&owned_by(None), Some(mine)), None);
        // Someone else's, whoever asks.
        for writer in [Some(mine), Some("kubernetes:team-b/hook"), None] {
            assert_eq!(
                foreign_owner(&owned_by(Some("herald-file")), writer).as_deref(),
                Some("herald-file"),
                "{writer:?}"
            );
        }
    }
}
