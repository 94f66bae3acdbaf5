//! The `WebhookEndpoint` resource's Rust type, from which its CRD and
//! OpenAPI schema are generated.

use std::collections::BTreeMap;

use herald_core::schedule::{MAX_RETRIES, RetrySchedule};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const API_VERSION: &str = "herald.dev/v1alpha1";
pub const KIND: &str = "WebhookEndpoint";

// The schema carries what the API server can check itself (URL scheme,
// email shape, the user's characters, bounds), so `kubectl apply` refuses a
// bad object with a message; `to_config` (in `config.rs`) checks the rest.

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
    /// Send the delivery's W3C `traceparent` and `tracestate` with each
    /// request, so a receiver that traces too joins Herald's trace. Off by
    /// default: the header tells the receiver trace and span ids of the
    /// sender's tracing system.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub send_trace_context: bool,
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
    #[schemars(schema_with = "retry_schedule_schema")]
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

/// A retry schedule as the API server can check it: a list of human
/// durations. Written here, not derived, since the type lives in
/// `herald-core`, which knows nothing of schemas.
fn retry_schedule_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "description": "Delays between attempts, such as [\"5s\", \"5m\", \"30m\"].",
        "maxItems": MAX_RETRIES,
        "items": {
            "type": "string",
            "pattern": r"^\s*[0-9]+\s*[a-zµ]+(\s*[0-9]+\s*[a-zµ]+)*\s*$"
        }
    })
}
