//! Endpoint health in `herald-endpoint-health`, kept by the webhook workers.
//!
//! Writing the record on every delivery would add a publish to the hot path.
//! Instead each worker folds outcomes into a local summary per endpoint and
//! flushes it at most once per interval, and at once when an endpoint turns
//! from healthy to failing or back. Several workers merge into the same
//! record with compare-and-set on the KV revision.

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::jetstream::kv::{self, UpdateErrorKind};
use herald_core::{
    EndpointId, UserId, names,
    payload::{EndpointHealth, VERSION, decode, encode},
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{Broker, QueueError};

/// Outcomes seen by this process since the last flush.
#[derive(Debug, Default, Clone)]
struct Pending {
    /// A success was seen since the last flush.
    succeeded: bool,
    last_success_ms: Option<u64>,
    /// Failures after the last success seen here (or since the flush).
    failures: u64,
    first_failure_ms: Option<u64>,
    last_failure_ms: Option<u64>,
    last_error: Option<String>,
}

impl Pending {
    fn merge_into(&self, mut health: EndpointHealth) -> EndpointHealth {
        health.v = VERSION;
        if self.succeeded {
            health.last_success_ms = health.last_success_ms.max(self.last_success_ms);
            health.consecutive_failures = self.failures;
            health.failing_since_ms = self.first_failure_ms;
        } else {
            health.consecutive_failures += self.failures;
            health.failing_since_ms = health.failing_since_ms.or(self.first_failure_ms);
        }
        if self.last_failure_ms.is_some() {
            health.last_failure_ms = health.last_failure_ms.max(self.last_failure_ms);
            health.last_error = self.last_error.clone();
        }
        health
    }
}

/// Folds delivery outcomes and flushes them to the health bucket.
#[derive(Clone)]
pub struct HealthTracker {
    pending: Arc<std::sync::Mutex<HashMap<String, Pending>>>,
    /// The last state this process wrote per endpoint: true when failing.
    failing: Arc<std::sync::Mutex<HashMap<String, bool>>>,
    flush_now: Arc<Notify>,
}

impl HealthTracker {
    /// Starts the flusher; it flushes a last time when `shutdown` fires.
    pub fn start(broker: Broker, interval: Duration, shutdown: CancellationToken) -> Self {
        let tracker = Self {
            pending: Arc::default(),
            failing: Arc::default(),
            flush_now: Arc::new(Notify::new()),
        };
        let flusher = tracker.clone();
        tokio::spawn(async move {
            loop {
                let stopping = tokio::select! {
                    _ = shutdown.cancelled() => true,
                    _ = tokio::time::sleep(interval) => false,
                    _ = flusher.flush_now.notified() => false,
                };
                flusher.flush(&broker).await;
                if stopping {
                    break;
                }
            }
        });
        tracker
    }

    pub fn record_success(&self, user: &UserId, endpoint: &EndpointId, at_ms: u64) {
        let key = names::endpoint_key(user, endpoint);
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let p = pending.entry(key.clone()).or_default();
            p.succeeded = true;
            p.last_success_ms = Some(at_ms);
            p.failures = 0;
            p.first_failure_ms = None;
        }
        self.flush_if_turned(&key, false);
    }

    pub fn record_failure(&self, user: &UserId, endpoint: &EndpointId, at_ms: u64, error: &str) {
        let key = names::endpoint_key(user, endpoint);
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let p = pending.entry(key.clone()).or_default();
            p.failures += 1;
            p.first_failure_ms.get_or_insert(at_ms);
            p.last_failure_ms = Some(at_ms);
            p.last_error = Some(error.chars().take(500).collect());
        }
        self.flush_if_turned(&key, true);
    }

    fn flush_if_turned(&self, key: &str, failing: bool) {
        let turned = {
            let mut states = self.failing.lock().unwrap_or_else(|p| p.into_inner());
            states.insert(key.to_string(), failing) != Some(failing)
        };
        if turned {
            self.flush_now.notify_one();
        }
    }

    async fn flush(&self, broker: &Broker) {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return;
        }
        let bucket = match broker.jetstream.get_key_value(names::HEALTH_BUCKET).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "health bucket unavailable; keeping outcomes for the next flush");
                self.restore(batch);
                return;
            }
        };
        let mut unwritten = HashMap::new();
        for (key, pending) in batch {
            if let Err(e) = merge(&bucket, &key, &pending).await {
                tracing::warn!(key, error = %e, "could not update endpoint health");
                unwritten.insert(key, pending);
            }
        }
        self.restore(unwritten);
    }

    /// Puts unflushed outcomes back, under any that arrived meanwhile.
    fn restore(&self, batch: HashMap<String, Pending>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (key, older) in batch {
            match pending.remove(&key) {
                None => {
                    pending.insert(key, older);
                }
                Some(newer) => {
                    let merged = if newer.succeeded {
                        newer
                    } else {
                        Pending {
                            failures: older.failures + newer.failures,
                            first_failure_ms: older.first_failure_ms.or(newer.first_failure_ms),
                            last_failure_ms: newer.last_failure_ms,
                            last_error: newer.last_error,
                            ..older
                        }
                    };
                    pending.insert(key, merged);
                }
            }
        }
    }
}

