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

use std::{collections::BTreeMap, sync::Arc};

use herald_core::{
    EndpointId, UserId,
    payload::{EndpointHealth, owner_of_resource},
    redact::RedactedUrl,
    signing::SigningSecret,
};
use herald_crd::{EndpointState, SpecError, WebhookEndpoint, WebhookEndpointStatus};
use herald_queue::{
    Broker,
    endpoints::{self, Put, RecordWriter, Removed},
    health,
};
use k8s_openapi::{
    ByteString,
    api::core::v1::{Namespace, Secret},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder},
        finalizer::{Event as Finalizer, finalizer},
    },
};

use crate::{OperatorConfig, tenancy::USERS_ANNOTATION};

pub const FINALIZER: &str = "herald.dev/endpoint-record";
/// The field manager of the operator's server-side applies.
pub const MANAGER: &str = "herald-operator";
/// The key of a generated Secret holding the signing secret.
pub const GENERATED_SECRET_KEY: &str = "secret";

pub struct Context {
    pub client: Client,
    pub broker: Broker,
    /// Seals records and keeps a replaced secret signing for the overlap.
    pub records: RecordWriter,
    pub recorder: Recorder,
    pub config: OperatorConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("NATS: {0}")]
    Queue(#[from] herald_queue::QueueError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("the resource has no namespace")]
    NoNamespace,
}

/// Why an endpoint cannot be written: shown as Ready=False.
#[derive(Debug, Clone, PartialEq)]
struct Problem {
    reason: &'static str,
    message: String,
}

