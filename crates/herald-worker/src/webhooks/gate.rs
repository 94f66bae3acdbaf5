//! Phase 1, the gate: whether a delivery is sent now ([`WebhookWorker::gate`]).
//! In order:
//!
//! 1. its endpoint's record: unreadable (a keyring missing its key) or
//!    vanished, the delivery is held and looked at again; vanished for
//!    longer than `endpoint_removed_grace`, it is recorded as
//!    `endpoint_removed` ([`Missing`]);
//! 2. disabled: recorded as `held`, for the recover call to re-send;
//! 3. paused: handed back until `paused_recheck`;
//! 4. its rate-limit slot: waited for here when close, else handed back
//!    until it ([`usable_slot`], [`wait_for_slot`]);
//! 5. its share of the requests in flight ([`InFlight`]): handed back
//!    for about one request timeout when the endpoint holds them all.
//!
//! A delivery the gate stops sends nothing, so it is no attempt: handed
//! back, it keeps its attempt number.

use std::{collections::HashMap, sync::Arc, time::Duration};

use herald_core::{
    names,
    payload::{AttemptOutcome, DeliveryJob, EndpointConfig},
};
use herald_queue::{endpoints::Found, publish::Outgoing};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{
    WebhookWorker, WebhookWorkerConfig, request,
    settle::{Again, Attempt, store_again},
};

/// A rate-limit slot this close is waited for in the worker; a later one
/// defers the delivery to it as a message schedule.
const RATE_LIMIT_WAIT_IN_WORKER: Duration = Duration::from_millis(250);

/// How long a delivery waits for its endpoint's in-flight share before it
/// is deferred.
const IN_FLIGHT_WAIT: Duration = Duration::from_millis(250);

/// How late a deferred delivery may reach a worker and still use its
/// rate-limit slot. Schedules fire up to ~100 ms late under load; a delivery
/// later than this reserves again, so late arrivals can bunch into at most
/// this much of the limit.
const RATE_SLOT_TOLERANCE: Duration = Duration::from_secs(1);

/// What the gate lets through.
pub(super) enum Verdict {
    /// Send it now.
    Send(Open),
    /// Not sent: this one message (the job handed back as a schedule, or
    /// its attempt recorded as `held` or `endpoint_removed`) is stored and
    /// the job acked.
    Settle(Outgoing, NotSent),
}

/// Why the gate did not send a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NotSent {
    /// Handed back to come again later (paused, busy, rate-limited, its
    /// record missing or unreadable for now).
    HandedBack,
    /// Recorded `held`: the endpoint is disabled.
    Held,
    /// Recorded `endpoint_removed`: the delivery ends.
    EndpointRemoved,
}

impl NotSent {
    /// The outcome on the attempt's span and, for a recorded one, in
    /// `herald_deliveries_total`.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            NotSent::HandedBack => "handed_back",
            NotSent::Held => AttemptOutcome::Held.as_str(),
            NotSent::EndpointRemoved => AttemptOutcome::EndpointRemoved.as_str(),
        }
    }
}

/// A delivery cleared to send.
pub(super) struct Open {
    /// The job as it goes on: an endpoint found again forgets it was
    /// missing, so a later disappearance starts its own grace.
    pub job: DeliveryJob,
    pub endpoint: Arc<EndpointConfig>,
    /// One of the endpoint's in-flight share, held until the request ends.
    pub permit: OwnedSemaphorePermit,
}

