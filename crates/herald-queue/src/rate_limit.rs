//! Per-endpoint rate limits shared by every webhook worker.
//!
//! A generic cell rate algorithm (GCRA) over one KV entry per endpoint in
//! `herald-rate-limits`: the entry holds the earliest time (unix µs) the
//! next request may start. Reserving reads it, takes `max(entry, now)` as
//! this request's slot, and writes `slot + 1/rate` back with
//! compare-and-set, so replicas hand out slots in one sequence however many
//! there are. A slot in the future is not waited for in a worker: the
//! delivery is deferred to it (see the webhook worker), so a limited
//! endpoint's backlog holds no worker. Slots are spaced exactly `1/rate`
//! apart, with no burst allowance; requests start at their slot or a little
//! later (a deferred one that arrives more than a second late reserves
//! again), so over any window longer than a second the limit holds.
//!
//! Within a process, reservations for the same endpoint queue on a lock, so
//! only replicas, not hundreds of tasks, contend on the revision. Clocks of
//! the replicas are assumed to agree to a few milliseconds (NTP).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{Broker, QueueError, buckets::Bucket, cas};
use async_nats::jetstream::kv;

pub struct RateLimiter {
    broker: Broker,
    endpoint_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl RateLimiter {
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            endpoint_locks: Mutex::default(),
        }
    }

    /// Reserves the next slot of `key` under `per_second`; returns when the
    /// request may start (unix ms), now or later.
    pub async fn reserve(&self, key: &str, per_second: u32) -> Result<u64, QueueError> {
        let interval_us = 1_000_000 / u64::from(per_second.max(1));
        let lock = self
            .endpoint_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone();
        let _one_at_a_time = lock.lock().await;
        let bucket = self.broker.bucket(Bucket::RateLimits).await?;
        for _ in 0..50 {
            let entry = bucket
                .entry(key)
                .await
                .map_err(|e| QueueError::request("read rate limit", e))?;
            let next_free_us = entry
                .as_ref()
                .filter(|e| e.operation == kv::Operation::Put)
                .and_then(|e| std::str::from_utf8(&e.value).ok()?.parse::<u64>().ok())
                .unwrap_or(0);
            let slot_us = next_free_us.max(now_us());
            let value = (slot_us + interval_us).to_string();
            let revision = entry.as_ref().map(|e| e.revision);
            if cas::write_at(&bucket, key, value.into(), revision, "write rate limit").await? {
                return Ok(slot_us / 1000);
            }
            // Another replica took a slot first: read again.
        }
        Err(QueueError::request(
            "write rate limit",
            "too many concurrent writers",
        ))
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros() as u64
}
