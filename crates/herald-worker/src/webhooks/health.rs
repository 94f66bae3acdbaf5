//! Endpoint health as the webhook workers keep it.
//!
//! Writing the record on every delivery would add a publish to the hot
//! path. Instead each worker folds outcomes into a local summary per
//! endpoint ([`Outcomes`]) and flushes it at most once per interval, and at
//! once when an endpoint turns from healthy to failing or back. The policy
//! (when an endpoint is disabled, what is a recovery) is
//! [`herald_core::health`]; the compare-and-set write is
//! [`herald_queue::health::update`].
//!
//! The worker whose write disables an endpoint, or whose write records the
//! first success after the owner was mailed about failures, publishes the
//! "disabled" or "recovered" mail. Every worker follows the bucket to know
//! which endpoints are disabled.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use herald_core::{
    EndpointId, TaskId, UserId,
    health::{Failure, Outcomes, Transition},
    names,
    outgoing::Outgoing,
    payload::{MailJob, MailReason},
    redact::RedactedUrl,
};
use herald_queue::{
    Broker,
    endpoints::EndpointCache,
    health::{self, DisabledEndpoints, Updated},
};
use tokio::sync::Notify;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

type Key = (UserId, EndpointId);

/// Folds delivery outcomes and flushes them to the health bucket.
#[derive(Clone)]
pub struct HealthTracker {
    pending: Arc<Mutex<HashMap<Key, Outcomes>>>,
    /// The endpoints this process last saw failing; every other one is
    /// taken as healthy, so the set holds only the failing ones.
    failing: Arc<Mutex<HashSet<Key>>>,
    disabled: DisabledEndpoints,
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
            disabled: DisabledEndpoints::follow_on(tasks, broker.clone(), stop.clone()),
            flush_now: Arc::new(Notify::new()),
            endpoints,
            disable_after,
        };
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
    pub(crate) fn is_disabled(&self, user: &UserId, endpoint: &EndpointId) -> bool {
        self.disabled.contains(user, endpoint)
    }

    /// Whether the bucket itself still has the endpoint disabled; forgets
    /// the local flag when it does not. A delivery arriving just after the
    /// endpoint was enabled can reach a worker before the bucket's watch
    /// does, and must not be held again. When the bucket cannot be read, the
    /// local flag stands.
    pub(crate) async fn confirm_disabled(
        &self,
        broker: &Broker,
        user: &UserId,
        endpoint: &EndpointId,
    ) -> bool {
        match health::read(broker, user, endpoint).await {
            Ok(Some(health)) if !health.disabled => {
                self.disabled.remove(user, endpoint);
                false
            }
            _ => true,
        }
    }

    pub(crate) fn record_success(
        &self,
        user: &UserId,
        endpoint: &EndpointId,
        task: &TaskId,
        at_ms: u64,
    ) {
        let key = (user.clone(), endpoint.clone());
        lock(&self.pending)
            .entry(key.clone())
            .or_default()
            .success(task, at_ms);
        self.flush_if_turned(key, false);
    }

    /// A failed attempt. `gone`: the endpoint answered 410 and is disabled
    /// at once. `owner_notified`: a mail about it is on its way.
    pub(crate) fn record_failure(&self, failure: Failure<'_>) {
        let key = (failure.user.clone(), failure.endpoint.clone());
        lock(&self.pending)
            .entry(key.clone())
            .or_default()
            .failure(&failure);
        if failure.gone {
            // Stop at once in this process; the bucket tells the others.
            self.disabled.insert(failure.user, failure.endpoint);
            self.flush_now.notify_one();
        }
        self.flush_if_turned(key, true);
    }

    /// Flushes at once when the endpoint turned from healthy to failing or
    /// back; the first success of an endpoint is no turn (it would make a
    /// flush of every delivery to a new endpoint).
    fn flush_if_turned(&self, key: Key, failing: bool) {
        let mut known_failing = lock(&self.failing);
        let turned = if failing {
            known_failing.insert(key)
        } else {
            known_failing.remove(&key)
        };
        if turned {
            self.flush_now.notify_one();
        }
    }

    async fn flush(&self, broker: &Broker) {
        let batch = std::mem::take(&mut *lock(&self.pending));
        let mut unwritten = HashMap::new();
        for ((user, endpoint), outcomes) in batch {
            let written = health::update(broker, &user, &endpoint, |stored| {
                Some(outcomes.merge_into(
                    stored.unwrap_or_default(),
                    herald_core::now_ms(),
                    self.disable_after,
                ))
            })
            .await;
            match written {
                Ok(Some(written)) => {
                    self.announce(broker, &user, &endpoint, &outcomes, written)
                        .await
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(%user, %endpoint, error = %e, "could not update endpoint health; keeping outcomes for the next flush");
                    unwritten.insert((user, endpoint), outcomes);
                }
            }
        }
        self.restore(unwritten);
    }

    /// Mails the owner about a transition this process's write made.
    async fn announce(
        &self,
        broker: &Broker,
        user: &UserId,
        endpoint: &EndpointId,
        outcomes: &Outcomes,
        written: Updated<Transition>,
    ) {
        let (reason, news) = match written.outcome {
            Transition::None | Transition::DisabledByGone => return,
            Transition::Disabled => (MailReason::EndpointDisabled, "disabled"),
            Transition::Recovered => (MailReason::EndpointRecovered, "recovered"),
        };
        if written.outcome == Transition::Disabled {
            self.disabled.insert(user, endpoint);
        }
        tracing::warn!(%user, %endpoint, ?reason, "endpoint health changed");
        let config = match self.endpoints.get(user, endpoint).await {
            Ok(Some(config)) => config,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(%user, %endpoint, error = %e, "cannot read the endpoint to mail its owner");
                return;
            }
        };
        let (Some(to), Some(task)) = (config.email.clone(), outcomes.last_task().cloned()) else {
            return;
        };
        let mail = MailJob::endpoint_news(
            user.clone(),
            endpoint.clone(),
            task,
            reason,
            to,
            RedactedUrl::from_text(&config.url).to_string(),
            outcomes.last_error().unwrap_or_default().to_string(),
        );
        let msg_id = names::endpoint_news_msg_id(user, endpoint, news, written.base_revision);
        if let Err(e) = broker.publish(Outgoing::mail(&mail, msg_id)).await {
            tracing::error!(%user, %endpoint, error = %e, "could not queue the endpoint mail");
        }
    }

    /// Puts unflushed outcomes back, under any that arrived meanwhile.
    fn restore(&self, batch: HashMap<Key, Outcomes>) {
        let mut pending = lock(&self.pending);
        for (key, older) in batch {
            let merged = older.under(pending.remove(&key));
            pending.insert(key, merged);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
