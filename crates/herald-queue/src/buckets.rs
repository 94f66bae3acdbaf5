//! The KV buckets of DESIGN.md, each opened once per process.
//!
//! Opening a bucket is a JetStream API request (the stream's info). The
//! hot paths (a task's record read, an endpoint written, a health flush)
//! used to pay it on every call; now the first call opens the bucket and
//! every clone of the [`Broker`] shares the handle. A failed open is not
//! kept: the next call tries again (a role that starts before the bucket
//! exists waits for the topology anyway).

use std::sync::Arc;

use async_nats::jetstream::kv;
use herald_core::names;
use tokio::sync::OnceCell;

use crate::{Broker, QueueError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bucket {
    Endpoints,
    Health,
    Tasks,
    RateLimits,
}

impl Bucket {
    const ALL: usize = 4;

    fn name(self) -> &'static str {
        match self {
            Bucket::Endpoints => names::ENDPOINTS_BUCKET,
            Bucket::Health => names::HEALTH_BUCKET,
            Bucket::Tasks => names::TASKS_BUCKET,
            Bucket::RateLimits => names::RATE_LIMITS_BUCKET,
        }
    }

    fn open_operation(self) -> &'static str {
        match self {
            Bucket::Endpoints => "open endpoints bucket",
            Bucket::Health => "open health bucket",
            Bucket::Tasks => "open tasks bucket",
            Bucket::RateLimits => "open rate-limit bucket",
        }
    }
}

/// The opened handles, shared by every clone of a [`Broker`].
#[derive(Debug, Default)]
pub(crate) struct Buckets {
    opened: [OnceCell<Arc<kv::Store>>; Bucket::ALL],
}

impl Broker {
    /// The handle of `bucket`, opened on first use. Shared, not cloned: a
    /// `kv::Store` carries its stream's whole info and config, dozens of
    /// allocations a copy, and hot paths ask for it on every read.
    pub(crate) async fn bucket(&self, bucket: Bucket) -> Result<Arc<kv::Store>, QueueError> {
        self.buckets.opened[bucket as usize]
            .get_or_try_init(|| async {
                self.jetstream
                    .get_key_value(bucket.name())
                    .await
                    .map(Arc::new)
                    .map_err(|e| QueueError::request(bucket.open_operation(), e))
            })
            .await
            .cloned()
    }
}
