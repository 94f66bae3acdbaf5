//! Versioned JSON payloads carried by the streams and buckets.
//!
//! Every payload has `"v": 1`. A payload that does not parse, or has another
//! version, is terminated and recorded by the worker that reads it; it is
//! never retried forever.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    EndpointId, TaskId, TaskType, UserId, schedule::RetrySchedule, signing::SigningSecret,
};

/// The only payload version this build reads and writes.
pub const VERSION: u8 = 1;

/// A payload that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is not valid JSON for this message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("payload version {0} is not supported (this build reads version {VERSION})")]
    Version(u8),
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u8,
}

/// Parses a versioned payload, refusing versions this build does not know.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, PayloadError> {
    let probe: VersionProbe = serde_json::from_slice(bytes)?;
    if probe.v != VERSION {
        return Err(PayloadError::Version(probe.v));
    }
    Ok(serde_json::from_slice(bytes)?)
}

/// Serializes a payload. Payload types hold only strings, numbers and JSON
/// values, for which serde_json cannot fail.
pub fn encode<T: Serialize>(payload: &T) -> Vec<u8> {
    serde_json::to_vec(payload).expect("payload types always serialize")
}

/// A task as accepted by the API (`HERALD_TASKS`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskMessage {
    pub v: u8,
    pub id: TaskId,
    pub user: UserId,
    #[serde(rename = "type")]
    pub task_type: TaskType,
    pub accepted_at_ms: u64,
    /// The client's JSON body, verbatim.
    pub input: Box<RawValue>,
}

/// One webhook to deliver (`HERALD_WEBHOOKS`): one per task and endpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryJob {
    pub v: u8,
    pub task: TaskId,
    pub user: UserId,
    pub endpoint: EndpointId,
    /// `<task type>.completed` or `<task type>.failed`.
    pub event_type: String,
    /// The exact request body; identical on every attempt, so a receiver
    /// sees the same bytes under the same `webhook-id`. Carried as raw JSON
    /// (not as an escaped string, which could double its size); a job
    /// written by an earlier build, with the body as a JSON string, reads
    /// the same.
    #[serde(with = "raw_body")]
    pub body: String,
    pub accepted_at_ms: u64,
    /// The attempt this message carries: 1 when fanned out, n+1 when the
    /// worker schedules a retry after attempt n.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// The redeliver or recover request that re-sent this delivery, if any;
    /// it keeps that round's message ids apart from the original's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivery: Option<String>,
    /// The send time (unix ms) reserved for this attempt under the
    /// endpoint's rate limit; the job was deferred to it and sends without
    /// reserving again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_slot_ms: Option<u64>,
    /// When a worker first found no record for the endpoint (unix ms): the
    /// delivery is held until `webhooks.endpoint_removed_grace` after
    /// that, so a record that comes back (an operator rewriting it) still
    /// gets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_missing_since_ms: Option<u64>,
    /// The endpoint's record as the task worker read it for the fan-out,
    /// still sealed: the webhook worker that takes the job uses it instead
    /// of reading the bucket again, unless its watch shows it may be out of
    /// date (`herald_queue::endpoints::EndpointCache::endpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<CarriedRecord>,
}

/// An endpoint's record from `herald-endpoints`, as stored (sealed with
/// the keyring under the record's key, so it opens for that key only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedRecord {
    /// The record's revision in the bucket.
    pub revision: u64,
    /// The bucket's sequence the view it was taken from is true as of: the
    /// key had no later change up to this one.
    pub as_of: u64,
    /// The stored bytes, a JSON document, carried as raw JSON.
    #[serde(with = "raw_body")]
    pub sealed: String,
}

fn first_attempt() -> u32 {
    1
}

impl DeliveryJob {
    /// The Standard Webhooks `webhook-id`: one per task and endpoint, the
    /// same on every attempt and in every redelivery round, so a receiver
    /// can de-duplicate on it whatever Herald repeats.
    pub fn webhook_id(&self) -> String {
        crate::names::delivery_msg_id(&self.task, &self.endpoint)
    }

    /// `Nats-Msg-Id` of the job that starts the delivery: the fan-out's is
    /// the `webhook-id` (a redelivered task cannot fan out twice); a
    /// redelivery round's is its attempt 1, apart from earlier rounds' so
    /// the stream's duplicate window does not drop it.
    pub fn first_msg_id(&self) -> String {
        match &self.redelivery {
            None => self.webhook_id(),
            Some(round) => crate::names::attempt_msg_id(&self.task, &self.endpoint, Some(round), 1),
        }
    }
}