impl WebhookWorker {
    /// Runs `job`, which would be attempt number `attempt`, through the
    /// gate.
    pub(super) async fn gate(&self, job: DeliveryJob, attempt: u32) -> Verdict {
        let found = match self
            .endpoints
            .endpoint(&job.user, &job.endpoint, job.record.as_ref())
            .await
        {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(endpoint = %job.endpoint, error = %e, "cannot read the endpoint; retrying the job shortly");
                // Stored again a second later, not nak'd: a redelivery
                // would count an attempt never sent.
                return Verdict::Settle(
                    store_again(
                        &job,
                        herald_core::now_ms() + 1000,
                        Again::HandBack {
                            attempt,
                            rate_slot_ms: job.rate_slot_ms,
                        },
                    ),
                    NotSent::HandedBack,
                );
            }
        };
        let endpoint = match found {
            Found::Endpoint(endpoint) => endpoint,
            Found::Unreadable(why) => {
                let (record, not_sent) = self.missing(&job, attempt, Some(why));
                return Verdict::Settle(record, not_sent);
            }
            Found::Missing => {
                let (record, not_sent) = self.missing(&job, attempt, None);
                return Verdict::Settle(record, not_sent);
            }
        };
        let job = DeliveryJob {
            endpoint_missing_since_ms: None,
            ..job
        };
        let hand_back = |at_ms, rate_slot_ms| {
            Verdict::Settle(
                store_again(
                    &job,
                    at_ms,
                    Again::HandBack {
                        attempt,
                        rate_slot_ms,
                    },
                ),
                NotSent::HandedBack,
            )
        };
        if self.is_disabled(&job).await {
            // Kept in the task's history, not sent: the recover call (or
            // enabling the endpoint) re-sends it.
            return Verdict::Settle(
                Attempt {
                    job: &job,
                    url: &endpoint.url,
                    number: attempt,
                    at_ms: herald_core::now_ms(),
                }
                .event(AttemptOutcome::Held, None, None),
                NotSent::Held,
            );
        }
        if endpoint.paused {
            // Stored as a schedule, not pending: a paused endpoint's backlog
            // costs the other endpoints nothing.
            return hand_back(self.recheck_at(), None);
        }
        let key = names::endpoint_key(&job.user, &job.endpoint);
        // The rate limit first: waiting for a slot (deferred, or up to
        // RATE_LIMIT_WAIT_IN_WORKER here) is not a request in flight, and
        // must not push the endpoint's own deliveries over its share.
        if let Some(per_second) = endpoint.rate_limit_per_second {
            let slot = match usable_slot(job.rate_slot_ms, herald_core::now_ms()) {
                Some(slot) => slot,
                None => match self.rate_limiter.reserve(&key, per_second).await {
                    Ok(slot) => slot,
                    Err(e) => {
                        tracing::warn!(endpoint = %job.endpoint, error = %e, "no rate-limit slot; retrying the job shortly");
                        // Stored again a second later, not nak'd: a
                        // redelivery would count an attempt never sent.
                        return hand_back(herald_core::now_ms() + 1000, None);
                    }
                },
            };
            match wait_for_slot(slot, herald_core::now_ms()) {
                Some(wait) => tokio::time::sleep(wait).await,
                // Stored until its slot, holding no worker meanwhile.
                None => return hand_back(slot, Some(slot)),
            }
        }
        let Some(permit) = self
            .in_flight
            .enter(&key, self.config.max_in_flight_per_endpoint)
            .await
        else {
            // This endpoint already holds its share of the workers: come
            // back after about one request timeout, spread out (without the
            // rate-limit slot, which goes unused).
            let timeout = request::timeout(&endpoint, self.config.timeout);
            return hand_back(busy_look_again(herald_core::now_ms(), timeout), None);
        };
        Verdict::Send(Open {
            job,
            endpoint,
            permit,
        })
    }

    /// What is stored for a delivery whose endpoint has no record this
    /// worker can read ([`Missing`]).
    fn missing(
        &self,
        job: &DeliveryJob,
        attempt: u32,
        unreadable: Option<String>,
    ) -> (Outgoing, NotSent) {
        let now = herald_core::now_ms();
        // A hold keeps the number the job carries.
        let hold = |job: &DeliveryJob, at_ms| {
            store_again(
                job,
                at_ms,
                Again::HandBack {
                    attempt: job.attempt,
                    rate_slot_ms: None,
                },
            )
        };
        match Missing::of(unreadable.is_some(), job, now, &self.config) {
            Missing::Unreadable { look_again_ms } => {
                let why = unreadable.unwrap_or_default();
                tracing::error!(task = %job.task, endpoint = %job.endpoint, reason = %why, "endpoint record unreadable; keeping its delivery");
                (hold(job, look_again_ms), NotSent::HandedBack)
            }
            Missing::Vanished {
                since_ms,
                look_again_ms,
            } => {
                tracing::info!(task = %job.task, endpoint = %job.endpoint, "endpoint record missing; holding its delivery");
                let holding = DeliveryJob {
                    endpoint_missing_since_ms: Some(since_ms),
                    ..job.clone()
                };
                (hold(&holding, look_again_ms), NotSent::HandedBack)
            }
            Missing::Removed => {
                tracing::info!(task = %job.task, endpoint = %job.endpoint, "endpoint removed; dropping its delivery");
                let record = Attempt {
                    job,
                    url: "",
                    number: attempt,
                    at_ms: now,
                }
                .event(AttemptOutcome::EndpointRemoved, None, None);
                (record, NotSent::EndpointRemoved)
            }
        }
    }

    /// Whether deliveries to `job`'s endpoint are held. Only when the
    /// bucket agrees: an enable whose change has not reached this worker's
    /// watch yet must not hold a delivery after the enable's recover has
    /// looked for held ones.
    async fn is_disabled(&self, job: &DeliveryJob) -> bool {
        self.health.is_disabled(&job.user, &job.endpoint)
            && self
                .health
                .confirm_disabled(&self.broker, &job.user, &job.endpoint)
                .await
    }

    fn recheck_at(&self) -> u64 {
        herald_core::now_ms() + self.config.paused_recheck.as_millis() as u64
    }
}

