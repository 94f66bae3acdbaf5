//! When an endpoint is failing, disabled or recovered: the policy the
//! webhook workers apply to `herald-endpoint-health` (they fold outcomes
//! and write them, `herald_worker::webhooks::health`), and the changes an
//! enable call makes (`herald_api`).
//!
//! An endpoint is disabled at once on 410 Gone, or when it has failed
//! without a success for the disabling period. The write that disables it,
//! or that records the first success after the owner was mailed about
//! failures, is the one change worth a mail ([`Transition`]).

use std::time::Duration;

use crate::{
    EndpointId, TaskId, UserId,
    payload::{EndpointHealth, VERSION},
};

/// Outcomes seen by this process since the last flush.
#[derive(Debug, Default, Clone)]
pub struct Outcomes {
    /// A success was seen since the last flush.
    succeeded: bool,
    last_success_ms: Option<u64>,
    /// Failures after the last success seen here (or since the flush).
    failures: u64,
    first_failure_ms: Option<u64>,
    last_failure_ms: Option<u64>,
    last_error: Option<String>,
    /// The endpoint answered 410 Gone.
    gone: bool,
    /// The owner was mailed about a failed delivery after the last success
    /// seen here.
    owner_notified: bool,
    /// The owner was mailed about a failed delivery and a success followed
    /// in the same batch: the recovery that mail calls for.
    notified_then_succeeded: bool,
    /// The task of the latest outcome, named in a disabled/recovered mail.
    last_task: Option<TaskId>,
}

/// A change worth a mail, decided by the write that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    /// Disabled after failing for the disabling period.
    Disabled,
    /// Disabled by 410 Gone; the worker already mailed about it.
    DisabledByGone,
    /// The first success after the owner was mailed about failures.
    Recovered,
}

impl Outcomes {
    /// A 2xx answer to `task` at `at_ms`.
    pub fn success(&mut self, task: &TaskId, at_ms: u64) {
        self.succeeded = true;
        self.last_success_ms = Some(at_ms);
        self.failures = 0;
        self.first_failure_ms = None;
        // The mail was about failures this success ends.
        self.notified_then_succeeded |= std::mem::take(&mut self.owner_notified);
        self.last_task = Some(task.clone());
    }

    pub fn failure(&mut self, failure: &Failure<'_>) {
        self.failures += 1;
        self.first_failure_ms.get_or_insert(failure.at_ms);
        self.last_failure_ms = Some(failure.at_ms);
        self.last_error = Some(failure.error.chars().take(500).collect());
        self.gone |= failure.gone;
        self.owner_notified |= failure.owner_notified;
        self.last_task = Some(failure.task.clone());
    }

    /// `health` as stored, with these outcomes folded in at `now_ms`, and
    /// the change worth a mail the write would make. `disable_after`: how
    /// long an endpoint may fail without a success before it is disabled.
    pub fn merge_into(
        &self,
        mut health: EndpointHealth,
        now_ms: u64,
        disable_after: Duration,
    ) -> (EndpointHealth, Transition) {
        health.v = VERSION;
        let mut transition = Transition::None;
        if self.succeeded {
            health.last_success_ms = health.last_success_ms.max(self.last_success_ms);
            health.consecutive_failures = self.failures;
            health.failing_since_ms = self.first_failure_ms;
            let notified = health.owner_notified || self.notified_then_succeeded;
            if notified && self.failures == 0 {
                transition = Transition::Recovered;
            }
            // Failures after the success keep the owner's last news "failing".
            health.owner_notified = notified && self.failures > 0;
        } else {
            health.consecutive_failures += self.failures;
            health.failing_since_ms = health.failing_since_ms.or(self.first_failure_ms);
        }
        if self.last_failure_ms.is_some() {
            health.last_failure_ms = health.last_failure_ms.max(self.last_failure_ms);
            health.last_error = self.last_error.clone();
        }
        health.owner_notified |= self.owner_notified;
        if !health.disabled {
            let failing_for = health
                .failing_since_ms
                .map(|since| Duration::from_millis(now_ms.saturating_sub(since)));
            if self.gone {
                health.disabled = true;
                health.disabled_reason = Some("the endpoint answered 410 Gone".into());
                transition = Transition::DisabledByGone;
            } else if failing_for.is_some_and(|f| f >= disable_after) && self.failures > 0 {
                health.disabled = true;
                health.disabled_reason = Some(format!(
                    "failing without a success for {}",
                    humantime::format_duration(Duration::from_secs(
                        failing_for.unwrap_or_default().as_secs()
                    ))
                ));
                transition = Transition::Disabled;
                // The disabled mail tells the owner, so the first success
                // after the endpoint is enabled again sends the recovered one.
                health.owner_notified = true;
            }
            if health.disabled {
                health.disabled_at_ms = Some(now_ms);
            }
        }
        (health, transition)
    }

