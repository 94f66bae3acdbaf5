//! Leader election with a `coordination.k8s.io/v1` Lease, as client-go does
//! it: the leader renews the lease every `renew_interval`; a candidate takes
//! over once it has seen the same holder and renew time, unchanged, for a
//! whole lease duration (measured on its own clock, so clock skew between
//! machines does not matter). Every write carries the resourceVersion it
//! read, so two candidates cannot both win.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// Who this process is in the lease (the pod name, usually).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_interval: Duration,
}

pub struct LeaderElector {
    leases: Api<Lease>,
    settings: LeaseSettings,
    /// The other holder's record as last seen, and when it was first seen.
    observed: Option<(Observed, Instant)>,
}

#[derive(Debug, Clone, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
}

impl LeaderElector {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            leases: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    /// Waits until this process holds the lease (or `shutdown` fires:
    /// false). Between tries it watches the lease, so a lease given up on a
    /// clean shutdown is taken at once by a candidate that was waiting
    /// (the standby), not by whichever process polls next (often the
    /// leader's own replacement pod, just started).
    pub async fn acquire(&mut self, shutdown: &CancellationToken) -> bool {
        // Armed again at each timer tick, so a lease that stays free while
        // tries fail costs one extra try per interval, not a busy loop.
        let mut released = Some(Box::pin(released(
            self.leases.clone(),
            self.settings.name.clone(),
        )));
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.settings.name, identity = %self.settings.identity, "became the leader");
                    return true;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read or write the leader lease"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = sleep(self.settings.renew_interval) => {
                    if released.is_none() {
                        released = Some(Box::pin(self::released(
                            self.leases.clone(),
                            self.settings.name.clone(),
                        )));
                    }
                }
                _ = async {
                    match released.as_mut() {
                        Some(watch) => watch.await,
                        None => std::future::pending().await,
                    }
                } => released = None,
            }
        }
    }

    /// Renews the lease until `shutdown` fires (then releases it) or a
    /// renewal has not succeeded for a whole lease duration (then returns
    /// an error: another process may lead by now).
    pub async fn hold(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut last_renewal = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    self.release().await;
                    return Ok(());
                }
                _ = sleep(self.settings.renew_interval) => {}
            }
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => anyhow::bail!("lost the leader lease to another process"),
                Err(e) => tracing::warn!(error = %e, "cannot renew the leader lease"),
            }
            if last_renewal.elapsed() >= self.settings.lease_duration {
                anyhow::bail!(
                    "could not renew the leader lease for {:?}",
                    self.settings.lease_duration
                );
            }
        }
    }

    /// True when this process holds the lease after the call.
    async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let identity = self.settings.identity.clone();
        let duration_seconds =
            i32::try_from(self.settings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let Some(mut lease) = self.leases.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(identity),
                    lease_duration_seconds: Some(duration_seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let held_by_me = spec.holder_identity.as_deref() == Some(identity.as_str());
        if !held_by_me {
            let seen = Observed {
                holder: spec.holder_identity.clone(),
                renew_time: spec.renew_time.clone(),
            };
            let unchanged_since = match &self.observed {
                Some((previous, since)) if *previous == seen => *since,
                _ => {
                    let since = Instant::now();
                    self.observed = Some((seen, since));
                    since
                }
            };
            let their_duration = spec
                .lease_duration_seconds
                .map_or(self.settings.lease_duration, |s| {
                    Duration::from_secs(u64::try_from(s).unwrap_or(0))
                });
            let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
            if !free && unchanged_since.elapsed() < their_duration {
                return Ok(false);
            }
        }
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(identity),
            lease_duration_seconds: Some(duration_seconds),
            acquire_time: if held_by_me {
                spec.acquire_time
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!held_by_me)),
            ..spec
        });
        // The resourceVersion read above makes this a compare-and-swap.
        match self
            .leases
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up on a clean shutdown, so the next leader need not
    /// wait for it to expire.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.leases.get_opt(&self.settings.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .leases
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.settings.name, "released the leader lease"),
            Err(e) => tracing::warn!(error = %e, "could not release the leader lease"),
        }
    }
}

/// Resolves when the lease `name` shows no holder (given up, or new);
/// never when its watch fails (the caller's timer still retries).
async fn released(leases: Api<Lease>, name: String) {
    let changes = kube::runtime::watcher::watch_object(leases, &name);
    let mut changes = std::pin::pin!(changes);
    while let Some(change) = changes.next().await {
        let Ok(lease) = change else { continue };
        let holder = lease
            .as_ref()
            .and_then(|lease| lease.spec.as_ref())
            .and_then(|spec| spec.holder_identity.as_deref());
        if holder.is_none_or(str::is_empty) {
            return;
        }
    }
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use herald_testkit::{ControlPlane, wait_until};

    use super::*;

    fn settings(identity: &str) -> LeaseSettings {
        LeaseSettings {
            namespace: "default".into(),
            name: "herald-operator-test".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(60),
            // Far longer than the test waits: only the watch can wake the
            // standby in time.
            renew_interval: Duration::from_secs(120),
        }
    }

    #[tokio::test]
    async fn a_waiting_standby_takes_a_released_lease_at_once() {
        let control_plane = ControlPlane::start().await;
        let client = control_plane.client().await;
        let mut leader = LeaderElector::new(client.clone(), settings("leader"));
        let shutdown = CancellationToken::new();
        assert!(leader.acquire(&shutdown).await);
        let holding = tokio::spawn(leader.hold(shutdown.clone()));

        let standby_stop = CancellationToken::new();
        let mut standby = LeaderElector::new(client.clone(), settings("standby"));
        let waiting = {
            let stop = standby_stop.clone();
            tokio::spawn(async move { standby.acquire(&stop).await })
        };
        // The standby is waiting: the lease is still the leader's.
        let leases: Api<Lease> = Api::namespaced(client, "default");
        let holder = || async {
            leases
                .get("herald-operator-test")
                .await
                .ok()
                .and_then(|l| l.spec)
                .and_then(|s| s.holder_identity)
        };
        assert_eq!(holder().await.as_deref(), Some("leader"));
        assert!(!waiting.is_finished());

        // A clean shutdown gives the lease up; the standby takes it long
        // before its next timed try (two minutes away).
        shutdown.cancel();
        holding.await.unwrap().unwrap();
        let took = tokio::time::timeout(Duration::from_secs(30), waiting).await;
        assert!(
            matches!(took, Ok(Ok(true))),
            "the standby did not take the released lease: {took:?}"
        );
        wait_until(
            "the standby to hold the lease",
            Duration::from_secs(10),
            || async { (holder().await.as_deref() == Some("standby")).then_some(()) },
        )
        .await;
        standby_stop.cancel();
    }
}
