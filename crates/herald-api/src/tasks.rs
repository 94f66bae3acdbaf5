//! `/users/{user}/tasks`: accept a task, show a task.

use axum::{
    Json,
    body::{Body, to_bytes},
    extract::{Path, State, rejection::PathRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use std::time::Duration;

use herald_core::{
    TaskId, TaskType, UserId,
    json::{self, JsonError},
    payload::{RedeliveryCause, TaskEvent, TaskMessage, VERSION},
    rfc3339,
    state::{EndpointDeliveryState, TaskState, current_round, endpoint_state, task_state},
};
use herald_queue::{
    history::{self, StoredTask},
    publish::Outgoing,
};
use serde::Serialize;
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::{ApiError, AppState, error::ErrorBody};

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

fn user_token(user: String) -> Result<UserId, ApiError> {
    UserId::new(user).map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct Accepted {
    id: TaskId,
}

/// Post a task.
///
/// The body is the task's input, any JSON (an empty body is `null`). The
/// answer is `201` once JetStream has stored the task, never before. While
/// NATS fails over, the API keeps trying for `topology.store_timeout`, and the
/// stream stores the task once however many tries it took. `503` means it
/// was not stored, or that NATS stopped answering for all of that time
/// after the task was sent, when it may have been: posting again with an
/// `Idempotency-Key` is always safe. With an `Idempotency-Key`, posting
/// again answers with the same task id and stores nothing new.
#[utoipa::path(
    post,
    path = "/users/{user}/tasks/{task}",
    tag = "tasks",
    operation_id = "create_task",
    params(
        ("user" = UserId, Path, description = "The user the task is for."),
        ("task" = TaskType, Path, description = "The task type, such as `transcode`; selects the handler."),
        // What idempotency_key() accepts: 1 to 255 printable ASCII
        // characters, spaces inside only. Whitespace after it is allowed
        // because HTTP parsers trim it before the API sees the value (so the
        // length limit is in the pattern, which can say "not counting it").
        ("Idempotency-Key" = Option<String>, Header, pattern = "^[!-~]([ -~]{0,253}[!-~])?[ \\t]*$",
            description = "The same key for the same user names the same task: a retried POST stores nothing new."),
    ),
    request_body(
        content = Option<serde_json::Value>,
        content_type = "application/json",
        description = "The task's input: any JSON value, at most `api.max_body_bytes` bytes.",
    ),
    responses(
        (status = 201, description = "Stored; the task will run.", body = Accepted,
            headers(
                ("Location" = String, description = "The task's URL."),
                ("Idempotent-Replayed" = String, description = "`true` when an earlier POST with this Idempotency-Key stored the task."),
            ),
            links(("GetTask" = (
                operation_id = "get_task",
                parameters(("user" = "$request.path.user"), ("task" = "$response.body#/id")),
                description = "The task just accepted.",
            ))),
        ),
        (status = 400, description = "A bad user, task type, Idempotency-Key or JSON body; a body nesting deeper than `api.max_json_depth`, with a number beyond a 64-bit float or an invalid `\\u` escape is refused too, with the reason.", body = ErrorBody),
        (status = 408, description = "The body was not sent within `api.body_read_timeout`.", body = ErrorBody),
        (status = 413, description = "The body is larger than `api.max_body_bytes`, or than the NATS server's `max_payload` less Herald's envelope; the message names the limit.", body = ErrorBody),
        (status = 415, description = "The body is not `application/json` (or `application/*+json`).", body = ErrorBody),
        (status = 503, description = "NATS is unavailable: the task was not stored (or, if NATS stopped answering after it was sent, may have been: retry with an Idempotency-Key), retry later.", body = ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait."))),
    ),
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Path((user, task_type)) = path?;
    let user = user_token(user)?;
    let task_type = TaskType::new(task_type).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let idempotency_key = idempotency_key(&headers)?;
    let input = read_json_body(&headers, body, &state.task_body_rules()).await?;

    let (id, replayed) = match &idempotency_key {
        Some(key) => {
            let id = TaskId::for_idempotency_key(&user, key);
            // A task stored under this key earlier is the answer. Two
            // concurrent first posts both publish, and JetStream keeps one
            // (same Nats-Msg-Id inside the duplicate window).
            let stored = history::find_task(&state.broker, &user, &id)
                .await?
                .is_some();
            (id, stored)
        }
        None => (TaskId::generate(), false),
    };
    if !replayed {
        let message = TaskMessage {
            v: VERSION,
            id: id.clone(),
            user: user.clone(),
            task_type: task_type.clone(),
            accepted_at_ms: herald_core::now_ms(),
            input,
        };
        state
            .broker
            .publish_stored(Outgoing::task(&message))
            .await?;
        herald_core::metrics::metrics().tasks_accepted.inc();
    }
    let location = format!("/users/{user}/tasks/{id}");
    let mut response = (
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(Accepted { id }),
    )
        .into_response();
    if replayed {
        response.headers_mut().insert(
            "idempotent-replayed",
            header::HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    // Exactly the documented pattern: printable ASCII, spaces allowed
    // inside (hyper already trimmed both ends). `to_str` alone would let a
    // tab through.
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
        .filter(|k| k.bytes().all(|b| (b' '..=b'~').contains(&b)))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
            ))
        })?;
    Ok(Some(key.to_string()))
}

/// Room in every stored message for what Herald puts around a task's
/// input: the task message, the record and the delivery job each wrap it in
/// ids, timestamps and the webhook envelope (a few hundred bytes), plus
/// message headers ([`herald_queue::limits::HEADER_RESERVE`]).
pub const ENVELOPE_RESERVE: usize = 8 * 1024;

/// What a body must be to be read.
pub(crate) struct BodyRules {
    /// Largest accepted, in bytes.
    pub limit: usize,
    /// Which setting decided `limit`, for the 413's message.
    pub why: String,
    pub max_depth: usize,
    pub timeout: Duration,
}

impl AppState {
    /// The rules for a task's body: `api.max_body_bytes`, lowered to what
    /// the NATS server takes (its latest INFO) less the envelope, so that
    /// anything accepted can be stored and delivered.
    pub(crate) fn task_body_rules(&self) -> BodyRules {
        let configured = self.config.max_body_bytes;
        let (limit, why) = match self.broker.max_payload() {
            Some(max) if max.saturating_sub(ENVELOPE_RESERVE) < configured => (
                max.saturating_sub(ENVELOPE_RESERVE),
                format!(
                    "the NATS server's max_payload of {max} bytes less {ENVELOPE_RESERVE} for Herald's envelope"
                ),
            ),
            _ => (configured, format!("api.max_body_bytes is {configured}")),
        };
        BodyRules {
            limit,
            why,
            max_depth: self.config.max_json_depth,
            timeout: self.config.body_read_timeout,
        }
    }
}

/// The body as JSON, checked for media type, size, syntax and whether every
/// parser downstream reads it back the same ([`json::check`]): too deep,
/// numbers beyond f64, lone surrogates are 400 with the reason. An empty
/// body is the JSON `null`. A body slower than the rules' timeout is 408.
pub(crate) async fn read_json_body(
    headers: &HeaderMap,
    body: Body,
    rules: &BodyRules,
) -> Result<Box<RawValue>, ApiError> {
    let limit = rules.limit;
    let too_large = || ApiError::PayloadTooLarge {
        limit,
        why: rules.why.clone(),
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("").to_string());
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared_length.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let bytes = tokio::time::timeout(rules.timeout, to_bytes(body, limit))
        .await
        .map_err(|_| ApiError::RequestTimeout(rules.timeout))?
        .map_err(|_| too_large())?;
    if bytes.is_empty() && content_type.is_none() {
        return Ok(RawValue::from_string("null".into()).expect("null is JSON"));
    }
    match content_type.as_deref() {
        Some(ct) if is_json_media_type(ct) => {}
        Some(ct) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "content-type {ct:?} is not JSON; send application/json"
            )));
        }
        None => {
            return Err(ApiError::UnsupportedMediaType(
                "no content-type; send application/json".into(),
            ));
        }
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        ApiError::InvalidJson(format!("the body is not valid JSON: not UTF-8 ({e})"))
    })?;
    json::check(text, rules.max_depth).map_err(|e| {
        let hint = match e {
            JsonError::TooDeep { .. } => " (api.max_json_depth)",
            _ => "",
        };
        ApiError::InvalidJson(format!("the body is refused: {e}{hint}"))
    })?;
    serde_json::from_str::<Box<RawValue>>(text)
        .map_err(|e| ApiError::InvalidJson(format!("the body is not valid JSON: {e}")))
}

fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A task as `GET` reports it.
#[derive(Serialize, ToSchema)]
#[schema(as = Task)]
pub(crate) struct TaskView {
    id: TaskId,
    user: UserId,
    #[serde(rename = "type")]
    task_type: TaskType,
    state: TaskState,
    #[schema(format = DateTime)]
    accepted_at: String,
    /// When the handler finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    finished_at: Option<String>,
    /// What the handler returned, as the JSON it produced.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    result: Option<Box<RawValue>>,
    /// Why the handler failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    endpoints: Vec<EndpointView>,
    attempts: Vec<AttemptView>,
    mails: Vec<MailView>,
    /// Deliveries queued again by the redeliver and recover calls.
    redeliveries: Vec<RedeliveryView>,
}

/// Where delivery to one of the user's endpoints stands.
#[derive(Serialize, ToSchema)]
#[schema(as = TaskEndpoint)]
struct EndpointView {
    endpoint: String,
    /// The state of the latest round.
    state: EndpointDeliveryState,
    /// Attempts in every round.
    attempts: usize,
    /// The latest round, when the delivery was queued again.
    #[serde(skip_serializing_if = "Option::is_none")]
    redelivery: Option<String>,
}

/// One webhook delivery attempt.
#[derive(Serialize, ToSchema)]
#[schema(as = Attempt)]
struct AttemptView {
    endpoint: String,
    url: String,
    /// 1 for the first try.
    attempt: u32,
    #[schema(format = DateTime)]
    at: String,
    outcome: herald_core::payload::AttemptOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    next_attempt_at: Option<String>,
    /// The redelivery round of the attempt; absent for the fan-out's.
    /// Attempt numbers start at 1 in every round.
    #[serde(skip_serializing_if = "Option::is_none")]
    redelivery: Option<String>,
}

