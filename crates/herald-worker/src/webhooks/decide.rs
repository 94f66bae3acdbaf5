//! Phase 4, decide: what a classed response ([`super::classify`]) leads
//! to, [`Decision::of`]:
//!
//! | class                   | job                                 | attempt outcome |
//! |-------------------------|-------------------------------------|-----------------|
//! | delivered               | ack                                 | `delivered`     |
//! | gone                    | mail job, then term                 | `gone`          |
//! | retry, attempts left    | next attempt scheduled, then ack    | `retrying`      |
//! | retry, none left        | mail job, then term                 | `exhausted`     |
//!
//! An endpoint without an email has nobody to mail: its gone and exhausted
//! rows end as `abandoned`, termed without a mail job.
//!
//! A `Retry-After` (seconds or an HTTP date) on 429/503 that is longer than
//! the scheduled delay is honoured up to `max_retry_after`; a shorter one
//! never shortens the schedule.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use herald_core::{
    payload::{AttemptOutcome, EndpointConfig},
    schedule::RetrySchedule,
};

use super::{WebhookWorkerConfig, classify::ResponseClass};

/// How long a delivery waits between attempts.
#[derive(Debug, Clone, Copy)]
pub(super) struct RetryPolicy<'a> {
    pub schedule: &'a RetrySchedule,
    /// Longest `Retry-After` honoured; longer ones are cut to this.
    pub max_retry_after: Duration,
}

impl<'a> RetryPolicy<'a> {
    /// `endpoint`'s own schedule if it has one, else the worker's.
    pub(super) fn for_endpoint(
        endpoint: &'a EndpointConfig,
        config: &'a WebhookWorkerConfig,
    ) -> Self {
        RetryPolicy {
            schedule: endpoint
                .retry_schedule
                .as_ref()
                .unwrap_or(&config.retry_schedule),
            max_retry_after: config.max_retry_after,
        }
    }

    /// The delay before the attempt after `attempt`, or `None` when none
    /// is left.
    fn next_delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        honour_retry_after: bool,
    ) -> Option<Duration> {
        let scheduled = self.schedule.delay_after(attempt)?;
        Some(match retry_after {
            Some(asked) if honour_retry_after => scheduled.max(asked.min(self.max_retry_after)),
            _ => scheduled,
        })
    }
}

/// What becomes of a delivery after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Decision {
    pub class: ResponseClass,
    pub outcome: AttemptOutcome,
    /// When the next attempt is due, for `retrying`.
    pub next_delay: Option<Duration>,
    /// Whether the endpoint's owner gets a mail (exhausted or gone).
    pub mails_owner: bool,
}

impl Decision {
    /// The decision after attempt number `attempt` got a response of
    /// `class` (asking to wait `retry_after`, if it did), for an endpoint
    /// that waits as `policy` says and has an owner email or not.
    pub(super) fn of(
        class: ResponseClass,
        attempt: u32,
        retry_after: Option<Duration>,
        policy: RetryPolicy<'_>,
        owner_has_email: bool,
    ) -> Self {
        let next_delay = match class {
            ResponseClass::Retry { honour_retry_after } => {
                policy.next_delay(attempt, retry_after, honour_retry_after)
            }
            ResponseClass::Delivered | ResponseClass::Gone => None,
        };
        let outcome = match class {
            ResponseClass::Delivered => AttemptOutcome::Delivered,
            _ if next_delay.is_some() => AttemptOutcome::Retrying,
            _ if !owner_has_email => AttemptOutcome::Abandoned,
            ResponseClass::Gone => AttemptOutcome::Gone,
            ResponseClass::Retry { .. } => AttemptOutcome::Exhausted,
        };
        Decision {
            class,
            outcome,
            next_delay,
            mails_owner: owner_has_email
                && matches!(outcome, AttemptOutcome::Exhausted | AttemptOutcome::Gone),
        }
    }

