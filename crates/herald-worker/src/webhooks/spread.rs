//! Retries of an endpoint that keeps failing, spread out.
//!
//! Deliveries that fail together retry together: 10,000 deliveries to an
//! endpoint that went down fail within seconds of each other, and their
//! retries fall due within the schedule's jitter (±20% of 5 s), a wave
//! that every other endpoint's deliveries wait behind (it raised the p99
//! of healthy deliveries sixfold in `make bench`). So each process hands
//! out the retry times of one endpoint at least `1 / per_second` apart: a
//! retry that would fall due at or before the endpoint's last one is moved
//! just after it, and never by more than `max_spread`. A few failures
//! retry exactly on schedule; a receiver that comes back gets its backlog
//! at a pace instead of all at once. A delivered attempt forgets the
//! endpoint.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use herald_core::{EndpointId, UserId};

type Key = (UserId, EndpointId);

/// Past this many endpoints with retry times handed out, those whose last
/// one has passed are forgotten.
const PRUNE_ABOVE: usize = 4096;

pub(super) struct RetrySpread {
    /// Time between two retries of one endpoint, in microseconds; 0: no
    /// spreading.
    gap_us: u64,
    max_spread_us: u64,
    /// Per endpoint: the earliest time (unix µs) its next retry may take.
    next_free_us: Mutex<HashMap<Key, u64>>,
}

impl RetrySpread {
    /// At most `per_second` retries of one endpoint (0: no limit), each
    /// moved by at most `max_spread`.
    pub(super) fn new(per_second: u32, max_spread: Duration) -> RetrySpread {
        RetrySpread {
            gap_us: if per_second == 0 {
                0
            } else {
                1_000_000 / u64::from(per_second)
            },
            max_spread_us: duration_us(max_spread),
            next_free_us: Mutex::default(),
        }
    }

    /// The delay to give the next attempt of a delivery to `endpoint` of
    /// `user` that its schedule says is due `delay` after `now_ms`.
    pub(super) fn delay(
        &self,
        user: &UserId,
        endpoint: &EndpointId,
        now_ms: u64,
        delay: Duration,
    ) -> Duration {
        if self.gap_us == 0 {
            return delay;
        }
        let now_us = now_ms.saturating_mul(1000);
        let due_us = now_us.saturating_add(duration_us(delay));
        let mut next_free = self
            .next_free_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if next_free.len() > PRUNE_ABOVE {
            next_free.retain(|_, free| *free > now_us);
        }
        let key = (user.clone(), endpoint.clone());
        let free = next_free.get(&key).copied().unwrap_or(0);
        let at = due_us
            .max(free)
            .min(due_us.saturating_add(self.max_spread_us));
        // Moved by the most it may be, `at` can be before `free`, which
        // then stays: the endpoint's pace is not pushed further out.
        next_free.insert(key, at.saturating_add(self.gap_us).max(free));
        Duration::from_micros(at - now_us)
    }

    /// The endpoint answered: its retries need no spreading any more.
    pub(super) fn forget(&self, user: &UserId, endpoint: &EndpointId) {
        let mut next_free = self
            .next_free_us
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !next_free.is_empty() {
            next_free.remove(&(user.clone(), endpoint.clone()));
        }
    }
}

fn duration_us(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key(endpoint: &str) -> (UserId, EndpointId) {
        (
            UserId::new("u-1").unwrap(),
            EndpointId::new(endpoint).unwrap(),
        )
    }

    const NOW_MS: u64 = 1_000_000;
    const FIVE_S: Duration = Duration::from_secs(5);

    #[test]
    fn retries_due_together_are_handed_out_a_gap_apart() {
        // 100 per second: 10 ms apart.
        let spread = RetrySpread::new(100, Duration::from_secs(300));
        let (user, endpoint) = key("down");
        let delays: Vec<Duration> = (0..4)
            .map(|_| spread.delay(&user, &endpoint, NOW_MS, FIVE_S))
            .collect();
        assert_eq!(
            delays,
            [0, 10, 20, 30].map(|ms| FIVE_S + Duration::from_millis(ms))
        );
        // Another endpoint keeps its own pace.
        let (user, other) = key("other");
        assert_eq!(spread.delay(&user, &other, NOW_MS, FIVE_S), FIVE_S);
    }

    #[test]
    fn a_retry_due_after_the_last_one_keeps_its_schedule() {
        let spread = RetrySpread::new(100, Duration::from_secs(300));
        let (user, endpoint) = key("flaky");
        assert_eq!(spread.delay(&user, &endpoint, NOW_MS, FIVE_S), FIVE_S);
        // One second later: due long after the last one plus the gap.
        assert_eq!(
            spread.delay(&user, &endpoint, NOW_MS + 1000, FIVE_S),
            FIVE_S
        );
    }

    #[test]
    fn no_retry_is_moved_by_more_than_the_limit() {
        // One per second, moved by at most 2 s: the fourth retry due at
        // once would wait 3 s, and is held to 2 s.
        let spread = RetrySpread::new(1, Duration::from_secs(2));
        let (user, endpoint) = key("down");
        let delays: Vec<Duration> = (0..5)
            .map(|_| spread.delay(&user, &endpoint, NOW_MS, FIVE_S))
            .collect();
        let secs = |s: u64| FIVE_S + Duration::from_secs(s);
        assert_eq!(delays, [secs(0), secs(1), secs(2), secs(2), secs(2)]);
    }

    #[test]
    fn a_delivered_attempt_forgets_the_pace_and_zero_turns_it_off() {
        let spread = RetrySpread::new(100, Duration::from_secs(300));
        let (user, endpoint) = key("back");
        spread.delay(&user, &endpoint, NOW_MS, FIVE_S);
        spread.forget(&user, &endpoint);
        assert_eq!(spread.delay(&user, &endpoint, NOW_MS, FIVE_S), FIVE_S);

        let off = RetrySpread::new(0, Duration::from_secs(300));
        for _ in 0..3 {
            assert_eq!(off.delay(&user, &endpoint, NOW_MS, FIVE_S), FIVE_S);
        }
    }

    #[test]
    fn endpoints_whose_retries_have_passed_are_forgotten() {
        let spread = RetrySpread::new(100, Duration::from_secs(300));
        for i in 0..=PRUNE_ABOVE {
            let (user, endpoint) = key(&format!("e-{i}"));
            spread.delay(&user, &endpoint, NOW_MS, FIVE_S);
        }
        // An hour later every one of them has passed.
        let (user, endpoint) = key("late");
        spread.delay(&user, &endpoint, NOW_MS + 3_600_000, FIVE_S);
        assert_eq!(spread.next_free_us.lock().unwrap().len(), 1);
    }
}