/// What becomes of a delivery whose endpoint has no record this worker can
/// read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Missing {
    /// The record exists but this process cannot open it (a keyring
    /// missing its key): the delivery is kept, for as long as it takes a
    /// fixed keyring to read it, looked at again at `look_again_ms`.
    Unreadable { look_again_ms: u64 },
    /// Gone from the bucket since `since_ms`: held for the grace period
    /// first, since a record can vanish and come back (an operator
    /// rewriting it, a grant withdrawn by mistake).
    Vanished { since_ms: u64, look_again_ms: u64 },
    /// Gone for longer than the grace: dropped, recorded as
    /// `endpoint_removed`.
    Removed,
}

impl Missing {
    /// For `job` at `now_ms`, its record `unreadable` or not there at all.
    pub(super) fn of(
        unreadable: bool,
        job: &DeliveryJob,
        now_ms: u64,
        config: &WebhookWorkerConfig,
    ) -> Self {
        let look_again_ms = now_ms + config.paused_recheck.as_millis() as u64;
        if unreadable {
            return Missing::Unreadable { look_again_ms };
        }
        let since_ms = job.endpoint_missing_since_ms.unwrap_or(now_ms);
        let grace_ends = since_ms + config.endpoint_removed_grace.as_millis() as u64;
        if now_ms < grace_ends {
            Missing::Vanished {
                since_ms,
                look_again_ms: look_again_ms.min(grace_ends),
            }
        } else {
            Missing::Removed
        }
    }
}

/// The slot a job was deferred to, used as is unless the schedule fired it
/// more than [`RATE_SLOT_TOLERANCE`] late: sending then would burst with
/// the slots after it, so it takes a new one (`None`).
pub(super) fn usable_slot(carried: Option<u64>, now_ms: u64) -> Option<u64> {
    carried.filter(|slot| now_ms <= slot + RATE_SLOT_TOLERANCE.as_millis() as u64)
}

/// How long to wait here for the rate-limit slot at `slot_ms`; `None` when
/// it is further off than [`RATE_LIMIT_WAIT_IN_WORKER`] and the delivery
/// is stored until then instead, holding no worker.
pub(super) fn wait_for_slot(slot_ms: u64, now_ms: u64) -> Option<Duration> {
    let wait = Duration::from_millis(slot_ms.saturating_sub(now_ms));
    (wait <= RATE_LIMIT_WAIT_IN_WORKER).then_some(wait)
}

/// When a delivery to an endpoint that holds its whole in-flight share
/// looks again: after one to two request `timeout`s, spread so the
/// deferred ones do not return together.
pub(super) fn busy_look_again(now_ms: u64, timeout: Duration) -> u64 {
    let spread = rand::random_range(1.0..2.0);
    now_ms + timeout.mul_f64(spread).as_millis() as u64
}

