//! Following a whole KV bucket into memory with one watch: the set of
//! disabled endpoints does. (The endpoint cache does not: it holds only the
//! users looked up, see `endpoints/cache.rs`.)
//!
//! Each (re)connection reads the bucket's current records into a fresh
//! view first and swaps it in once caught up, so what changed while the
//! watch was down (a delete above all) is not missed; then it applies live
//! changes until the watch ends or fails, and starts over after the
//! [`Backoff`].

use async_nats::jetstream::kv;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::{Broker, QueueError, backoff::Backoff, buckets::Bucket};

/// What a process keeps of a bucket.
pub(crate) trait Follower {
    /// The view rebuilt on every (re)connection.
    type View: Default;

    /// Folds one entry (a put, a delete or a purge) into a view being
    /// rebuilt.
    fn fold(&self, view: &mut Self::View, entry: &kv::Entry);

    /// The rebuilt view, once the watch has read the bucket's history:
    /// it replaces the one followed before.
    fn caught_up(&self, view: Self::View);

    /// A change after catching up.
    fn changed(&self, entry: &kv::Entry);
}

/// Follows `bucket` with `follower` until `shutdown`. `what` names the
/// view in logs.
pub(crate) async fn follow<F: Follower>(
    broker: Broker,
    bucket: Bucket,
    what: &'static str,
    follower: F,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new();
    while !shutdown.is_cancelled() {
        let result = tokio::select! {
            _ = shutdown.cancelled() => break,
            result = follow_once(&broker, bucket, &follower, &mut backoff) => result,
        };
        if let Err(e) = result {
            tracing::warn!(view = what, error = %e, retry_in = ?backoff.delay(), "bucket watch interrupted");
        }
        if !backoff.wait(&shutdown).await {
            break;
        }
    }
}

async fn follow_once<F: Follower>(
    broker: &Broker,
    bucket: Bucket,
    follower: &F,
    backoff: &mut Backoff,
) -> Result<(), QueueError> {
    let store = broker.bucket(bucket).await?;
    let empty = store
        .status()
        .await
        .map_err(|e| QueueError::request("bucket status", e))?
        .values()
        == 0;
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| QueueError::request("watch bucket", e))?;
    let mut fresh = F::View::default();
    let mut caught_up = empty;
    if caught_up {
        follower.caught_up(std::mem::take(&mut fresh));
        backoff.reset();
    }
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| QueueError::request("watch bucket", e))?;
        if caught_up {
            follower.changed(&entry);
        } else {
            follower.fold(&mut fresh, &entry);
            // `delta` counts the entries still to come of the history.
            if entry.delta == 0 {
                caught_up = true;
                follower.caught_up(std::mem::take(&mut fresh));
                backoff.reset();
            }
        }
    }
    Ok(())
}