/// [`DeliveryJob::body`] on the wire: the body's JSON as it is, or, in
/// jobs from earlier builds, a JSON string holding it.
mod raw_body {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::value::RawValue;

    pub fn serialize<S: Serializer>(body: &str, serializer: S) -> Result<S::Ok, S::Error> {
        // Raw only when that gives back exactly these bytes (a webhook body
        // is compact JSON, so always in practice).
        match serde_json::from_str::<&RawValue>(body) {
            Ok(raw) if raw.get().len() == body.len() => raw.serialize(serializer),
            _ => body.serialize(serializer),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
        let raw = <Box<RawValue>>::deserialize(deserializer)?;
        if raw.get().starts_with('"') {
            serde_json::from_str(raw.get()).map_err(serde::de::Error::custom)
        } else {
            Ok(String::from(Box::<str>::from(raw)))
        }
    }
}

/// Why a mail is sent about an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MailReason {
    /// Every attempt of the retry schedule failed.
    AttemptsExhausted,
    /// The endpoint answered 410 Gone.
    EndpointGone,
    /// The endpoint kept failing for the disabling period and is disabled.
    EndpointDisabled,
    /// The endpoint answered 2xx again after its owner was told it failed.
    EndpointRecovered,
}

/// A notification to the owner of a failing endpoint (`HERALD_MAIL`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MailJob {
    pub v: u8,
    pub task: TaskId,
    pub user: UserId,
    pub endpoint: EndpointId,
    pub url: String,
    pub to: String,
    pub reason: MailReason,
    pub attempts: u32,
    pub last_error: String,
    pub failed_at_ms: u64,
    /// The redelivery round whose attempts ended in this mail, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivery: Option<String>,
}

impl MailJob {
    /// The mail that ends `job`'s delivery (exhausted or gone) after
    /// `attempts` attempts, the last of them at `failed_at_ms`.
    pub fn ending_delivery(
        job: &DeliveryJob,
        reason: MailReason,
        to: String,
        url: String,
        attempts: u32,
        last_error: String,
        failed_at_ms: u64,
    ) -> Self {
        Self {
            v: VERSION,
            task: job.task.clone(),
            user: job.user.clone(),
            endpoint: job.endpoint.clone(),
            url,
            to,
            reason,
            attempts,
            last_error,
            failed_at_ms,
            redelivery: job.redelivery.clone(),
        }
    }

    /// `Nats-Msg-Id` of a mail [`Self::ending_delivery`]: one per delivery
    /// and round, so a round that fails again mails again.
    pub fn ending_delivery_msg_id(&self) -> String {
        crate::names::mail_msg_id(&self.task, &self.endpoint, self.redelivery.as_deref())
    }

    /// A mail about the endpoint as a whole (disabled, recovered); `task`
    /// is the delivery that made the change.
    pub fn endpoint_news(
        user: UserId,
        endpoint: EndpointId,
        task: TaskId,
        reason: MailReason,
        to: String,
        url: String,
        last_error: String,
    ) -> Self {
        Self {
            v: VERSION,
            task,
            user,
            endpoint,
            url,
            to,
            reason,
            attempts: 0,
            last_error,
            failed_at_ms: crate::now_ms(),
            redelivery: None,
        }
    }
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// 2xx: the webhook is delivered.
    Delivered,
    /// A failure with attempts left; another try is scheduled.
    Retrying,
    /// A failure with no attempts left: the owner is mailed.
    Exhausted,
    /// 410 Gone: no more attempts, the owner is mailed.
    Gone,
    /// The endpoint was removed before the delivery; nothing was sent.
    EndpointRemoved,
    /// The endpoint has no email: attempts ended and nobody could be told.
    Abandoned,
    /// The endpoint is disabled: nothing was sent and the delivery is kept
    /// for the recover call.
    Held,
}