pub async fn reconcile(endpoint: Arc<WebhookEndpoint>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = endpoint.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<WebhookEndpoint> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, endpoint, |event| async {
        match event {
            Finalizer::Apply(endpoint) => apply(&endpoint, &api, &ctx).await,
            Finalizer::Cleanup(endpoint) => cleanup(&endpoint, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub fn error_policy(endpoint: Arc<WebhookEndpoint>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(endpoint = %endpoint.name_any(), %error, "reconcile failed; retrying");
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
        write_record(endpoint, &namespace, &name, ctx).await?
    } else {
        // A grant withdrawn takes the record with it.
        remove_own_records(endpoint, &namespace, ctx, None).await?;
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
    let ready = match &written {
        Ok((user, id)) => {
            let health = health::read(&ctx.broker, user, id).await?;
            reflect_health(&mut status, endpoint.spec.paused, health.as_ref());
            condition(
                &old_status,
                "Ready",
                true,
                "Synced",
                "the endpoint is in herald-endpoints",
            )
        }
        Err(problem) => {
            if problem.reason == "UserNotAllowed" {
                // Nothing is delivered to it: no delivery state either.
                status.state = None;
            }
            condition(
                &old_status,
                "Ready",
                false,
                problem.reason,
                &problem.message,
            )
        }
    };
    let healthy = match status.state {
        Some(EndpointState::Failing) => condition(
            &old_status,
            "Healthy",
            false,
            "DeliveriesFailing",
            &format!(
                "{} consecutive failed attempts",
                status.consecutive_failures.unwrap_or(0)
            ),
        ),
        Some(EndpointState::Disabled) => condition(
            &old_status,
            "Healthy",
            false,
            "Disabled",
            "deliveries are disabled",
        ),
        _ => condition(
            &old_status,
            "Healthy",
            true,
            "Delivering",
            "no failed attempts since the last success",
        ),
    };
    status.conditions = vec![ready, healthy];

    publish_transitions(endpoint, &old_status, &status, written.as_ref().err(), ctx).await;
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
        .await?;
    }
    Ok(Action::requeue(ctx.config.health_resync))
}

/// Writes the resource's record, owned by it, unless its Secret or spec
/// is wrong or another writer owns the key; then removes its records under
/// any other user (a changed `userId`).
async fn write_record(
    endpoint: &WebhookEndpoint,
    namespace: &str,
    name: &str,
    ctx: &Context,
) -> Result<Result<(UserId, EndpointId), Problem>, Error> {
    let secrets = match signing_secrets(endpoint, namespace, ctx).await? {
        Ok(secrets) => secrets,
        Err(problem) => return Ok(Err(problem)),
    };
    let mut config = match endpoint.spec.to_config(namespace, name, secrets) {
        Ok(config) => config,
        Err(e) => {
            return Ok(Err(Problem {
                reason: "InvalidSpec",
                message: describe_spec_error(&e),
            }));
        }
    };
    config.owner = Some(owner_of_resource(namespace, name));
    match endpoints::put(&ctx.broker, &ctx.records, &config).await? {
        Put::OwnedElsewhere { owner } => {
            let key = herald_core::names::endpoint_key(&config.user, &config.id);
            return Ok(Err(Problem {
                reason: "KeyOwnedElsewhere",
                message: format!(
                    "herald-endpoints key {key} holds a record owned by {owner}, not by this \
                     resource; it is left alone"
                ),
            }));
        }
        Put::Written => {
            let url = RedactedUrl::from_text(&config.url);
            tracing::info!(%namespace, %name, %url, "endpoint written to herald-endpoints");
        }
        Put::Unchanged => {}
    }
    remove_own_records(endpoint, namespace, ctx, Some(&config.user)).await?;
    Ok(Ok((config.user, config.id)))
}

async fn cleanup(endpoint: &WebhookEndpoint, ctx: &Context) -> Result<Action, Error> {
    let namespace = endpoint.namespace().ok_or(Error::NoNamespace)?;
    remove_own_records(endpoint, &namespace, ctx, None).await?;
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
        .await?
        .and_then(|ns| ns.annotations().get(USERS_ANNOTATION).cloned());
    Ok(tenancy.allows(namespace, annotation.as_deref(), user))
}

/// Removes the records this resource owns under every user but `keep`.
/// Which keys is derived from its identity (`*.<namespace>_<name>`);
/// records there that another writer owns are left alone.
async fn remove_own_records(
    endpoint: &WebhookEndpoint,
    namespace: &str,
    ctx: &Context,
    keep: Option<&UserId>,
) -> Result<(), Error> {
    let name = endpoint.name_any();
    let Ok(id) = EndpointId::from_resource(namespace, &name) else {
        // A name too long for an endpoint id never had a record.
        return Ok(());
    };
    let owner = owner_of_resource(namespace, &name);
    for user in endpoints::users_of(&ctx.broker, &id).await? {
        if Some(&user) == keep {
            continue;
        }
        let removed =
            endpoints::remove_owned(&ctx.broker, &ctx.records.keyring, &user, &id, &owner).await?;
        match removed {
            Removed::Removed => {
                tracing::info!(%namespace, %name, %user, "endpoint record removed from herald-endpoints");
            }
            Removed::OwnedElsewhere { owner } => {
                tracing::warn!(%namespace, %name, %user, %owner, "left an endpoint record another writer owns");
            }
            Removed::Absent => {}
        }
    }
    Ok(())
}

/// A spec error for status and Events: a URL only redacted, since it may
/// carry a credential and Events are read by more people than its owner.
fn describe_spec_error(error: &SpecError) -> String {
    match error {
        SpecError::Url { url, reason } => {
            format!("url {}: {reason}", RedactedUrl::from_text(url))
        }
        other => other.to_string(),
    }
}

/// The endpoint's signing secrets: from `secretRef`, or from (and, the
/// first time, into) a generated Secret the resource owns.
async fn signing_secrets(
    endpoint: &WebhookEndpoint,
    namespace: &str,
    ctx: &Context,
) -> Result<Result<Vec<SigningSecret>, Problem>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let (secret_name, key) = match &endpoint.spec.secret_ref {
        Some(reference) => (reference.name.clone(), reference.key.clone()),
        None => (
            generated_secret_name(&endpoint.name_any()),
            GENERATED_SECRET_KEY.to_string(),
        ),
    };
    let secret = match secrets.get_opt(&secret_name).await? {
        Some(secret) => secret,
        None if endpoint.spec.secret_ref.is_some() => {
            return Ok(Err(Problem {
                reason: "SecretNotFound",
                message: format!("Secret {secret_name} does not exist in {namespace}"),
            }));
        }
        None => {
            let generated = create_generated_secret(endpoint, &secrets, &secret_name).await?;
            ctx.recorder
                .publish(
                    &Event {
                        type_: EventType::Normal,
                        reason: "SecretGenerated".into(),
                        note: Some(format!("generated signing secret in Secret {secret_name}")),
                        action: "GenerateSecret".into(),
                        secondary: None,
                    },
                    &endpoint.object_ref(&()),
                )
                .await
                .ok();
            generated
        }
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|data| data.get(&key))
        .map(|bytes| String::from_utf8_lossy(&bytes.0).trim().to_string());
    let Some(value) = value else {
        return Ok(Err(Problem {
            reason: "SecretKeyMissing",
            message: format!("Secret {secret_name} has no key {key}"),
        }));
    };
    Ok(match SigningSecret::parse(&value) {
        Ok(secret) => Ok(vec![secret]),
        Err(e) => Err(Problem {
            reason: "InvalidSecret",
            message: format!("Secret {secret_name} key {key}: {e}"),
        }),
    })
}

pub fn generated_secret_name(endpoint: &str) -> String {
    format!("{endpoint}-signing-secret")
}

async fn create_generated_secret(
    endpoint: &WebhookEndpoint,
    secrets: &Api<Secret>,
    name: &str,
) -> Result<Secret, Error> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            owner_references: endpoint.controller_owner_ref(&()).map(|r| vec![r]),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                MANAGER.to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            GENERATED_SECRET_KEY.to_string(),
            ByteString(SigningSecret::generate().expose().into_bytes()),
        )])),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(created) => Ok(created),
        // Created concurrently (a previous reconcile): use that one.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(secrets.get(name).await?),
        Err(e) => Err(e.into()),
    }
}

