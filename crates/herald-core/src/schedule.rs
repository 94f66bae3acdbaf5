//! Retry schedules: how long to wait before each retry of a webhook.
//!
//! JetStream redelivers a nak'ed message after the delay given with the nak
//! (a consumer's `backoff` applies only to ack timeouts), so the worker
//! computes the delay itself from the message's delivery count.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Delays between attempts, after the first try. A schedule of `n` delays
/// allows `n + 1` attempts.
///
/// Written as human durations (`["5s", "5m", "250ms"]`) in configuration,
/// endpoint records and resources alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct RetrySchedule(Vec<Duration>);

/// Fraction of each delay added or taken away at random, so endpoints that
/// failed together do not all retry in the same instant.
pub const JITTER: f64 = 0.2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("retry delay {0:?} is not a duration like \"250ms\", \"5s\" or \"2h\"")]
    Unparsable(String),
    #[error("a retry schedule has at most {MAX_RETRIES} delays")]
    TooLong,
}

/// Upper bound on retries, far above any sensible schedule; the consumer's
/// `max_deliver` sits above it.
pub const MAX_RETRIES: usize = 50;

impl RetrySchedule {
    pub fn new(delays: Vec<Duration>) -> Result<Self, ScheduleError> {
        if delays.len() > MAX_RETRIES {
            return Err(ScheduleError::TooLong);
        }
        Ok(Self(delays))
    }

    /// The Standard Webhooks-style default: 5s, 5m, 30m, 2h, 5h, 10h, 10h.
    pub fn standard() -> Self {
        const MIN: u64 = 60;
        const HOUR: u64 = 3600;
        Self(
            [
                5,
                5 * MIN,
                30 * MIN,
                2 * HOUR,
                5 * HOUR,
                10 * HOUR,
                10 * HOUR,
            ]
            .into_iter()
            .map(Duration::from_secs)
            .collect(),
        )
    }

    /// Total attempts this schedule allows, the first try included.
    pub fn max_attempts(&self) -> u32 {
        self.0.len() as u32 + 1
    }

    pub fn delays(&self) -> &[Duration] {
        &self.0
    }

    /// The delay before the attempt after `attempt` (1-based), without
    /// jitter; `None` when `attempt` was the last one.
    pub fn base_delay_after(&self, attempt: u32) -> Option<Duration> {
        let index = usize::try_from(attempt).ok()?.checked_sub(1)?;
        self.0.get(index).copied()
    }

    /// [`Self::base_delay_after`] with ±[`JITTER`] applied.
    pub fn delay_after(&self, attempt: u32) -> Option<Duration> {
        let base = self.base_delay_after(attempt)?;
        let factor = rand::rng().random_range((1.0 - JITTER)..=(1.0 + JITTER));
        Some(base.mul_f64(factor))
    }
}

impl TryFrom<Vec<String>> for RetrySchedule {
    type Error = ScheduleError;
    fn try_from(values: Vec<String>) -> Result<Self, Self::Error> {
        let delays = values
            .into_iter()
            .map(|v| humantime::parse_duration(v.trim()).map_err(|_| ScheduleError::Unparsable(v)))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(delays)
    }
}

impl From<RetrySchedule> for Vec<String> {
    fn from(schedule: RetrySchedule) -> Self {
        schedule
            .0
            .iter()
            .map(|d| humantime::format_duration(*d).to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_schedule_allows_eight_attempts() {
        let s = RetrySchedule::standard();
        assert_eq!(s.max_attempts(), 8);
        assert_eq!(s.base_delay_after(1), Some(Duration::from_secs(5)));
        assert_eq!(s.base_delay_after(7), Some(Duration::from_secs(36_000)));
        assert_eq!(s.base_delay_after(8), None);
        assert_eq!(s.base_delay_after(0), None);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let s = RetrySchedule::new(vec![Duration::from_secs(100)]).unwrap();
        for _ in 0..1000 {
            let d = s.delay_after(1).unwrap();
            assert!(
                d >= Duration::from_secs(80) && d <= Duration::from_secs(120),
                "{d:?}"
            );
        }
    }

    #[test]
    fn parses_and_prints_human_durations() {
        let s: RetrySchedule = serde_json::from_str(r#"["10ms","5s","2h"]"#).unwrap();
        assert_eq!(s.delays()[0], Duration::from_millis(10));
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"["10ms","5s","2h"]"#);
        assert!(serde_json::from_str::<RetrySchedule>(r#"["soon"]"#).is_err());
    }
}