/// Requests in flight per endpoint in this process: a semaphore each, made
/// on the endpoint's first request and dropped once idle, so a worker
/// delivering to a million endpoints holds only the busy ones.
#[derive(Default)]
pub(super) struct InFlight(std::sync::Mutex<Semaphores>);

#[derive(Default)]
pub(super) struct Semaphores {
    by_endpoint: HashMap<String, Arc<Semaphore>>,
    /// How many there may be before the idle ones are dropped.
    prune_at: usize,
}

/// The fewest semaphores worth pruning.
const IN_FLIGHT_PRUNE_AT: usize = 1024;

impl InFlight {
    /// A permit for one more request to `key`, waiting up to
    /// [`IN_FLIGHT_WAIT`] for one of its `limit` to free up; `None` when the
    /// endpoint keeps them all (it is slow or hanging). A fast endpoint
    /// frees permits within milliseconds, so bursts to it wait briefly
    /// instead of being deferred.
    pub(super) async fn enter(&self, key: &str, limit: usize) -> Option<OwnedSemaphorePermit> {
        let semaphore = {
            let mut semaphores = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let semaphore = semaphores
                .by_endpoint
                .entry(key.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(limit)))
                .clone();
            semaphores.prune_idle();
            semaphore
        };
        tokio::time::timeout(IN_FLIGHT_WAIT, semaphore.acquire_owned())
            .await
            .ok()?
            .ok()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap().by_endpoint.len()
    }
}