    /// The task of the latest outcome, named in a disabled/recovered mail.
    pub fn last_task(&self) -> Option<&TaskId> {
        self.last_task.as_ref()
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// These outcomes, which could not be written, under `newer` ones that
    /// arrived meanwhile: what the next flush writes.
    pub fn under(self, newer: Option<Outcomes>) -> Outcomes {
        let older = self;
        match newer {
            None => older,
            Some(newer) if newer.succeeded => Outcomes {
                // A mail of the older batch came before the newer success.
                notified_then_succeeded: newer.notified_then_succeeded
                    || older.owner_notified
                    || older.notified_then_succeeded,
                ..newer
            },
            Some(newer) => Outcomes {
                failures: older.failures + newer.failures,
                first_failure_ms: older.first_failure_ms.or(newer.first_failure_ms),
                last_failure_ms: newer.last_failure_ms,
                last_error: newer.last_error,
                gone: older.gone || newer.gone,
                owner_notified: older.owner_notified || newer.owner_notified,
                notified_then_succeeded: older.notified_then_succeeded,
                last_task: newer.last_task.or(older.last_task),
                ..older
            },
        }
    }
}

/// One failed attempt, for [`Outcomes::failure`].
pub struct Failure<'a> {
    pub user: &'a UserId,
    pub endpoint: &'a EndpointId,
    pub task: &'a TaskId,
    pub at_ms: u64,
    pub error: &'a str,
    pub gone: bool,
    pub owner_notified: bool,
}

impl EndpointHealth {
    /// This record, disabled, as an enable call writes it: not disabled,
    /// its failure streak forgotten. `owner_notified` stays, so the first
    /// success sends the recovered mail.
    pub fn enabled(&self) -> EndpointHealth {
        EndpointHealth {
            v: VERSION,
            disabled: false,
            disabled_at_ms: None,
            disabled_reason: None,
            consecutive_failures: 0,
            failing_since_ms: None,
            ..self.clone()
        }
    }