impl MailReason {
    /// The name used on the wire (snake case), for spans and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MailReason::AttemptsExhausted => "attempts_exhausted",
            MailReason::EndpointGone => "endpoint_gone",
            MailReason::EndpointDisabled => "endpoint_disabled",
            MailReason::EndpointRecovered => "endpoint_recovered",
        }
    }

    /// Whether the mail ends a delivery (rather than telling about the
    /// endpoint as a whole).
    pub fn ends_delivery(self) -> bool {
        matches!(
            self,
            MailReason::AttemptsExhausted | MailReason::EndpointGone
        )
    }
}

impl AttemptOutcome {
    /// The name used on the wire and as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Retrying => "retrying",
            AttemptOutcome::Exhausted => "exhausted",
            AttemptOutcome::Gone => "gone",
            AttemptOutcome::EndpointRemoved => "endpoint_removed",
            AttemptOutcome::Abandoned => "abandoned",
            AttemptOutcome::Held => "held",
        }
    }
}

/// One webhook attempt, recorded in `HERALD_ATTEMPTS`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeliveryAttempt {
    pub endpoint: EndpointId,
    pub url: String,
    /// 1 for the first try.
    pub attempt: u32,
    pub at_ms: u64,
    pub outcome: AttemptOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub latency_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The start of the response body, at most [`RESPONSE_BODY_LIMIT`] bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
    /// When the next attempt is due, for `retrying`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_in_ms: Option<u64>,
    /// The redelivery round this attempt belongs to; absent for the
    /// deliveries the task fanned out to. Attempt numbers start at 1 in
    /// every round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivery: Option<String>,
}

/// How much of a response body an attempt record keeps.
pub const RESPONSE_BODY_LIMIT: usize = 1024;

/// The outcome of a mail about a failing endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MailOutcome {
    pub endpoint: EndpointId,
    /// What the mail was about; absent in records written before endpoint
    /// mails existed, which were all about failed deliveries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<MailReason>,
    pub to: String,
    pub attempt: u32,
    pub at_ms: u64,
    pub sent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The redelivery round the mail is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redelivery: Option<String>,
}

/// Why a delivery was sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum RedeliveryCause {
    /// `POST /users/{user}/tasks/{id}/redeliver`.
    Redeliver,
    /// `POST /users/{user}/endpoints/{endpoint}/recover`, or enabling a
    /// disabled endpoint, which recovers what it held.
    Recover,
}

/// A delivery queued again: it starts a new round of attempts, and from
/// then on the latest round decides the delivery's state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RedeliveryQueued {
    pub endpoint: EndpointId,
    /// The round's id, carried by its jobs, attempts and mail.
    pub redelivery: String,
    pub cause: RedeliveryCause,
    pub at_ms: u64,
}

/// A request to send a finished task's webhook again (`HERALD_TASKS`,
/// [`crate::names::replay_subject`]), published by the API's redeliver,
/// recover and enable calls and carried out by the task worker.
///
/// It names a task and endpoints, never a body: the task worker rebuilds
/// the webhook from the task's stored record and sends it only to
/// endpoints that record lists, so whoever may publish a request can at
/// most have a user's own webhook re-sent to that user's own endpoints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplayRequest {
    pub v: u8,
    pub user: UserId,
    pub task: TaskId,
    /// The endpoints to send it to again; each must be one the task was
    /// fanned out to.
    pub endpoints: Vec<EndpointId>,
    /// The round's id: its jobs' `Nats-Msg-Id`s, attempts and mail carry
    /// it, so handling the request twice queues nothing twice.
    pub redelivery: String,
    pub cause: RedeliveryCause,
}

impl ReplayRequest {
    pub fn new(
        user: UserId,
        task: TaskId,
        endpoints: Vec<EndpointId>,
        redelivery: String,
        cause: RedeliveryCause,
    ) -> Self {
        Self {
            v: VERSION,
            user,
            task,
            endpoints,
            redelivery,
            cause,
        }
    }
}

/// An entry of a task's history in `HERALD_ATTEMPTS`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskEvent {
    Delivery(DeliveryAttempt),
    Mail(MailOutcome),
    Redelivery(RedeliveryQueued),
}

impl TaskEvent {
    /// The endpoint the event is about.
    pub fn endpoint(&self) -> &EndpointId {
        match self {
            TaskEvent::Delivery(attempt) => &attempt.endpoint,
            TaskEvent::Mail(mail) => &mail.endpoint,
            TaskEvent::Redelivery(queued) => &queued.endpoint,
        }
    }

