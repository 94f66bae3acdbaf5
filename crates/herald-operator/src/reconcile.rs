//! One `WebhookEndpoint` into `herald-endpoints`, and its health into status.
//!
//! | situation | record in herald-endpoints | status |
//! |---|---|---|
//! | valid spec, secret resolved | written (if changed) | Ready=True; state from health |
//! | the namespace is not granted `userId` ([`crate::tenancy`]) | removed | Ready=False, `UserNotAllowed` |
//! | the key holds a record another writer owns | left alone | Ready=False, `KeyOwnedElsewhere` |
//! | `secretRef` Secret or key missing, bad secret | left as it was | Ready=False, reason says which |
//! | spec the schema let through but Herald refuses | left as it was | Ready=False, `InvalidSpec` |
//! | deleted | removed, then the finalizer | gone |
//!
//! The record's key comes from the resource's identity alone: user
//! `spec.userId` (checked against the namespace's grant), endpoint
//! `<namespace>_<name>` ([`EndpointId::from_resource`]). The record names
//! its owner, `kubernetes:<namespace>/<name>`, and the operator replaces
//! or removes only records it owns (or legacy ones without an owner under
//! the key its identity gives). Nothing on the resource a tenant writes
//! (no annotation) decides which key is written or removed.
//!
//! A problem is a status and an Event, never an error loop: the resource is
//! looked at again when it or a Secret it uses changes, and every
//! `health_resync` to refresh the health it reports.
//!
//! The files: [`record`] writes and removes the record, [`secret`] finds
//! (or generates) the signing secret, [`status`] turns the outcome and the
//! endpoint's health into conditions and Events, [`error`] names what
//! failed for a retry and for `herald_operator_reconcile_failures_total`.

mod error;
mod record;
mod secret;
mod states;
mod status;

use std::sync::Arc;

use herald_core::metrics::{FailedStep, metrics};
use herald_crd::{WebhookEndpoint, WebhookEndpointStatus};
use herald_queue::{Broker, endpoints::RecordWriter, health};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::Recorder,
        finalizer::{Event as Finalizer, finalizer},
    },
};

pub use error::Error;
pub use secret::uses_secret;

use crate::{OperatorConfig, tenancy::USERS_ANNOTATION};

pub const FINALIZER: &str = "herald.dev/endpoint-record";
/// The field manager of the operator's server-side applies.
pub const MANAGER: &str = "herald-operator";

pub struct Context {
    pub client: Client,
    pub broker: Broker,
    /// Seals records and keeps a replaced secret signing for the overlap.
    pub records: RecordWriter,
    pub recorder: Recorder,
    pub config: OperatorConfig,
}

/// Why an endpoint cannot be written: shown as Ready=False.
#[derive(Debug, Clone, PartialEq)]
struct Problem {
    reason: &'static str,
    message: String,
}

/// One reconcile, counted in `herald_operator_reconciles_total` and, when
/// it fails, in `herald_operator_reconcile_failures_total` under the
/// failed step's label.
pub async fn reconcile(endpoint: Arc<WebhookEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    metrics().operator_reconciles.inc();
    let result = reconcile_with_finalizer(endpoint, &ctx).await;
    if let Err(error) = &result {
        metrics()
            .operator_reconcile_failures
            .get_or_create(&FailedStep {
                error: error.metric_label(),
            })
            .inc();
    }
    result
}

async fn reconcile_with_finalizer(
    endpoint: Arc<WebhookEndpoint>,
    ctx: &Context,
) -> Result<Action, Error> {
    let namespace = endpoint.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<WebhookEndpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, endpoint, |event| async {
        match event {
            Finalizer::Apply(endpoint) => apply(&endpoint, &api, ctx).await,
            Finalizer::Cleanup(endpoint) => cleanup(&endpoint, ctx).await,
        }
    })
    .await
    .map_err(Error::from_finalizer)
}

pub fn error_policy(endpoint: Arc<WebhookEndpoint>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(
        endpoint = %endpoint.name_any(),
        %error,
        label = error.metric_label(),
        "reconcile failed; retrying"
    );
    Action::requeue(ctx.config.error_backoff)
}