    /// How the message is settled once its records are stored.
    pub(super) fn ack(&self) -> AckKind {
        match self.outcome {
            // Ack: delivered, or the next attempt is stored as a schedule.
            AttemptOutcome::Delivered | AttemptOutcome::Retrying => AckKind::Ack,
            // Term: no further attempt; the mail job (if any) is stored first.
            _ => AckKind::Term,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use herald_core::schedule::JITTER;

    use super::*;
    use crate::webhooks::tests::endpoint;

    const RETRY: ResponseClass = ResponseClass::Retry {
        honour_retry_after: false,
    };
    const THROTTLED: ResponseClass = ResponseClass::Retry {
        honour_retry_after: true,
    };

    /// Two retries: 10 s after the first attempt, 60 s after the second.
    fn schedule() -> RetrySchedule {
        RetrySchedule::new(vec![Duration::from_secs(10), Duration::from_secs(60)]).unwrap()
    }

    fn policy(schedule: &RetrySchedule) -> RetryPolicy<'_> {
        RetryPolicy {
            schedule,
            max_retry_after: Duration::from_secs(600),
        }
    }

    /// Whether `delay` is `base` give or take the schedule's jitter.
    fn about(delay: Option<Duration>, base: u64) -> bool {
        let base = Duration::from_secs(base);
        delay.is_some_and(|d| d >= base.mul_f64(1.0 - JITTER) && d <= base.mul_f64(1.0 + JITTER))
    }

    /// The rows of the table in the module documentation, with and without
    /// an owner to mail.
    #[test]
    fn each_class_leads_to_its_row() {
        let schedule = schedule();
        let decide =
            |class, attempt, email| Decision::of(class, attempt, None, policy(&schedule), email);

        let delivered = decide(ResponseClass::Delivered, 3, true);
        assert_eq!(delivered.outcome, AttemptOutcome::Delivered);
        assert_eq!(delivered.next_delay, None);
        assert!(!delivered.mails_owner);
        assert!(matches!(delivered.ack(), AckKind::Ack));

        // Gone stops at once, even with retries left.
        let gone = decide(ResponseClass::Gone, 1, true);
        assert_eq!(gone.outcome, AttemptOutcome::Gone);
        assert_eq!(gone.next_delay, None);
        assert!(gone.mails_owner);
        assert!(matches!(gone.ack(), AckKind::Term));

        let retrying = decide(RETRY, 1, true);
        assert_eq!(retrying.outcome, AttemptOutcome::Retrying);
        assert!(about(retrying.next_delay, 10), "{retrying:?}");
        assert!(!retrying.mails_owner);
        assert!(matches!(retrying.ack(), AckKind::Ack));
        assert!(about(decide(RETRY, 2, true).next_delay, 60));

        // Attempt 3 was the schedule's last.
        let exhausted = decide(RETRY, 3, true);
        assert_eq!(exhausted.outcome, AttemptOutcome::Exhausted);
        assert_eq!(exhausted.next_delay, None);
        assert!(exhausted.mails_owner);
        assert!(matches!(exhausted.ack(), AckKind::Term));
    }

    /// Nobody to tell: the delivery still ends (termed), as `abandoned`,
    /// and no mail job is written for an address that does not exist.
    #[test]
    fn without_an_email_the_end_is_abandoned_and_mails_nobody() {
        let schedule = schedule();
        for (class, attempt) in [(ResponseClass::Gone, 1), (RETRY, 3), (THROTTLED, 3)] {
            let decision = Decision::of(class, attempt, None, policy(&schedule), false);
            assert_eq!(decision.outcome, AttemptOutcome::Abandoned, "{class:?}");
            assert!(!decision.mails_owner);
            assert!(matches!(decision.ack(), AckKind::Term));
        }
        // With attempts left it is an ordinary retry.
        let retrying = Decision::of(RETRY, 1, None, policy(&schedule), false);
        assert_eq!(retrying.outcome, AttemptOutcome::Retrying);
    }

    #[test]
    fn retry_after_lengthens_a_throttled_wait_up_to_the_cap_never_shortens_it() {
        let schedule = schedule();
        let decide = |class, asked: u64| {
            Decision::of(
                class,
                1,
                Some(Duration::from_secs(asked)),
                policy(&schedule),
                true,
            )
            .next_delay
        };
        assert_eq!(decide(THROTTLED, 120), Some(Duration::from_secs(120)));
        // Cut to max_retry_after.
        assert_eq!(decide(THROTTLED, 86_400), Some(Duration::from_secs(600)));
        // Shorter than the schedule: the schedule's delay.
        assert!(about(decide(THROTTLED, 1), 10));
        // A 500's Retry-After is not honoured.
        assert!(about(decide(RETRY, 120), 10));
        // Nor does it give an attempt the schedule does not have.
        let last = Decision::of(
            THROTTLED,
            3,
            Some(Duration::from_secs(120)),
            policy(&schedule),
            true,
        );
        assert_eq!(last.outcome, AttemptOutcome::Exhausted);
        assert_eq!(last.next_delay, None);
    }

    #[test]
    fn an_endpoint_s_own_schedule_wins_over_the_worker_s() {
        let config = WebhookWorkerConfig::default();
        let mut endpoint = endpoint("https://hooks.example.com/in");
        let worker_s = RetryPolicy::for_endpoint(&endpoint, &config);
        assert_eq!(worker_s.schedule, &config.retry_schedule);
        assert_eq!(worker_s.max_retry_after, config.max_retry_after);

        endpoint.retry_schedule = Some(schedule());
        let own = RetryPolicy::for_endpoint(&endpoint, &config);
        assert_eq!(own.schedule, &schedule());
        // Its attempt 3 is the last, although the worker's schedule has more.
        let decision = Decision::of(RETRY, 3, None, own, true);
        assert_eq!(decision.outcome, AttemptOutcome::Exhausted);
    }
}