    /// When the event happened (unix ms).
    pub fn at_ms(&self) -> u64 {
        match self {
            TaskEvent::Delivery(attempt) => attempt.at_ms,
            TaskEvent::Mail(mail) => mail.at_ms,
            TaskEvent::Redelivery(queued) => queued.at_ms,
        }
    }

    /// The redelivery round the event belongs to; `None` for the deliveries
    /// the task fanned out to.
    pub fn redelivery(&self) -> Option<&str> {
        match self {
            TaskEvent::Delivery(attempt) => attempt.redelivery.as_deref(),
            TaskEvent::Mail(mail) => mail.redelivery.as_deref(),
            TaskEvent::Redelivery(queued) => Some(&queued.redelivery),
        }
    }
}

/// The envelope of a [`TaskEvent`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskEventMessage {
    pub v: u8,
    pub task: TaskId,
    #[serde(flatten)]
    pub event: TaskEvent,
}

impl TaskEventMessage {
    pub fn new(task: TaskId, event: TaskEvent) -> Self {
        Self {
            v: VERSION,
            task,
            event,
        }
    }
}

/// What the task handler made of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerOutcome {
    Completed,
    Failed,
}

impl HandlerOutcome {
    /// The suffix of the event type: `<task type>.completed` or `.failed`.
    pub fn event_suffix(self) -> &'static str {
        match self {
            HandlerOutcome::Completed => "completed",
            HandlerOutcome::Failed => "failed",
        }
    }
}

/// A task after its handler ran (`herald-tasks`), written once by the task
/// worker. Delivery progress is not written here: it is derived from the
/// task's events in `HERALD_ATTEMPTS` (see [`crate::state`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    pub v: u8,
    pub id: TaskId,
    pub user: UserId,
    #[serde(rename = "type")]
    pub task_type: TaskType,
    pub accepted_at_ms: u64,
    pub finished_at_ms: u64,
    pub outcome: HandlerOutcome,
    /// What the handler returned, as the exact JSON it produced (an echo
    /// keeps the client's key order and number spelling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The endpoints a delivery job was published for; empty means the user
    /// had none.
    pub endpoints: Vec<EndpointId>,
    /// The W3C `traceparent` of the task's span, when Herald traces: a
    /// replay's span links to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// An endpoint's configuration (`herald-endpoints`), written by the operator
/// or by `herald dev` from a file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointConfig {
    pub v: u8,
    pub user: UserId,
    pub id: EndpointId,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Signing secrets, newest first; every one signs while several are
    /// listed (rotation).
    pub secrets: Vec<SigningSecret>,
    /// Secrets a rotation replaced, still signing until their time is up
    /// (see [`EndpointConfig::signing_secrets`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_secrets: Vec<PreviousSecret>,
    /// Event types this endpoint receives; empty means all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<String>,
    /// Overrides the global retry schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_schedule: Option<RetrySchedule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub paused: bool,
    /// Deliveries per second across every webhook worker, if limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_second: Option<u32>,
    /// Whether requests carry the delivery's W3C `traceparent` (when
    /// Herald traces), for receivers in the same tracing system.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub send_trace_context: bool,
    /// Who wrote the record and alone may replace or remove it: the
    /// operator names the resource ([`owner_of_resource`]), an endpoints
    /// file (`herald dev`, `herald endpoints`) is `herald-file`. `None`:
    /// written by a Herald from before owners, adopted by the first writer
    /// whose own identity gives the same key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// The owner of the record a `WebhookEndpoint` resource writes. Its
/// namespace and name, not its uid: a resource deleted and created again
/// under the same name (a finalizer removed by hand, a restore from a
/// backup) takes its record back instead of being locked out of it.
pub fn owner_of_resource(namespace: &str, name: &str) -> String {
    format!("kubernetes:{namespace}/{name}")
}

impl EndpointConfig {
    /// Whether this endpoint subscribes to `event_type`.
    pub fn wants(&self, event_type: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type)
    }
}

/// A signing secret that was replaced, kept signing alongside its
/// successor so receivers can switch without missing a webhook.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PreviousSecret {
    pub secret: SigningSecret,
    /// When it stops signing.
    pub until_ms: u64,
}