async fn apply(
    endpoint: &WebhookEndpoint,
    api: &Api<WebhookEndpoint>,
    ctx: &Context,
) -> Result<Action, Error> {
    let namespace = endpoint.namespace().ok_or(Error::NoNamespace)?;
    let name = endpoint.name_any();
    let old_status = endpoint.status.clone().unwrap_or_default();

    let written = if user_allowed(endpoint, &namespace, ctx).await? {
        let cleaned_up = synced_at_this_generation(endpoint, &old_status);
        record::write(endpoint, &namespace, &name, ctx, cleaned_up).await?
    } else {
        // A grant withdrawn takes the record with it.
        record::remove_own(endpoint, &namespace, ctx, None).await?;
        Err(Problem {
            reason: "UserNotAllowed",
            message: ctx
                .config
                .tenancy
                .refusal(&namespace, &endpoint.spec.user_id),
        })
    };

    let mut status = WebhookEndpointStatus {
        observed_generation: endpoint.metadata.generation,
        ..old_status.clone()
    };
    match &written {
        Ok((user, id)) => {
            let health = health::read(&ctx.broker, user, id)
                .await
                .map_err(Error::ReadHealth)?;
            status::reflect_health(&mut status, endpoint.spec.paused, health.as_ref());
        }
        // Nothing is delivered to it: no delivery state either.
        Err(problem) if problem.reason == "UserNotAllowed" => status.state = None,
        Err(_) => {}
    }
    status.conditions = status::conditions(&old_status, &status, written.as_ref().err());
    states::record(&namespace, &name, status.state);

    status::publish_transitions(endpoint, &old_status, &status, written.as_ref().err(), ctx).await;
    if status != old_status {
        let patch = serde_json::json!({
            "apiVersion": "herald.dev/v1alpha1",
            "kind": "WebhookEndpoint",
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(Error::PatchStatus)?;
    }
    Ok(Action::requeue(ctx.config.health_resync))
}

/// Whether a reconcile of this very spec already wrote the record and
/// removed the resource's records under other users (status `Ready` at
/// this generation). Then a `userId` cannot have changed since, and the
/// search for such records, which the server answers by matching every
/// key of the bucket, is skipped: the periodic resync and a restart would
/// otherwise cost one such search per resource each time.
fn synced_at_this_generation(endpoint: &WebhookEndpoint, status: &WebhookEndpointStatus) -> bool {
    status.observed_generation.is_some()
        && status.observed_generation == endpoint.metadata.generation
        && status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

async fn cleanup(endpoint: &WebhookEndpoint, ctx: &Context) -> Result<Action, Error> {
    let namespace = endpoint.namespace().ok_or(Error::NoNamespace)?;
    record::remove_own(endpoint, &namespace, ctx, None).await?;
    states::forget(&namespace, &endpoint.name_any());
    tracing::info!(%namespace, name = %endpoint.name_any(), "endpoint removed from herald-endpoints");
    Ok(Action::await_change())
}

/// Whether the resource's namespace was granted its `userId` (see
/// [`crate::tenancy`]).
async fn user_allowed(
    endpoint: &WebhookEndpoint,
    namespace: &str,
    ctx: &Context,
) -> Result<bool, Error> {
    let tenancy = &ctx.config.tenancy;
    let user = &endpoint.spec.user_id;
    if tenancy.allows(namespace, None, user) {
        return Ok(true);
    }
    if !tenancy.namespace_annotation {
        return Ok(false);
    }
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    let annotation = namespaces
        .get_opt(namespace)
        .await
        .map_err(|source| Error::ReadNamespace {
            namespace: namespace.to_string(),
            source,
        })?
        .and_then(|ns| ns.annotations().get(USERS_ANNOTATION).cloned());
    Ok(tenancy.allows(namespace, annotation.as_deref(), user))
}

/// The reconciler against a scripted API server (no cluster): each request
/// it makes is checked and answered in turn ([`fixtures`]).
#[cfg(test)]
mod fixtures;
#[cfg(test)]
mod scripted;

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    use super::*;

    fn status(generation: Option<i64>, ready: &str) -> WebhookEndpointStatus {
        WebhookEndpointStatus {
            observed_generation: generation,
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: ready.into(),
                reason: "Synced".into(),
                message: String::new(),
                last_transition_time: Time(Default::default()),
                observed_generation: generation,
            }],
            ..WebhookEndpointStatus::default()
        }
    }

    /// The search for records under other users is skipped only after a
    /// complete reconcile of this spec: a `userId` changed together with a
    /// broken Secret is not Ready, so its old record is still looked for
    /// once the Secret is fixed.
    #[test]
    fn only_a_ready_status_of_this_generation_skips_the_search_for_other_users() {
        let endpoint = fixtures::endpoint("secret");
        assert_eq!(endpoint.metadata.generation, Some(3));
        assert!(synced_at_this_generation(
            &endpoint,
            &status(Some(3), "True")
        ));
        assert!(!synced_at_this_generation(
            &endpoint,
            &status(Some(3), "False")
        ));
        assert!(!synced_at_this_generation(
            &endpoint,
            &status(Some(2), "True")
        ));
        assert!(!synced_at_this_generation(&endpoint, &status(None, "True")));
        assert!(!synced_at_this_generation(
            &endpoint,
            &WebhookEndpointStatus::default()
        ));
    }
}