/// State, last delivery, failing since and failures, from the record the
/// webhook workers keep.
fn reflect_health(
    status: &mut WebhookEndpointStatus,
    paused: bool,
    health: Option<&EndpointHealth>,
) {
    let failures = health.map_or(0, |h| h.consecutive_failures);
    status.state = Some(if paused {
        EndpointState::Paused
    } else if health.is_some_and(|h| h.disabled) {
        EndpointState::Disabled
    } else if failures > 0 {
        EndpointState::Failing
    } else {
        EndpointState::Active
    });
    status.consecutive_failures = Some(failures);
    status.last_delivery = health
        .and_then(|h| h.last_success_ms)
        .map(herald_core::rfc3339);
    status.failing_since = health
        .filter(|_| failures > 0)
        .and_then(|h| h.failing_since_ms)
        .map(herald_core::rfc3339);
}

/// A condition, keeping its transition time when its status is unchanged
/// (so an unchanged status patches nothing).
fn condition(
    old: &WebhookEndpointStatus,
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = old
        .conditions
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map_or_else(
            || Time(Timestamp::now()),
            |c| c.last_transition_time.clone(),
        );
    Condition {
        type_: kind.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time,
        observed_generation: None,
    }
}

/// Events when readiness or the delivery state changes.
async fn publish_transitions(
    endpoint: &WebhookEndpoint,
    old: &WebhookEndpointStatus,
    new: &WebhookEndpointStatus,
    problem: Option<&Problem>,
    ctx: &Context,
) {
    let was = |kind: &str| {
        old.conditions
            .iter()
            .find(|c| c.type_ == kind)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    let mut events = Vec::new();
    match problem {
        Some(problem) if was("Ready") != Some(("False".into(), problem.reason.into())) => {
            events.push(Event {
                type_: EventType::Warning,
                reason: problem.reason.into(),
                note: Some(problem.message.clone()),
                action: "Reconcile".into(),
                secondary: None,
            });
        }
        None if was("Ready").is_none_or(|(status, _)| status != "True") => {
            events.push(Event {
                type_: EventType::Normal,
                reason: "Synced".into(),
                note: Some(format!(
                    "delivering to {}",
                    RedactedUrl::from_text(&endpoint.spec.url)
                )),
                action: "Reconcile".into(),
                secondary: None,
            });
        }
        _ => {}
    }
    if old.state.is_some() && new.state != old.state {
        let (type_, reason) = match new.state {
            Some(EndpointState::Failing) => (EventType::Warning, "Failing"),
            Some(EndpointState::Disabled) => (EventType::Warning, "Disabled"),
            Some(EndpointState::Paused) => (EventType::Normal, "Paused"),
            _ => (EventType::Normal, "Recovered"),
        };
        events.push(Event {
            type_,
            reason: reason.into(),
            note: Some(format!(
                "state {:?} -> {:?}",
                old.state.unwrap_or(EndpointState::Active),
                new.state.unwrap_or(EndpointState::Active)
            )),
            action: "Deliver".into(),
            secondary: None,
        });
    }
    for event in events {
        if let Err(e) = ctx
            .recorder
            .publish(&event, &endpoint.object_ref(&()))
            .await
        {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(failures: u64) -> EndpointHealth {
        EndpointHealth {
            v: 1,
            consecutive_failures: failures,
            failing_since_ms: (failures > 0).then_some(1_000),
            last_success_ms: Some(500),
            last_failure_ms: None,
            last_error: None,
            ..Default::default()
        }
    }

    #[test]
    fn health_becomes_state() {
        let mut status = WebhookEndpointStatus::default();
        reflect_health(&mut status, false, None);
        assert_eq!(status.state, Some(EndpointState::Active));
        assert_eq!(status.last_delivery, None);

        reflect_health(&mut status, false, Some(&health(3)));
        assert_eq!(status.state, Some(EndpointState::Failing));
        assert_eq!(status.consecutive_failures, Some(3));
        assert_eq!(
            status.failing_since.as_deref(),
            Some("1970-01-01T00:00:01Z")
        );

        reflect_health(&mut status, false, Some(&health(0)));
        assert_eq!(status.state, Some(EndpointState::Active));
        assert_eq!(status.failing_since, None);
        assert!(status.last_delivery.is_some());

        reflect_health(&mut status, true, Some(&health(3)));
        assert_eq!(status.state, Some(EndpointState::Paused));
    }

    #[test]
    fn an_unchanged_condition_keeps_its_transition_time() {
        let first = condition(
            &WebhookEndpointStatus::default(),
            "Ready",
            true,
            "Synced",
            "",
        );
        let old = WebhookEndpointStatus {
            conditions: vec![first.clone()],
            ..Default::default()
        };
        let again = condition(&old, "Ready", true, "Synced", "");
        assert_eq!(again, first);
        let flipped = condition(&old, "Ready", false, "SecretNotFound", "x");
        assert_eq!(flipped.status, "False");
    }
}

/// The reconciler against a scripted API server (no cluster): each request
/// it makes is checked and answered in turn ([`fixtures`]).
#[cfg(test)]
mod fixtures;

#[cfg(test)]
mod scripted_api_server {
    use http::Method;
    use serde_json::json;

    use super::{
        fixtures::{endpoint, scripted},
        *,
    };

    #[tokio::test]
    async fn a_missing_secret_is_ready_false_with_an_event_and_no_error() {
        let (ctx, mut server) = scripted().await;
        let api_server = tokio::spawn(async move {
            let not_found = json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "reason": "NotFound", "code": 404, "message": "secrets \"later\" not found",
            });
            server
                .expect(
                    Method::GET,
                    "/api/v1/namespaces/default/secrets/later",
                    404,
                    not_found,
                )
                .await;
            let (event, patch) = server.expect_event_then_status(&endpoint("later")).await;
            assert_eq!(event["reason"], "SecretNotFound");
            assert_eq!(event["type"], "Warning");
            assert_eq!(event["regarding"]["name"], "orders");
            let ready = &patch["status"]["conditions"][0];
            assert_eq!(ready["type"], "Ready");
            assert_eq!(ready["status"], "False");
            assert_eq!(ready["reason"], "SecretNotFound");
            assert_eq!(patch["status"]["observedGeneration"], 3);
            // No state while nothing is delivered to.
            assert!(patch["status"].get("state").is_none(), "{patch}");
        });
        let action = reconcile(Arc::new(endpoint("later")), ctx.clone())
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(ctx.config.health_resync));
        api_server.await.unwrap();
    }

    #[tokio::test]
    async fn a_secret_that_is_not_whsec_is_reported_as_invalid() {
        let (ctx, mut server) = scripted().await;
        let api_server = tokio::spawn(async move {
            let secret = json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": { "name": "plain", "namespace": "default" },
                "data": { "secret": "aHVudGVyMg==" },
            });
            server
                .expect(
                    Method::GET,
                    "/api/v1/namespaces/default/secrets/plain",
                    200,
                    secret,
                )
                .await;
            let (event, patch) = server.expect_event_then_status(&endpoint("plain")).await;
            assert_eq!(event["reason"], "InvalidSecret");
            // The message says where to look, and never shows the value.
            let note = event["note"].as_str().unwrap();
            assert!(
                note.contains("plain") && !note.contains("hunter2"),
                "{note}"
            );
            assert_eq!(patch["status"]["conditions"][0]["reason"], "InvalidSecret");
        });
        reconcile(Arc::new(endpoint("plain")), ctx).await.unwrap();
        api_server.await.unwrap();
    }
}
