//! Endpoint health in `herald-endpoint-health`, kept by the webhook workers.
//!
//! Writing the record on every delivery would add a publish to the hot path.
//! Instead each worker folds outcomes into a local summary per endpoint and
//! flushes it at most once per interval, and at once when an endpoint turns
//! from healthy to failing or back. Several workers merge into the same
//! record with compare-and-set on the KV revision.
//!
//! The record also decides when an endpoint is disabled: at once on 410
//! Gone, or when it has failed without a success for the disabling period.
//! The worker whose write disables an endpoint, or whose write records the
//! first success after the owner was mailed about failures, publishes the
//! "disabled" or "recovered" mail. Every worker follows the bucket to know
//! which endpoints are disabled.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use async_nats::jetstream::kv;
use futures::StreamExt;
use herald_core::{
    EndpointId, TaskId, UserId, names,
    payload::{EndpointHealth, MailJob, MailReason, VERSION, decode, encode},
};
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{Broker, QueueError, cas, endpoints::EndpointCache, publish::Outgoing};

/// Outcomes seen by this process since the last flush.
#[derive(Debug, Default, Clone)]
struct Pending {
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
enum Transition {
    None,
    /// Disabled after failing for the disabling period.
    Disabled,
    /// Disabled by 410 Gone; the worker already mailed about it.
    DisabledByGone,
    /// The first success after the owner was mailed about failures.
    Recovered,
}

impl Pending {
    fn success(&mut self, task: &TaskId, at_ms: u64) {
        self.succeeded = true;
        self.last_success_ms = Some(at_ms);
        self.failures = 0;
        self.first_failure_ms = None;
        // The mail was about failures this success ends.
        self.notified_then_succeeded |= std::mem::take(&mut self.owner_notified);
        self.last_task = Some(task.clone());
    }

    fn failure(&mut self, failure: &Failure<'_>) {
        self.failures += 1;
        self.first_failure_ms.get_or_insert(failure.at_ms);
        self.last_failure_ms = Some(failure.at_ms);
        self.last_error = Some(failure.error.chars().take(500).collect());
        self.gone |= failure.gone;
        self.owner_notified |= failure.owner_notified;
        self.last_task = Some(failure.task.clone());
    }

    fn merge_into(
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
}

/// Folds delivery outcomes and flushes them to the health bucket.
#[derive(Clone)]
pub struct HealthTracker {
    pending: Arc<std::sync::Mutex<HashMap<String, Pending>>>,
    /// The last state this process wrote per endpoint: true when failing.
    failing: Arc<std::sync::Mutex<HashMap<String, bool>>>,
    /// Keys of disabled endpoints, as the bucket says.
    disabled: Arc<std::sync::RwLock<HashSet<String>>>,
    flush_now: Arc<Notify>,
    endpoints: EndpointCache,
    disable_after: Duration,
}

impl HealthTracker {
    /// Starts, on `tasks`, the flusher and the watch of disabled endpoints.
    /// Both run until `stop` fires; the flusher then flushes a last time.
    /// So cancel `stop` once nothing records outcomes any more (after the
    /// webhook consumer has drained), and wait for `tasks`: the outcomes of
    /// the deliveries that finished during the drain reach the bucket.
    /// `disable_after`: how long an endpoint may fail without a success
    /// before it is disabled.
    pub fn start_on(
        tasks: &TaskTracker,
        broker: Broker,
        endpoints: EndpointCache,
        interval: Duration,
        disable_after: Duration,
        stop: CancellationToken,
    ) -> Self {
        let tracker = Self {
            pending: Arc::default(),
            failing: Arc::default(),
            disabled: Arc::default(),
            flush_now: Arc::new(Notify::new()),
            endpoints,
            disable_after,
        };
        tasks.spawn(follow_disabled(
            broker.clone(),
            tracker.disabled.clone(),
            stop.clone(),
        ));
        tasks.spawn(tracker.clone().flush_until(broker, interval, stop));
        tracker
    }

    /// Flushes every `interval`, at once when asked, and a last time when
    /// `stop` fires.
    async fn flush_until(self, broker: Broker, interval: Duration, stop: CancellationToken) {
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(interval) => false,
                _ = self.flush_now.notified() => false,
            };
            self.flush(&broker).await;
            if stopping {
                break;
            }
        }
    }

