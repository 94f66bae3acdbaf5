//! Writing a resource's record into `herald-endpoints`, and removing the
//! records it owns: only ever under the key its own identity gives, never
//! over a record another writer owns.

use herald_core::{EndpointId, UserId, payload::owner_of_resource, redact::RedactedUrl};
use herald_crd::{SpecError, WebhookEndpoint};
use herald_queue::endpoints::{self, Put, Removed};
use kube::ResourceExt;

use super::{Context, Error, Problem, secret};

/// Writes the resource's record, owned by it, unless its Secret or spec
/// is wrong or another writer owns the key; then removes its records under
/// any other user (a changed `userId`), unless `cleaned_up` says a
/// reconcile of this spec did already.
pub(super) async fn write(
    endpoint: &WebhookEndpoint,
    namespace: &str,
    name: &str,
    ctx: &Context,
    cleaned_up: bool,
) -> Result<Result<(UserId, EndpointId), Problem>, Error> {
    let secrets = match secret::signing_secrets(endpoint, namespace, ctx).await? {
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
    let put = endpoints::put(&ctx.broker, &ctx.records, &config)
        .await
        .map_err(Error::WriteRecord)?;
    match put {
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
    if !cleaned_up {
        remove_own(endpoint, namespace, ctx, Some(&config.user)).await?;
    }
    Ok(Ok((config.user, config.id)))
}

/// Removes the records this resource owns under every user but `keep`.
/// Which keys is derived from its identity (`*.<namespace>_<name>`);
/// records there that another writer owns are left alone.
pub(super) async fn remove_own(
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
    let users = endpoints::users_of(&ctx.broker, &id)
        .await
        .map_err(Error::RemoveRecords)?;
    for user in users {
        if Some(&user) == keep {
            continue;
        }
        let removed =
            endpoints::remove_owned(&ctx.broker, &ctx.records.keyring, &user, &id, &owner)
                .await
                .map_err(Error::RemoveRecords)?;
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