/// A mail to an endpoint's owner about a delivery that failed.
#[derive(Serialize, ToSchema)]
#[schema(as = Mail)]
struct MailView {
    endpoint: String,
    to: String,
    /// Which try at the SMTP server this outcome came from.
    attempts: u32,
    #[schema(format = DateTime)]
    at: String,
    sent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redelivery: Option<String>,
}

/// A delivery queued again: a new round of attempts.
#[derive(Serialize, ToSchema)]
#[schema(as = Redelivery)]
struct RedeliveryView {
    endpoint: String,
    /// The round's id; its attempts and mail carry it.
    redelivery: String,
    cause: RedeliveryCause,
    #[schema(format = DateTime)]
    at: String,
}

/// Show a task: its state, its delivery attempts and mails.
///
/// Another user's task id is `404`, like an unknown one.
#[utoipa::path(
    get,
    path = "/users/{user}/tasks/{task}",
    tag = "tasks",
    operation_id = "get_task",
    params(
        ("user" = UserId, Path, description = "The user the task is for."),
        ("task" = TaskId, Path, description = "The task id returned by the POST."),
    ),
    responses(
        (status = 200, description = "The task.", body = TaskView),
        (status = 400, description = "A bad user id.", body = ErrorBody),
        (status = 404, description = "This user has no such task.", body = ErrorBody),
        (status = 503, description = "NATS is unavailable, retry later.", body = ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait."))),
    ),
)]
pub(crate) async fn show(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<TaskView>, ApiError> {
    let Path((user, id)) = path?;
    let user = user_token(user)?;
    let not_found = || ApiError::NotFound(format!("user {user} has no task {id:?}"));
    let Ok(task_id) = TaskId::new(id.clone()) else {
        return Err(not_found());
    };
    let Some(stored) = history::find_task(&state.broker, &user, &task_id).await? else {
        return Err(not_found());
    };
    let view = match stored {
        StoredTask::Queued(task) => TaskView {
            id: task.id,
            user: task.user,
            task_type: task.task_type,
            state: TaskState::Queued,
            accepted_at: rfc3339(task.accepted_at_ms),
            finished_at: None,
            result: None,
            error: None,
            endpoints: vec![],
            attempts: vec![],
            mails: vec![],
            redeliveries: vec![],
        },
        StoredTask::Unreadable(unreadable) => TaskView {
            id: unreadable.task,
            user: unreadable.user.unwrap_or(user),
            task_type: unreadable
                .task_type
                .unwrap_or_else(|| TaskType::new("unknown").expect("a valid task type")),
            state: TaskState::Unreadable,
            accepted_at: rfc3339(unreadable.accepted_at_ms.unwrap_or(0)),
            finished_at: None,
            result: None,
            error: Some(format!(
                "the task's stored record cannot be read: {}",
                unreadable.reason
            )),
            endpoints: vec![],
            attempts: vec![],
            mails: vec![],
            redeliveries: vec![],
        },
        StoredTask::Recorded(record) => {
            let events = history::task_events(&state.broker, &user, &task_id).await?;
            let endpoints = record
                .endpoints
                .iter()
                .map(|e| EndpointView {
                    endpoint: e.to_string(),
                    state: endpoint_state(e, &events),
                    attempts: events
                        .iter()
                        .filter(|ev| matches!(ev, TaskEvent::Delivery(a) if &a.endpoint == e))
                        .count(),
                    redelivery: current_round(e, &events).map(str::to_string),
                })
                .collect();
            let state = task_state(&record, &events);
            let (attempts, mails, redeliveries) = split_events(events);
            TaskView {
                id: record.id,
                user: record.user,
                task_type: record.task_type,
                state,
                accepted_at: rfc3339(record.accepted_at_ms),
                finished_at: Some(rfc3339(record.finished_at_ms)),
                result: record.result,
                error: record.error,
                endpoints,
                attempts,
                mails,
                redeliveries,
            }
        }
    };
    Ok(Json(view))
}

fn split_events(events: Vec<TaskEvent>) -> (Vec<AttemptView>, Vec<MailView>, Vec<RedeliveryView>) {
    let mut attempts = Vec::new();
    let mut mails = Vec::new();
    let mut redeliveries = Vec::new();
    for event in events {
        match event {
            TaskEvent::Delivery(a) => attempts.push(AttemptView {
                endpoint: a.endpoint.to_string(),
                url: a.url,
                attempt: a.attempt,
                at: rfc3339(a.at_ms),
                outcome: a.outcome,
                status: a.status,
                latency_ms: a.latency_ms,
                error: a.error,
                response_body: a.response_body,
                next_attempt_at: a.next_attempt_in_ms.map(|d| rfc3339(a.at_ms + d)),
                redelivery: a.redelivery,
            }),
            TaskEvent::Mail(m) => mails.push(MailView {
                endpoint: m.endpoint.to_string(),
                to: m.to,
                attempts: m.attempt,
                at: rfc3339(m.at_ms),
                sent: m.sent,
                error: m.error,
                redelivery: m.redelivery,
            }),
            TaskEvent::Redelivery(r) => redeliveries.push(RedeliveryView {
                endpoint: r.endpoint.to_string(),
                redelivery: r.redelivery,
                cause: r.cause,
                at: rfc3339(r.at_ms),
            }),
        }
    }
    (attempts, mails, redeliveries)
}