    /// Whether deliveries to the endpoint are disabled.
    pub fn is_disabled(&self, user: &UserId, endpoint: &EndpointId) -> bool {
        self.disabled
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&names::endpoint_key(user, endpoint))
    }

    /// Whether the bucket itself still has the endpoint disabled; forgets
    /// the local flag when it does not. A delivery arriving just after the
    /// endpoint was enabled can reach a worker before the bucket's watch
    /// does, and must not be held again. When the bucket cannot be read, the
    /// local flag stands.
    pub async fn confirm_disabled(
        &self,
        broker: &Broker,
        user: &UserId,
        endpoint: &EndpointId,
    ) -> bool {
        match read(broker, user, endpoint).await {
            Ok(Some(health)) if !health.disabled => {
                self.disabled
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&names::endpoint_key(user, endpoint));
                false
            }
            _ => true,
        }
    }

    pub fn record_success(&self, user: &UserId, endpoint: &EndpointId, task: &TaskId, at_ms: u64) {
        let key = names::endpoint_key(user, endpoint);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .success(task, at_ms);
        self.flush_if_turned(&key, false);
    }

    /// A failed attempt. `gone`: the endpoint answered 410 and is disabled
    /// at once. `owner_notified`: a mail about it is on its way.
    pub fn record_failure(&self, failure: Failure<'_>) {
        let key = names::endpoint_key(failure.user, failure.endpoint);
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .failure(&failure);
        if failure.gone {
            // Stop at once in this process; the bucket tells the others.
            self.disabled
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone());
            self.flush_now.notify_one();
        }
        self.flush_if_turned(&key, true);
    }

    fn flush_if_turned(&self, key: &str, failing: bool) {
        let turned = {
            let mut states = self.failing.lock().unwrap_or_else(|p| p.into_inner());
            states.insert(key.to_string(), failing) != Some(failing)
        };
        if turned {
            self.flush_now.notify_one();
        }
    }

    async fn flush(&self, broker: &Broker) {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if batch.is_empty() {
            return;
        }
        let bucket = match broker.jetstream.get_key_value(names::HEALTH_BUCKET).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "health bucket unavailable; keeping outcomes for the next flush");
                self.restore(batch);
                return;
            }
        };
        let mut unwritten = HashMap::new();
        for (key, pending) in batch {
            match merge(&bucket, &key, &pending, self.disable_after).await {
                Ok(written) => self.announce(broker, &key, &pending, written).await,
                Err(e) => {
                    tracing::warn!(key, error = %e, "could not update endpoint health");
                    unwritten.insert(key, pending);
                }
            }
        }
        self.restore(unwritten);
    }

    /// Mails the owner about a transition this process's write made.
    async fn announce(&self, broker: &Broker, key: &str, pending: &Pending, written: Written) {
        let reason = match written.transition {
            Transition::None | Transition::DisabledByGone => return,
            Transition::Disabled => MailReason::EndpointDisabled,
            Transition::Recovered => MailReason::EndpointRecovered,
        };
        if written.transition == Transition::Disabled {
            self.disabled
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.to_string());
        }
        tracing::warn!(endpoint = key, ?reason, "endpoint health changed");
        let Some((user, endpoint)) = names::parse_endpoint_key(key) else {
            return;
        };
        let Some(config) = self.endpoints.get(&user, &endpoint) else {
            return;
        };
        let (Some(to), Some(task)) = (config.email.clone(), pending.last_task.clone()) else {
            return;
        };
        let news = match reason {
            MailReason::EndpointRecovered => "recovered",
            _ => "disabled",
        };
        let msg_id = names::endpoint_news_msg_id(&user, &endpoint, news, written.base_revision);
        let mail = MailJob::endpoint_news(
            user,
            endpoint,
            task,
            reason,
            to,
            herald_core::redact::RedactedUrl::from_text(&config.url).to_string(),
            pending.last_error.clone().unwrap_or_default(),
        );
        let message = Outgoing::mail(&mail, msg_id);
        if let Err(e) = broker.publish(message).await {
            tracing::error!(endpoint = key, error = %e, "could not queue the endpoint mail");
        }
    }

    /// Puts unflushed outcomes back, under any that arrived meanwhile.
    fn restore(&self, batch: HashMap<String, Pending>) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (key, older) in batch {
            match pending.remove(&key) {
                None => {
                    pending.insert(key, older);
                }
                Some(newer) => {
                    let merged = if newer.succeeded {
                        Pending {
                            // A mail of the older batch came before the
                            // newer success.
                            notified_then_succeeded: newer.notified_then_succeeded
                                || older.owner_notified
                                || older.notified_then_succeeded,
                            ..newer
                        }
                    } else {
                        Pending {
                            failures: older.failures + newer.failures,
                            first_failure_ms: older.first_failure_ms.or(newer.first_failure_ms),
                            last_failure_ms: newer.last_failure_ms,
                            last_error: newer.last_error,
                            gone: older.gone || newer.gone,
                            owner_notified: older.owner_notified || newer.owner_notified,
                            notified_then_succeeded: older.notified_then_succeeded,
                            last_task: newer.last_task.or(older.last_task),
                            ..older
                        }
                    };
                    pending.insert(key, merged);
                }
            }
        }
    }
}

/// What a successful write of the health record did.
#[derive(Debug, Clone, Copy)]
struct Written {
    transition: Transition,
    /// The revision the write replaced (0: the record was new). Only one
    /// write can replace a given revision, so it names the transition.
    base_revision: u64,
}

