//! The `WebhookEndpoint` resource (group `herald.dev`, version `v1alpha1`)
//! and its translation into the [`EndpointConfig`] the workers read.
//!
//! `herald dev` reads these from a YAML file; the operator reads them from
//! the Kubernetes API. Both go through [`WebhookEndpointSpec::to_config`], so
//! a file and a cluster accept exactly the same endpoints.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{
    EndpointId, InvalidToken, UserId,
    payload::{EndpointConfig, VERSION},
    schedule::RetrySchedule,
    signing::SigningSecret,
};

pub const API_VERSION: &str = "herald.dev/v1alpha1";
pub const KIND: &str = "WebhookEndpoint";

/// The longest per-request timeout an endpoint may ask for.
pub const MAX_TIMEOUT_SECONDS: u64 = 120;

// The schema carries what the API server can check itself (URL scheme,
// email shape, the user's characters, bounds), so `kubectl apply` refuses a
// bad object with a message; `to_config` checks the rest.

/// How a user's task results reach one URL. A user may have several.
// Each printcolumn repeats `type_`: that is the kube attribute syntax, not a
// duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "herald.dev",
    version = "v1alpha1",
    kind = "WebhookEndpoint",
    namespaced,
    shortname = "whe",
    status = "WebhookEndpointStatus",
    doc = "Where Herald delivers a user's task results, and who hears when deliveries fail",
    printcolumn(name = "User", type_ = "string", json_path = ".spec.userId"),
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
    printcolumn(
        name = "Last Delivery",
        type_ = "date",
        json_path = ".status.lastDelivery"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEndpointSpec {
    /// The user whose task results go to this endpoint.
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,128}$"))]
    pub user_id: String,
    /// `http` or `https` URL that receives the webhooks.
    #[schemars(regex(pattern = r"^https?://[^\s/?#@]+[^\s]*$"), length(max = 2048))]
    pub url: String,
    /// Who is told when this endpoint keeps failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(email, length(max = 254))]
    pub email: Option<String>,
    /// The Secret key holding the `whsec_...` signing secret; without it the
    /// operator generates one in a Secret owned by this resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Event types delivered here (`transcode.completed`); empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub event_types: Vec<String>,
    /// Retry delays for this endpoint instead of the global schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Deliveries per second to this endpoint, across all workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,
    /// Request timeout, 1 to 120 seconds; the global default if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 120))]
    pub timeout_seconds: Option<u64>,
    /// Extra headers sent with every request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Hold deliveries (they are kept, not dropped) until unpaused.
    #[serde(default)]
    pub paused: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of a Secret in the resource's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key in the Secret whose value is the `whsec_...` secret.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    "secret".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RetrySpec {
    /// Delays between attempts, such as `["5s", "5m", "30m"]`.
    pub schedule: RetrySchedule,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    #[schemars(range(min = 1, max = 100000))]
    pub per_second: u32,
}

/// What the operator reports about an endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEndpointStatus {
    /// `Ready` (the endpoint is in herald-endpoints) and `Healthy`
    /// (deliveries succeed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Active, Failing, Disabled or Paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<EndpointState>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When a delivery last succeeded (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub last_delivery: Option<String>,
    /// Since when every delivery has failed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub failing_since: Option<String>,
    /// Failed attempts since the last success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum EndpointState {
    Active,
    Failing,
    Disabled,
    Paused,
}

/// Why a spec cannot become an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("userId: {0}")]
    User(InvalidToken),
    #[error("endpoint name: {0}")]
    Name(InvalidToken),
    #[error("url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("email {0:?} is not an email address")]
    Email(String),
    #[error("timeoutSeconds must be between 1 and {MAX_TIMEOUT_SECONDS}")]
    Timeout,
    #[error("headers: {0:?} is not a header Herald lets an endpoint set")]
    Header(String),
}

/// Headers the signature and transport own; an endpoint cannot override them.
const RESERVED_HEADERS: &[&str] = &[
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
];

