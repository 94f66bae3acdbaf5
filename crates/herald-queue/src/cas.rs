//! Compare-and-set writes to a KV bucket, for records several processes
//! update: read the entry, decide, write at the revision read, and on a
//! conflict read again.

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use bytes::Bytes;

use crate::QueueError;

/// Writes `value` to `key` if the key is still at `revision`, or, with
/// `None`, does not exist yet. `Ok(false)`: another writer came first.
pub(crate) async fn write_at(
    bucket: &kv::Store,
    key: &str,
    value: Bytes,
    revision: Option<u64>,
    operation: &'static str,
) -> Result<bool, QueueError> {
    let conflict = match revision {
        Some(revision) => match bucket.update(key, value, revision).await {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => true,
            Err(e) => return Err(QueueError::request(operation, e)),
        },
        None => match bucket.create(key, value).await {
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => true,
            Err(e) => return Err(QueueError::request(operation, e)),
        },
    };
    Ok(!conflict)
}