/// Delivery health of an endpoint (`herald-endpoint-health`), kept by the
/// webhook workers and reflected into the resource's status by the operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EndpointHealth {
    pub v: u8,
    pub consecutive_failures: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default)]
    pub disabled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// The owner was mailed about failures since the last success, so the
    /// next success sends a "recovered" mail.
    #[serde(default)]
    pub owner_notified: bool,
}

impl TaskRecord {
    /// The event type and exact body of the task's webhook. Built only from
    /// the record, so a redelivery sends the same bytes as the original.
    pub fn webhook(&self) -> (String, String) {
        let event_type = format!("{}.{}", self.task_type, self.outcome.event_suffix());
        let body = serde_json::to_string(&WebhookBody {
            event_type: &event_type,
            timestamp: crate::rfc3339(self.finished_at_ms),
            data: WebhookData {
                task_id: self.id.as_str(),
                user: self.user.as_str(),
                task_type: self.task_type.as_str(),
                result: self.result.as_deref(),
                error: self.error.as_deref(),
            },
        })
        .expect("webhook bodies always serialize");
        (event_type, body)
    }

    /// The job that delivers `webhook` (from [`Self::webhook`]) to
    /// `endpoint`: attempt 1 of the fan-out, or of redelivery round
    /// `redelivery`.
    pub fn delivery_job(
        &self,
        endpoint: &EndpointId,
        (event_type, body): &(String, String),
        redelivery: Option<String>,
    ) -> DeliveryJob {
        DeliveryJob {
            v: VERSION,
            task: self.id.clone(),
            user: self.user.clone(),
            endpoint: endpoint.clone(),
            event_type: event_type.clone(),
            body: body.clone(),
            accepted_at_ms: self.accepted_at_ms,
            attempt: 1,
            redelivery,
            rate_slot_ms: None,
            endpoint_missing_since_ms: None,
            record: None,
        }
    }
}

/// The body of a webhook request (Standard Webhooks payload structure).
#[derive(Debug, Serialize)]
pub struct WebhookBody<'a> {
    #[serde(rename = "type")]
    pub event_type: &'a str,
    /// RFC 3339 time of the event.
    pub timestamp: String,
    pub data: WebhookData<'a>,
}

