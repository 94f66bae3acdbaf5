//! Endpoint records in `herald-endpoints`: writing and removing them (the
//! operator, `herald dev` and `herald endpoints`), and the bounded cache
//! the workers read them through ([`EndpointCache`]).

mod cache;

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::kv;
pub use cache::{EndpointCache, Found, UserEndpoints};
use futures::StreamExt;
use herald_core::{
    EndpointId, UserId,
    endpoint_secrets::{RecordError, open_record, seal_record},
    keyring::Keyring,
    names,
    payload::EndpointConfig,
};

use crate::{Broker, QueueError, buckets::Bucket, cas};

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