    /// This record (as stored now) disabled again as `before` was, after an
    /// enable whose recovery failed: what workers wrote since is kept.
    pub fn disabled_again(self, before: &EndpointHealth) -> EndpointHealth {
        EndpointHealth {
            v: VERSION,
            disabled: true,
            disabled_at_ms: before.disabled_at_ms,
            disabled_reason: before.disabled_reason.clone(),
            consecutive_failures: self.consecutive_failures.max(before.consecutive_failures),
            failing_since_ms: before.failing_since_ms.or(self.failing_since_ms),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn failures(n: u64, first_ms: u64) -> Outcomes {
        Outcomes {
            failures: n,
            first_failure_ms: Some(first_ms),
            last_failure_ms: Some(first_ms),
            last_error: Some("503".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_success_resets_failures_and_failures_accumulate() {
        let stored = EndpointHealth {
            v: 1,
            consecutive_failures: 4,
            failing_since_ms: Some(10),
            ..Default::default()
        };
        let (merged, transition) = failures(2, 50).merge_into(stored.clone(), 60, DAY);
        assert_eq!(merged.consecutive_failures, 6);
        assert_eq!(merged.failing_since_ms, Some(10));
        assert_eq!(merged.last_error.as_deref(), Some("503"));
        assert_eq!(transition, Transition::None);

        let recovered = Outcomes {
            succeeded: true,
            last_success_ms: Some(70),
            ..Default::default()
        };
        let (merged, transition) = recovered.merge_into(stored, 70, DAY);
        assert_eq!(merged.consecutive_failures, 0);
        assert_eq!(merged.failing_since_ms, None);
        assert_eq!(merged.last_success_ms, Some(70));
        assert_eq!(
            transition,
            Transition::None,
            "nobody was mailed, so no recovered mail"
        );
    }

    #[test]
    fn failing_for_the_whole_period_disables_once() {
        let stored = EndpointHealth {
            v: 1,
            consecutive_failures: 10,
            failing_since_ms: Some(1_000),
            ..Default::default()
        };
        let day_ms = DAY.as_millis() as u64;
        let (early, transition) = failures(1, 2_000).merge_into(stored.clone(), day_ms, DAY);
        assert!(!early.disabled);
        assert_eq!(transition, Transition::None);

        let now = 1_000 + day_ms;
        let (disabled, transition) = failures(1, now).merge_into(stored, now, DAY);
        assert!(disabled.disabled);
        assert_eq!(disabled.disabled_at_ms, Some(now));
        assert_eq!(transition, Transition::Disabled);
        assert!(disabled.owner_notified, "the disabled mail told the owner");

        let (again, transition) = failures(1, now + 5).merge_into(disabled, now + 5, DAY);
        assert!(again.disabled);
        assert_eq!(transition, Transition::None, "the mail goes out once");
    }

    #[test]
    fn gone_disables_at_once_without_a_second_mail() {
        let gone = Outcomes {
            gone: true,
            owner_notified: true,
            ..failures(1, 5)
        };
        let (health, transition) = gone.merge_into(EndpointHealth::default(), 5, DAY);
        assert!(health.disabled);
        assert!(health.owner_notified);
        assert_eq!(transition, Transition::DisabledByGone);
    }

    #[test]
    fn the_first_success_after_a_failure_mail_is_a_recovery() {
        let notified = Outcomes {
            owner_notified: true,
            ..failures(3, 5)
        };
        let (health, _) = notified.merge_into(EndpointHealth::default(), 6, DAY);
        assert!(health.owner_notified);
        let success = Outcomes {
            succeeded: true,
            last_success_ms: Some(9),
            ..Default::default()
        };
        let (health, transition) = success.merge_into(health, 9, DAY);
        assert_eq!(transition, Transition::Recovered);
        assert!(!health.owner_notified);
        let (_, transition) = success.merge_into(health, 10, DAY);
        assert_eq!(transition, Transition::None, "only the first success");
    }

    /// The outcomes of one flush interval, folded as the tracker folds them.
    fn batch(outcomes: &[&str]) -> Outcomes {
        let user = UserId::new("7").unwrap();
        let endpoint = EndpointId::new("hooks").unwrap();
        let task = TaskId::new("t-1").unwrap();
        let mut pending = Outcomes::default();
        for (at, outcome) in outcomes.iter().enumerate() {
            let at_ms = 100 + at as u64;
            match *outcome {
                "success" => pending.success(&task, at_ms),
                failure => pending.failure(&Failure {
                    user: &user,
                    endpoint: &endpoint,
                    task: &task,
                    at_ms,
                    error: "HTTP 500",
                    gone: false,
                    owner_notified: failure == "failure mailed",
                }),
            }
        }
        pending
    }

    /// Mails per flush of `batches`, in order, starting from `stored`.
    fn transitions(mut stored: EndpointHealth, batches: &[&[&str]]) -> Vec<Transition> {
        batches
            .iter()
            .enumerate()
            .map(|(i, outcomes)| {
                let (health, transition) =
                    batch(outcomes).merge_into(stored.clone(), 1_000 + i as u64, DAY);
                stored = health;
                transition
            })
            .collect()
    }

    #[test]
    fn a_failure_mail_and_a_success_in_one_flush_recover_once() {
        let mailed_before = EndpointHealth {
            v: 1,
            owner_notified: true,
            consecutive_failures: 3,
            ..Default::default()
        };
        assert_eq!(
            transitions(
                mailed_before,
                &[&["failure mailed", "success"], &["success"], &["success"]]
            ),
            [Transition::Recovered, Transition::None, Transition::None],
            "one recovered mail, at the flush that saw the recovery"
        );
        assert_eq!(
            transitions(
                EndpointHealth::default(),
                &[&["failure mailed", "success"], &["success"]]
            ),
            [Transition::Recovered, Transition::None],
            "the owner was mailed in this very flush, then it recovered"
        );
    }

    #[test]
    fn a_failure_after_the_recovery_in_one_flush_is_no_recovery() {
        let mailed_before = EndpointHealth {
            v: 1,
            owner_notified: true,
            ..Default::default()
        };
        assert_eq!(
            transitions(
                mailed_before,
                &[&["failure mailed", "success", "failure"], &["success"]]
            ),
            [Transition::None, Transition::Recovered],
            "still failing at the first flush; the owner hears of the recovery once"
        );
    }

    #[test]
    fn enabling_forgets_the_streak_and_a_failed_enable_puts_it_back() {
        let disabled = EndpointHealth {
            v: 1,
            consecutive_failures: 40,
            failing_since_ms: Some(5),
            disabled: true,
            disabled_at_ms: Some(90),
            disabled_reason: Some("the endpoint answered 410 Gone".into()),
            owner_notified: true,
            ..Default::default()
        };
        let enabled = disabled.enabled();
        assert!(!enabled.disabled);
        assert_eq!(
            (enabled.consecutive_failures, enabled.failing_since_ms),
            (0, None)
        );
        assert!(
            enabled.owner_notified,
            "the first success still sends the recovered mail"
        );

        // A worker recorded a success and two failures in between.
        let since = EndpointHealth {
            consecutive_failures: 2,
            last_success_ms: Some(95),
            ..enabled
        };
        let again = since.disabled_again(&disabled);
        assert!(again.disabled);
        assert_eq!(again.disabled_at_ms, Some(90));
        assert_eq!(again.consecutive_failures, 40);
        assert_eq!(again.failing_since_ms, Some(5));
        assert_eq!(
            again.last_success_ms,
            Some(95),
            "what workers wrote since is kept"
        );
    }
}