#[derive(Debug, Serialize)]
pub struct WebhookData<'a> {
    pub task_id: &'a str,
    pub user: &'a str,
    #[serde(rename = "type")]
    pub task_type: &'a str,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_match_the_wire_names() {
        use AttemptOutcome::*;
        for outcome in [
            Delivered,
            Retrying,
            Exhausted,
            Gone,
            EndpointRemoved,
            Abandoned,
            Held,
        ] {
            assert_eq!(serde_json::to_value(outcome).unwrap(), outcome.as_str());
        }
    }

    #[test]
    fn decode_refuses_unknown_versions_and_garbage() {
        assert!(matches!(
            decode::<EndpointHealth>(br#"{"v":2}"#),
            Err(PayloadError::Version(2))
        ));
        assert!(matches!(
            decode::<EndpointHealth>(b"not json"),
            Err(PayloadError::Json(_))
        ));
        let health: EndpointHealth = decode(br#"{"v":1,"consecutive_failures":3}"#).unwrap();
        assert_eq!(health.consecutive_failures, 3);
    }

    #[test]
    fn a_job_carries_its_body_as_raw_json_and_reads_old_string_bodies() {
        let body = r#"{"data":{"q":"\"\"\\","n":1e5}}"#;
        let job = DeliveryJob {
            v: VERSION,
            task: TaskId::new("t1").unwrap(),
            user: UserId::new("u").unwrap(),
            endpoint: EndpointId::new("e").unwrap(),
            event_type: "echo.completed".into(),
            body: body.into(),
            accepted_at_ms: 1,
            attempt: 1,
            redelivery: None,
            rate_slot_ms: None,
            endpoint_missing_since_ms: None,
            record: None,
        };
        let wire = String::from_utf8(encode(&job)).unwrap();
        assert!(wire.contains(&format!(r#""body":{body}"#)), "{wire}");
        let back: DeliveryJob = decode(wire.as_bytes()).unwrap();
        assert_eq!(back.body, body);
        // As an earlier build wrote it: the body as a JSON string.
        let old = serde_json::json!({
            "v": 1, "task": "t1", "user": "u", "endpoint": "e",
            "event_type": "echo.completed", "body": body, "accepted_at_ms": 1,
        });
        let back: DeliveryJob = decode(old.to_string().as_bytes()).unwrap();
        assert_eq!(back.body, body);
    }

    #[test]
    fn a_job_carries_the_sealed_record_as_raw_json_and_reads_without_one() {
        let without = serde_json::json!({
            "v": 1, "task": "t1", "user": "u", "endpoint": "e",
            "event_type": "echo.completed", "body": {"n": 1}, "accepted_at_ms": 1,
        });
        let mut job: DeliveryJob = decode(without.to_string().as_bytes()).unwrap();
        assert_eq!(job.record, None);
        let sealed = r#"{"v":1,"sealed":"k1.bm9uY2U.Y2lwaGVy"}"#;
        job.record = Some(CarriedRecord {
            revision: 42,
            as_of: 50,
            sealed: sealed.into(),
        });
        let wire = String::from_utf8(encode(&job)).unwrap();
        assert!(
            wire.contains(&format!(
                r#""record":{{"revision":42,"as_of":50,"sealed":{sealed}}}"#
            )),
            "{wire}"
        );
        let back: DeliveryJob = decode(wire.as_bytes()).unwrap();
        assert_eq!(back.record, job.record);
    }

    #[test]
    fn a_replay_request_names_a_round_and_carries_no_body() {
        let request = ReplayRequest::new(
            UserId::new("u").unwrap(),
            TaskId::new("t1").unwrap(),
            vec![EndpointId::new("e").unwrap()],
            "rc-7".into(),
            RedeliveryCause::Recover,
        );
        let wire: serde_json::Value = serde_json::from_slice(&encode(&request)).unwrap();
        let mut fields: Vec<_> = wire.as_object().unwrap().keys().cloned().collect();
        fields.sort();
        assert_eq!(
            fields,
            ["cause", "endpoints", "redelivery", "task", "user", "v"]
        );
        assert_eq!(decode::<ReplayRequest>(&encode(&request)).unwrap(), request);
        assert_eq!(
            crate::names::replay_subject(&request.user, &request.task, &request.redelivery),
            "herald.replays.u.t1.rc-7"
        );
    }

    #[test]
    fn task_events_are_tagged_by_kind() {
        let event = TaskEventMessage {
            v: VERSION,
            task: TaskId::new("t1").unwrap(),
            event: TaskEvent::Mail(MailOutcome {
                reason: None,
                endpoint: EndpointId::new("e").unwrap(),
                to: "ops@example.com".into(),
                attempt: 1,
                at_ms: 5,
                sent: true,
                error: None,
                redelivery: None,
            }),
        };
        let json = String::from_utf8(encode(&event)).unwrap();
        assert!(json.contains(r#""kind":"mail""#), "{json}");
        let back: TaskEventMessage = decode(json.as_bytes()).unwrap();
        assert_eq!(back.event, event.event);
    }

    #[test]
    fn a_stored_record_gives_the_same_webhook_bytes() {
        let record = TaskRecord {
            v: VERSION,
            id: TaskId::new("t1").unwrap(),
            user: UserId::new("u").unwrap(),
            task_type: TaskType::new("transcode").unwrap(),
            accepted_at_ms: 1,
            finished_at_ms: 1_700_000_000_123,
            outcome: HandlerOutcome::Completed,
            result: Some(
                RawValue::from_string(r#"{"z":1.50,"a":[1,"x"],"m":{"k":null}}"#.into()).unwrap(),
            ),
            error: None,
            endpoints: vec![],
            traceparent: None,
        };
        let (event_type, body) = record.webhook();
        assert_eq!(event_type, "transcode.completed");
        let stored: TaskRecord = decode(&encode(&record)).unwrap();
        assert_eq!(stored.webhook(), (event_type, body.clone()));
        let parsed: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(parsed["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(parsed["data"]["result"]["z"], 1.5);
        // The handler's bytes, not a re-serialization: key order and number
        // spelling kept.
        assert!(
            body.contains(r#""result":{"z":1.50,"a":[1,"x"],"m":{"k":null}}"#),
            "{body}"
        );

        let failed = TaskRecord {
            outcome: HandlerOutcome::Failed,
            result: None,
            error: Some("boom".into()),
            ..record
        };
        let (event_type, body) = failed.webhook();
        assert_eq!(event_type, "transcode.failed");
        assert!(body.contains(r#""error":"boom""#), "{body}");
    }
}