/// Compare-and-set loop: read the record, fold `pending` in, write it back
/// at the revision read; on a concurrent write, read again.
async fn merge(bucket: &kv::Store, key: &str, pending: &Pending) -> Result<(), QueueError> {
    for _ in 0..5 {
        let current = bucket
            .entry(key)
            .await
            .map_err(|e| QueueError::request("read endpoint health", e))?;
        let (health, revision) = match &current {
            Some(entry) if entry.operation == kv::Operation::Put => (
                decode::<EndpointHealth>(&entry.value).unwrap_or_default(),
                Some(entry.revision),
            ),
            Some(entry) => (EndpointHealth::default(), Some(entry.revision)),
            None => (EndpointHealth::default(), None),
        };
        let value = encode(&pending.merge_into(health));
        let written = match revision {
            Some(revision) => bucket
                .update(key, value.into(), revision)
                .await
                .map(|_| ())
                .map_err(|e| e.kind() == UpdateErrorKind::WrongLastRevision),
            None => bucket
                .create(key, value.into())
                .await
                .map(|_| ())
                .map_err(|e| e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists),
        };
        match written {
            Ok(()) => return Ok(()),
            Err(true) => continue, // another worker wrote first: merge again
            Err(false) => return Err(QueueError::request("write endpoint health", key)),
        }
    }
    Err(QueueError::request(
        "write endpoint health",
        "too many concurrent writers",
    ))
}

/// Reads an endpoint's health record.
pub async fn read(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
) -> Result<Option<EndpointHealth>, QueueError> {
    let bucket = broker
        .jetstream
        .get_key_value(names::HEALTH_BUCKET)
        .await
        .map_err(|e| QueueError::request("open health bucket", e))?;
    let value = bucket
        .get(names::endpoint_key(user, endpoint))
        .await
        .map_err(|e| QueueError::request("read endpoint health", e))?;
    Ok(value.and_then(|bytes| decode(&bytes).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_resets_failures_and_failures_accumulate() {
        let stored = EndpointHealth {
            v: 1,
            consecutive_failures: 4,
            failing_since_ms: Some(10),
            ..Default::default()
        };
        let more_failures = Pending {
            failures: 2,
            first_failure_ms: Some(50),
            last_failure_ms: Some(60),
            last_error: Some("503".into()),
            ..Default::default()
        };
        let merged = more_failures.merge_into(stored.clone());
        assert_eq!(merged.consecutive_failures, 6);
        assert_eq!(merged.failing_since_ms, Some(10));
        assert_eq!(merged.last_error.as_deref(), Some("503"));

        let recovered = Pending {
            succeeded: true,
            last_success_ms: Some(70),
            ..Default::default()
        };
        let merged = recovered.merge_into(stored);
        assert_eq!(merged.consecutive_failures, 0);
        assert_eq!(merged.failing_since_ms, None);
        assert_eq!(merged.last_success_ms, Some(70));
    }
}
