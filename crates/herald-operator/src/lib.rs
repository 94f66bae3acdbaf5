//! The `WebhookEndpoint` operator: reconciles each resource into the
//! `herald-endpoints` bucket the workers read, and reflects the health the
//! webhook workers record (`herald-endpoint-health`) into its status.
//!
//! One replica leads at a time (a Lease); the others wait to take over.

mod leader;
mod reconcile;
mod tenancy;

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use herald_crd::WebhookEndpoint;
use herald_queue::{Broker, endpoints::RecordWriter};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        Controller, WatchStreamExt, controller,
        events::Recorder,
        reflector::{self, ObjectRef},
        watcher,
    },
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use leader::{LeaderElector, LeaseSettings};
use reconcile::{Context, error_policy, reconcile, uses_secret};
pub use tenancy::TenancyConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OperatorConfig {
    /// The namespace whose WebhookEndpoints are reconciled; empty: every
    /// namespace (needs cluster-wide permissions).
    pub watch_namespace: String,
    /// Namespace of the leader-election Lease; empty: `POD_NAMESPACE`, else
    /// `default`.
    pub lease_namespace: String,
    pub lease_name: String,
    /// How long a leader's lease lasts without renewal.
    #[serde(with = "herald_core::duration_serde")]
    pub lease_duration: Duration,
    /// How often the leader renews (and a candidate retries).
    #[serde(with = "herald_core::duration_serde")]
    pub renew_interval: Duration,
    /// How often each resource's status is refreshed from endpoint health.
    #[serde(with = "herald_core::duration_serde")]
    pub health_resync: Duration,
    /// Delay before retrying a reconcile that failed (API or NATS error).
    #[serde(with = "herald_core::duration_serde")]
    pub error_backoff: Duration,
    /// Resources reconciled at once. Each reconcile makes a few API
    /// requests; unbounded, a start on thousands of resources sends them
    /// all at once and the API server answers with timeouts.
    pub concurrency: u16,
    /// Which users each namespace may serve, declared by the cluster admin.
    pub tenancy: TenancyConfig,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            watch_namespace: String::new(),
            lease_namespace: String::new(),
            lease_name: "herald-operator".into(),
            lease_duration: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
            health_resync: Duration::from_secs(30),
            error_backoff: Duration::from_secs(5),
            concurrency: 64,
            tenancy: TenancyConfig::default(),
        }
    }
}

impl OperatorConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.renew_interval >= self.lease_duration {
            return Err(
                "operator.renew_interval must be shorter than operator.lease_duration".into(),
            );
        }
        if self.lease_name.is_empty() {
            return Err("operator.lease_name is empty".into());
        }
        self.tenancy.validate()
    }

    fn lease_namespace(&self) -> String {
        if !self.lease_namespace.is_empty() {
            return self.lease_namespace.clone();
        }
        std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into())
    }
}

/// Who this process is, in the Lease and in Events: the pod name when the
/// chart sets `POD_NAME`, else the host name and process id.
fn identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "herald".into());
        format!("{host}-{}", std::process::id())
    })
}