/// Checks a webhook URL: absolute, `http` or `https`, with a host.
pub fn validate_url(url: &str) -> Result<url::Url, SpecError> {
    let bad = |reason: &str| SpecError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("scheme must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("credentials in the URL are not allowed; use headers"));
    }
    Ok(parsed)
}

/// A deliberately loose email check: one `@`, something on each side, a dot
/// in the domain, no spaces. SMTP has the last word.
pub fn validate_email(email: &str) -> Result<(), SpecError> {
    let bad = || SpecError::Email(email.to_string());
    let (local, domain) = email.split_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || domain.is_empty()
        || domain.contains('@')
        || !domain.contains('.')
        || email.chars().any(char::is_whitespace)
    {
        return Err(bad());
    }
    Ok(())
}

impl WebhookEndpointSpec {
    /// The endpoint record for the workers, given the resource's identity and
    /// its signing secrets (resolved by the caller from `secretRef`).
    pub fn to_config(
        &self,
        namespace: &str,
        name: &str,
        secrets: Vec<SigningSecret>,
    ) -> Result<EndpointConfig, SpecError> {
        let user = UserId::new(self.user_id.clone()).map_err(SpecError::User)?;
        let id = EndpointId::from_resource(namespace, name).map_err(SpecError::Name)?;
        validate_url(&self.url)?;
        if let Some(email) = &self.email {
            validate_email(email)?;
        }
        if let Some(t) = self.timeout_seconds
            && !(1..=MAX_TIMEOUT_SECONDS).contains(&t)
        {
            return Err(SpecError::Timeout);
        }
        if let Some(h) = self.headers.keys().find(|h| {
            RESERVED_HEADERS.contains(&h.to_ascii_lowercase().as_str())
                || reqwest_header_name_invalid(h)
        }) {
            return Err(SpecError::Header(h.clone()));
        }
        Ok(EndpointConfig {
            v: VERSION,
            user,
            id,
            url: self.url.clone(),
            email: self.email.clone(),
            secrets,
            previous_secrets: Vec::new(),
            event_types: self.event_types.clone(),
            retry_schedule: self.retry.as_ref().map(|r| r.schedule.clone()),
            timeout_ms: self.timeout_seconds.map(|s| s * 1000),
            headers: self.headers.clone(),
            paused: self.paused,
            rate_limit_per_second: self.rate_limit.as_ref().map(|r| r.per_second),
            owner: None,
        })
    }
}

/// An HTTP header name is a non-empty RFC 7230 token.
fn reqwest_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> WebhookEndpointSpec {
        WebhookEndpointSpec {
            user_id: "1".into(),
            url: url.into(),
            email: Some("ops@example.com".into()),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_plain_endpoint() {
        let config = spec("http://127.0.0.1:8080/hooks")
            .to_config("default", "user-1", vec![SigningSecret::generate()])
            .unwrap();
        assert_eq!(config.id.as_str(), "default_user-1");
        assert_eq!(config.user.as_str(), "1");
    }

    #[test]
    fn refuses_bad_specs_with_a_reason() {
        let cases = [
            (spec("ftp://x/"), "scheme"),
            (spec("not a url"), "url"),
            (spec("http://user:pw@x/"), "credentials"),
            (
                WebhookEndpointSpec {
                    user_id: "".into(),
                    ..spec("http://x/")
                },
                "userId",
            ),
            (
                WebhookEndpointSpec {
                    email: Some("nobody".into()),
                    ..spec("http://x/")
                },
                "email",
            ),
            (
                WebhookEndpointSpec {
                    timeout_seconds: Some(0),
                    ..spec("http://x/")
                },
                "timeoutSeconds",
            ),
            (
                WebhookEndpointSpec {
                    headers: [("webhook-signature".to_string(), "x".to_string())].into(),
                    ..spec("http://x/")
                },
                "headers",
            ),
        ];
        for (spec, word) in cases {
            let err = spec
                .to_config("default", "e", vec![])
                .unwrap_err()
                .to_string();
            assert!(err.contains(word), "{err:?} does not mention {word}");
        }
    }
}
