//! The resource's signing secret: from the Secret its `secretRef` names,
//! or from (and, the first time, into) a Secret generated for it and owned
//! by it. Reading the value is [`herald_crd::SecretKeyRef::signing_secret`],
//! the same check `herald dev` makes of an endpoints file.

use std::collections::BTreeMap;

use herald_core::signing::SigningSecret;
use herald_crd::{SecretKeyRef, WebhookEndpoint};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Resource, ResourceExt,
    api::{ObjectMeta, PostParams},
    runtime::events::{Event, EventType},
};

use super::{Context, Error, MANAGER, Problem};

/// The key of a generated Secret holding the signing secret.
const GENERATED_SECRET_KEY: &str = "secret";

/// The Secret generated for the resource named `endpoint` that has no
/// `secretRef`.
pub fn generated_secret_name(endpoint: &str) -> String {
    format!("{endpoint}{GENERATED_SECRET_SUFFIX}")
}

const GENERATED_SECRET_SUFFIX: &str = "-signing-secret";

/// Whether `secret` is a Secret the reconciler of `endpoint` reads: the one
/// its `secretRef` names, or else its generated one. No allocation: the
/// Secret watch asks this of every resource for every Secret event.
pub fn uses_secret(
    endpoint: &WebhookEndpoint,
    secret_namespace: Option<&str>,
    secret: &str,
) -> bool {
    if endpoint.metadata.namespace.as_deref() != secret_namespace {
        return false;
    }
    match &endpoint.spec.secret_ref {
        Some(reference) => reference.name == secret,
        None => secret.strip_suffix(GENERATED_SECRET_SUFFIX) == endpoint.metadata.name.as_deref(),
    }
}

/// The endpoint's signing secrets, or the problem with its Secret.
pub(super) async fn signing_secrets(
    endpoint: &WebhookEndpoint,
    namespace: &str,
    ctx: &Context,
) -> Result<Result<Vec<SigningSecret>, Problem>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let reference = endpoint
        .spec
        .secret_ref
        .clone()
        .unwrap_or_else(|| SecretKeyRef {
            name: generated_secret_name(&endpoint.name_any()),
            key: GENERATED_SECRET_KEY.to_string(),
        });
    let found = secrets
        .get_opt(&reference.name)
        .await
        .map_err(|source| Error::ReadSecret {
            name: reference.name.clone(),
            source,
        })?;
    let found = match found {
        None if endpoint.spec.secret_ref.is_none() => {
            let generated = create_generated_secret(endpoint, &secrets, &reference.name).await?;
            ctx.recorder
                .publish(
                    &Event {
                        type_: EventType::Normal,
                        reason: "SecretGenerated".into(),
                        note: Some(format!(
                            "generated signing secret in Secret {}",
                            reference.name
                        )),
                        action: "GenerateSecret".into(),
                        secondary: None,
                    },
                    &endpoint.object_ref(&()),
                )
                .await
                .ok();
            Some(generated)
        }
        found => found,
    };
    Ok(reference
        .signing_secret(namespace, found.as_ref())
        .map(|secret| vec![secret])
        .map_err(|e| Problem {
            reason: e.reason(),
            message: e.to_string(),
        }))
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
    let failed = |source| Error::CreateSecret {
        name: name.to_string(),
        source,
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(created) => Ok(created),
        // Created concurrently (a previous reconcile): use that one.
        Err(kube::Error::Api(e)) if e.code == 409 => secrets.get(name).await.map_err(failed),
        Err(e) => Err(failed(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::fixtures::endpoint;

    #[test]
    fn a_secret_is_used_by_the_resource_naming_it_or_generated_for_it_in_its_namespace() {
        let referencing = endpoint("shared");
        assert!(uses_secret(&referencing, Some("default"), "shared"));
        assert!(!uses_secret(&referencing, Some("other"), "shared"));
        assert!(!uses_secret(
            &referencing,
            Some("default"),
            "orders-signing-secret"
        ));

        let mut generating = endpoint("unused");
        generating.spec.secret_ref = None;
        assert!(uses_secret(
            &generating,
            Some("default"),
            "orders-signing-secret"
        ));
        assert!(!uses_secret(
            &generating,
            Some("default"),
            "other-signing-secret"
        ));
        assert!(!uses_secret(&generating, Some("default"), "orders"));
        assert!(!uses_secret(&generating, None, "orders-signing-secret"));
    }
}