/// One failed attempt, for [`HealthTracker::record_failure`].
pub struct Failure<'a> {
    pub user: &'a UserId,
    pub endpoint: &'a EndpointId,
    pub task: &'a TaskId,
    pub at_ms: u64,
    pub error: &'a str,
    pub gone: bool,
    pub owner_notified: bool,
}

/// Follows the bucket and keeps the set of disabled endpoints current. Each
/// (re)connection reads the bucket's current records first and swaps the
/// rebuilt set in once caught up, so what changed while the watch was down
/// is not missed.
async fn follow_disabled(
    broker: Broker,
    disabled: Arc<std::sync::RwLock<HashSet<String>>>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let followed = async {
            let bucket = bucket(&broker).await?;
            let empty = bucket
                .status()
                .await
                .map_err(|e| QueueError::request("health bucket status", e))?
                .values()
                == 0;
            let mut watch = bucket
                .watch_with_history(">")
                .await
                .map_err(|e| QueueError::request("watch endpoint health", e))?;
            let mut fresh = HashSet::new();
            let mut caught_up = empty;
            if caught_up {
                *disabled.write().unwrap_or_else(|p| p.into_inner()) = HashSet::new();
            }
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|e| QueueError::request("watch endpoint health", e))?;
                let is_disabled = entry.operation == kv::Operation::Put
                    && decode::<EndpointHealth>(&entry.value).is_ok_and(|h| h.disabled);
                if caught_up {
                    let mut set = disabled.write().unwrap_or_else(|p| p.into_inner());
                    mark(&mut set, entry.key, is_disabled);
                } else {
                    mark(&mut fresh, entry.key, is_disabled);
                    if entry.delta == 0 {
                        caught_up = true;
                        *disabled.write().unwrap_or_else(|p| p.into_inner()) =
                            std::mem::take(&mut fresh);
                    }
                }
            }
            Ok::<(), QueueError>(())
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            result = followed => if let Err(e) = result {
                tracing::warn!(error = %e, "endpoint health watch interrupted");
            },
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

fn mark(set: &mut HashSet<String>, key: String, disabled: bool) {
    if disabled {
        set.insert(key);
    } else {
        set.remove(&key);
    }
}

/// Compare-and-set loop: read the record, fold `pending` in, write it back
/// at the revision read; on a concurrent write, read again. Returns the
/// transition the write made.
async fn merge(
    bucket: &kv::Store,
    key: &str,
    pending: &Pending,
    disable_after: Duration,
) -> Result<Written, QueueError> {
    for _ in 0..5 {
        let current = bucket
            .entry(key)
            .await
            .map_err(|e| QueueError::request("read endpoint health", e))?;
        let (health, revision) = match &current {
            Some(entry) if entry.operation == kv::Operation::Put => (
                decode::<EndpointHealth>(&entry.value).unwrap_or_default(),
                Some(entry.revision),
            ),
            Some(entry) => (EndpointHealth::default(), Some(entry.revision)),
            None => (EndpointHealth::default(), None),
        };
        let (health, transition) = pending.merge_into(health, herald_core::now_ms(), disable_after);
        if cas::write_at(
            bucket,
            key,
            encode(&health).into(),
            revision,
            "write endpoint health",
        )
        .await?
        {
            return Ok(Written {
                transition,
                base_revision: revision.unwrap_or(0),
            });
        }
        // Another worker wrote first: merge again.
    }
    Err(QueueError::request(
        "write endpoint health",
        "too many concurrent writers",
    ))
}

/// `herald-endpoint-health`.
pub(crate) async fn bucket(broker: &Broker) -> Result<kv::Store, QueueError> {
    broker
        .jetstream
        .get_key_value(names::HEALTH_BUCKET)
        .await
        .map_err(|e| QueueError::request("open health bucket", e))
}

/// Reads an endpoint's health record.
pub async fn read(
    broker: &Broker,
    user: &UserId,
    endpoint: &EndpointId,
) -> Result<Option<EndpointHealth>, QueueError> {
    let value = bucket(broker)
        .await?
        .get(names::endpoint_key(user, endpoint))
        .await
        .map_err(|e| QueueError::request("read endpoint health", e))?;
    Ok(value.and_then(|bytes| decode(&bytes).ok()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn failures(n: u64, first_ms: u64) -> Pending {
        Pending {
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

        let recovered = Pending {
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
        let gone = Pending {
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
        let notified = Pending {
            owner_notified: true,
            ..failures(3, 5)
        };
        let (health, _) = notified.merge_into(EndpointHealth::default(), 6, DAY);
        assert!(health.owner_notified);
        let success = Pending {
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
    fn batch(outcomes: &[&str]) -> Pending {
        let user = UserId::new("7").unwrap();
        let endpoint = EndpointId::new("hooks").unwrap();
        let task = TaskId::new("t-1").unwrap();
        let mut pending = Pending::default();
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
}
