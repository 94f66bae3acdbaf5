//! The one retry schedule of every loop that waits on NATS (a consumer to
//! appear, a watch to come back, the topology to be created): 100 ms, then
//! twice as long after each failed try, at most 5 s. Short enough that a
//! role is back within seconds of NATS, long enough that a hundred replicas
//! waiting on a restarting server do not flood it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

const FIRST: Duration = Duration::from_millis(100);
const LONGEST: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Self { next: FIRST }
    }

    /// The wait [`Self::wait`] would do now, for logs.
    pub(crate) fn delay(&self) -> Duration {
        self.next
    }

    /// Waits the current delay, then doubles it (up to 5 s). `false` when
    /// `shutdown` fired first: the caller stops.
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(LONGEST);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// After a success: the next failure waits the shortest delay again.
    pub(crate) fn reset(&mut self) {
        self.next = FIRST;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn doubles_up_to_the_ceiling_and_starts_over_after_a_success() {
        let shutdown = CancellationToken::new();
        let mut backoff = Backoff::new();
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(backoff.delay());
            assert!(backoff.wait(&shutdown).await);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        backoff.reset();
        assert_eq!(backoff.delay(), FIRST);
    }

    #[tokio::test]
    async fn shutdown_ends_the_wait() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut backoff = Backoff::new();
        assert!(!backoff.wait(&shutdown).await);
    }
}