/// Waits for leadership, then reconciles until `shutdown` fires or the
/// lease is lost (an error: the process should exit and start over as a
/// candidate). `on_leading` is called once this process leads. `records`
/// says how endpoint records are sealed and how long a replaced signing
/// secret keeps signing.
pub async fn run(
    config: OperatorConfig,
    client: Client,
    broker: Broker,
    records: RecordWriter,
    shutdown: CancellationToken,
    on_leading: impl FnOnce(),
) -> anyhow::Result<()> {
    let identity = identity();
    let mut elector = LeaderElector::new(
        client.clone(),
        LeaseSettings {
            namespace: config.lease_namespace(),
            name: config.lease_name.clone(),
            identity: identity.clone(),
            lease_duration: config.lease_duration,
            renew_interval: config.renew_interval,
        },
    );
    if !elector.acquire(&shutdown).await {
        return Ok(());
    }
    on_leading();
    // Leading ends with shutdown, or when the lease is lost: then stop
    // reconciling at once.
    let leading = shutdown.child_token();
    let holding = tokio::spawn({
        let leading = leading.clone();
        async move {
            let held = elector.hold(leading.clone()).await;
            leading.cancel();
            held
        }
    });

    let (endpoints, secrets): (Api<WebhookEndpoint>, Api<Secret>) =
        if config.watch_namespace.is_empty() {
            (Api::all(client.clone()), Api::all(client.clone()))
        } else {
            (
                Api::namespaced(client.clone(), &config.watch_namespace),
                Api::namespaced(client.clone(), &config.watch_namespace),
            )
        };
    let recorder = Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: reconcile::MANAGER.into(),
            instance: Some(identity),
        },
    );
    let tenancy_annotation = config.tenancy.namespace_annotation;
    let watch_namespace = config.watch_namespace.clone();
    let context = Arc::new(Context {
        client,
        broker,
        records,
        recorder,
        config,
    });
    // A resource is reconciled when what the reconciler acts on changes
    // (see `what_reconciling_reads`), not on its own status patches: with
    // every status change going round again, each health refresh made
    // every resource's reads twice.
    let (store, writer) = reflector::store();
    let changed = watcher(endpoints, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(what_reconciling_reads, Default::default());
    let controller = Controller::for_stream(changed, store.clone())
        .with_config(controller::Config::default().concurrency(context.config.concurrency));
    let namespace_store = store.clone();
    let stop = leading.clone();
    let controller = if tenancy_annotation {
        // A Namespace's herald.dev/users annotation grants users: a change
        // reconciles every resource in it, so a grant or a revocation
        // takes effect at once. Only the watched namespace when there is
        // one (RBAC can then name it).
        let namespaces_watched = if watch_namespace.is_empty() {
            watcher::Config::default()
        } else {
            watcher::Config::default().fields(&format!("metadata.name={watch_namespace}"))
        };
        controller.watches(
            Api::<Namespace>::all(context.client.clone()),
            namespaces_watched,
            move |namespace| {
                let name = namespace.name_any();
                namespace_store
                    .state()
                    .into_iter()
                    .filter(|endpoint| endpoint.namespace().as_deref() == Some(name.as_str()))
                    .map(|endpoint| ObjectRef::from_obj(&*endpoint))
                    .collect::<Vec<_>>()
            },
        )
    } else {
        controller
    };
    controller
        // A Secret change reconciles every resource that uses it: the one
        // it names in secretRef, or the one whose generated Secret it is.
        .watches(secrets, watcher::Config::default(), move |secret| {
            let namespace = secret.metadata.namespace.as_deref();
            let name = secret.metadata.name.as_deref().unwrap_or_default();
            // A scan of every resource per Secret event, so nothing in it
            // allocates: at start-up there is one event per Secret.
            store
                .state()
                .into_iter()
                .filter(|endpoint| uses_secret(endpoint, namespace, name))
                .map(|endpoint| ObjectRef::from_obj(&*endpoint))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile error");
            }
        })
        .await;
    leading.cancel();
    holding.await?
}

/// A hash of what a reconcile of `endpoint` depends on in the object
/// itself: its spec (through `generation`), its finalizers (the finalizer
/// helper adds Herald's and waits for the change to come back) and its
/// deletion. Not its status, which only the reconciler writes; a Secret or
/// Namespace change reconciles through its own watch, and health through
/// the periodic requeue.
fn what_reconciling_reads(endpoint: &WebhookEndpoint) -> Option<u64> {
    let mut hasher = DefaultHasher::new();
    endpoint.metadata.generation.hash(&mut hasher);
    endpoint.metadata.finalizers.hash(&mut hasher);
    // Set once, when the deletion starts.
    endpoint
        .metadata
        .deletion_timestamp
        .is_some()
        .hash(&mut hasher);
    Some(hasher.finish())
}

#[cfg(test)]
mod tests {
    use herald_crd::WebhookEndpointStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;

    /// Status patches (the reconciler's own) reconcile nothing; a spec
    /// change, a finalizer change or the start of a deletion does.
    #[test]
    fn only_what_the_reconciler_acts_on_lets_a_change_through() {
        let mut endpoint: WebhookEndpoint = serde_json::from_value(serde_json::json!({
            "apiVersion": "herald.dev/v1alpha1",
            "kind": "WebhookEndpoint",
            "metadata": { "name": "orders", "namespace": "default", "generation": 1 },
            "spec": { "userId": "acme", "url": "https://hooks.example.com/in" },
        }))
        .unwrap();
        let before = what_reconciling_reads(&endpoint);

        endpoint.status = Some(WebhookEndpointStatus {
            observed_generation: Some(1),
            ..Default::default()
        });
        endpoint.metadata.resource_version = Some("42".into());
        assert_eq!(what_reconciling_reads(&endpoint), before, "a status patch");

        let mut changed = endpoint.clone();
        changed.metadata.generation = Some(2);
        assert_ne!(what_reconciling_reads(&changed), before, "a spec change");

        let mut changed = endpoint.clone();
        changed.metadata.finalizers = Some(vec!["herald.dev/record".into()]);
        assert_ne!(what_reconciling_reads(&changed), before, "a finalizer");

        let mut changed = endpoint.clone();
        changed.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert_ne!(what_reconciling_reads(&changed), before, "a deletion");
    }
}
