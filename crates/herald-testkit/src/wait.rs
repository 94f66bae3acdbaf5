use std::{future::Future, time::Duration};

use tokio::time::{Instant, sleep};

/// Polls `probe` until it returns `Some`, and returns that value. Panics
/// naming `what` once `deadline` has passed: a condition with a deadline,
/// never a fixed sleep.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = Instant::now() + deadline;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < give_up,
            "timed out after {deadline:?} waiting for {what}"
        );
        sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