impl Semaphores {
    /// Drops the semaphores nobody holds or waits on (only this map has
    /// them), once there are twice as many as after the last pruning.
    fn prune_idle(&mut self) {
        if self.by_endpoint.len() < self.prune_at.max(IN_FLIGHT_PRUNE_AT) {
            return;
        }
        self.by_endpoint
            .retain(|_, semaphore| Arc::strong_count(semaphore) > 1);
        self.prune_at = self.by_endpoint.len() * 2;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::webhooks::tests::job;

    const NOW: u64 = 1_000_000_000;

    #[tokio::test]
    async fn only_busy_endpoints_keep_a_semaphore() {
        let in_flight = InFlight::default();
        let held = in_flight.enter("busy.hook", 1).await.unwrap();
        for n in 0..10 * IN_FLIGHT_PRUNE_AT {
            let permit = in_flight.enter(&format!("u{n}.hook"), 1).await;
            assert!(permit.is_some());
            assert!(
                in_flight.len() <= 2 * IN_FLIGHT_PRUNE_AT,
                "{}",
                in_flight.len()
            );
        }
        // The busy one is still there, with its permit taken: a second
        // request to it finds none free.
        let busy = in_flight.0.lock().unwrap().by_endpoint["busy.hook"].clone();
        assert_eq!(busy.available_permits(), 0);
        drop(held);
        assert_eq!(busy.available_permits(), 1);
    }

    fn config() -> WebhookWorkerConfig {
        WebhookWorkerConfig {
            paused_recheck: Duration::from_secs(60),
            endpoint_removed_grace: Duration::from_secs(300),
            ..Default::default()
        }
    }

    /// An unreadable record keeps its delivery however long it has been
    /// missing before: the record is there, only this process cannot open
    /// it, so no grace runs out.
    #[test]
    fn an_unreadable_record_holds_its_delivery_without_end() {
        let long_missing = DeliveryJob {
            endpoint_missing_since_ms: Some(NOW - 86_400_000),
            ..job()
        };
        for job in [job(), long_missing] {
            assert_eq!(
                Missing::of(true, &job, NOW, &config()),
                Missing::Unreadable {
                    look_again_ms: NOW + 60_000
                }
            );
        }
    }

    /// A vanished record holds its delivery from when it was first missed
    /// until the grace ends, looking again every recheck (never past the
    /// end); then it is removed.
    #[test]
    fn a_vanished_record_holds_its_delivery_for_the_grace_then_drops_it() {
        let config = config();
        assert_eq!(
            Missing::of(false, &job(), NOW, &config),
            Missing::Vanished {
                since_ms: NOW,
                look_again_ms: NOW + 60_000
            }
        );
        let missed_before = |ago_ms: u64| DeliveryJob {
            endpoint_missing_since_ms: Some(NOW - ago_ms),
            ..job()
        };
        // The first miss stands: looking again does not restart the grace.
        assert_eq!(
            Missing::of(false, &missed_before(200_000), NOW, &config),
            Missing::Vanished {
                since_ms: NOW - 200_000,
                look_again_ms: NOW + 60_000
            }
        );
        // 30 s of grace left: looked at again when it ends, not later.
        assert_eq!(
            Missing::of(false, &missed_before(270_000), NOW, &config),
            Missing::Vanished {
                since_ms: NOW - 270_000,
                look_again_ms: NOW + 30_000
            }
        );
        assert_eq!(
            Missing::of(false, &missed_before(300_000), NOW, &config),
            Missing::Removed
        );
        // No grace: removed at once.
        let no_grace = WebhookWorkerConfig {
            endpoint_removed_grace: Duration::ZERO,
            ..config
        };
        assert_eq!(Missing::of(false, &job(), NOW, &no_grace), Missing::Removed);
    }

    #[test]
    fn a_carried_slot_is_used_unless_it_fired_too_late() {
        assert_eq!(usable_slot(None, NOW), None);
        // Early (the schedule fired before it) or a little late: kept.
        assert_eq!(usable_slot(Some(NOW + 500), NOW), Some(NOW + 500));
        assert_eq!(usable_slot(Some(NOW - 1_000), NOW), Some(NOW - 1_000));
        // Later than the tolerance: a new slot is reserved.
        assert_eq!(usable_slot(Some(NOW - 1_001), NOW), None);
    }

    #[test]
    fn a_close_slot_is_waited_for_a_far_one_handed_back() {
        assert_eq!(wait_for_slot(NOW - 5, NOW), Some(Duration::ZERO));
        assert_eq!(wait_for_slot(NOW, NOW), Some(Duration::ZERO));
        assert_eq!(
            wait_for_slot(NOW + 250, NOW),
            Some(Duration::from_millis(250))
        );
        assert_eq!(wait_for_slot(NOW + 251, NOW), None);
        assert_eq!(wait_for_slot(NOW + 60_000, NOW), None);
    }

    #[test]
    fn a_busy_endpoint_s_deliveries_come_back_spread_over_a_timeout() {
        let timeout = Duration::from_secs(10);
        let times: Vec<u64> = (0..50).map(|_| busy_look_again(NOW, timeout)).collect();
        for at in &times {
            assert!((NOW + 10_000..NOW + 20_000).contains(at), "{at}");
        }
        assert!(times.iter().any(|at| *at != times[0]), "not spread");
    }

    /// A hanging endpoint holds at most `limit` permits; one more waits
    /// briefly and gets none, while another endpoint is not held up; a
    /// finished request frees its permit.
    #[tokio::test]
    async fn an_endpoint_holds_at_most_its_share_of_requests_in_flight() {
        let in_flight = InFlight::default();
        let first = in_flight.enter("u.slow", 2).await.unwrap();
        let _second = in_flight.enter("u.slow", 2).await.unwrap();
        let started = tokio::time::Instant::now();
        assert!(in_flight.enter("u.slow", 2).await.is_none());
        assert!(started.elapsed() >= IN_FLIGHT_WAIT);
        assert!(in_flight.enter("u.fast", 2).await.is_some());

        drop(first);
        assert!(in_flight.enter("u.slow", 2).await.is_some());

        // Freed while waiting: the waiter gets it instead of being deferred.
        let third = in_flight.enter("u.slow", 2).await.unwrap();
        let waiter = in_flight.enter("u.slow", 2);
        let release = async {
            tokio::task::yield_now().await;
            drop(third);
        };
        let (permit, ()) = tokio::join!(waiter, release);
        assert!(permit.is_some());
    }
}
