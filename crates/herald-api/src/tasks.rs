//! `/users/{user}/tasks`: accept a task, show a task.

use axum::{
    Json,
    body::{Body, to_bytes},
    extract::{Path, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use herald_core::{
    TaskId, TaskType, UserId, names,
    payload::{TaskEvent, TaskMessage, VERSION, encode},
    rfc3339,
    state::{EndpointDeliveryState, TaskState, endpoint_state, task_state},
};
use herald_queue::{
    history::{self, StoredTask},
    publish::Outgoing,
};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::{ApiError, AppState};

/// Longest `Idempotency-Key` accepted.
const MAX_IDEMPOTENCY_KEY: usize = 255;

fn user_token(user: String) -> Result<UserId, ApiError> {
    UserId::new(user).map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[derive(Serialize)]
struct Accepted {
    id: TaskId,
}

/// `POST /users/{user}/tasks/{type}`: `201 {"id"}` once JetStream holds it.
pub(crate) async fn create(
    State(state): State<AppState>,
    Path((user, task_type)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let user = user_token(user)?;
    let task_type = TaskType::new(task_type).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let idempotency_key = idempotency_key(&headers)?;
    let input = read_json_body(&headers, body, state.config.max_body_bytes).await?;

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
            .publish(Outgoing::new(
                names::task_subject(&task_type, &user, &id),
                names::task_msg_id(&id),
                encode(&message),
            ))
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
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
            ))
        })?;
    Ok(Some(key.to_string()))
}

/// The body as JSON, checked for media type, size and syntax. An empty body
/// is the JSON `null`.
async fn read_json_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Box<RawValue>, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("").to_string());
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared_length.is_some_and(|len| len > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let bytes = to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge { limit })?;
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
    serde_json::from_slice::<Box<RawValue>>(&bytes)
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
#[derive(Serialize)]
pub(crate) struct TaskView {
    id: TaskId,
    user: UserId,
    #[serde(rename = "type")]
    task_type: TaskType,
    state: TaskState,
    accepted_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    endpoints: Vec<EndpointView>,
    attempts: Vec<AttemptView>,
    mails: Vec<MailView>,
}

#[derive(Serialize)]
struct EndpointView {
    endpoint: String,
    state: EndpointDeliveryState,
    attempts: usize,
}

#[derive(Serialize)]
struct AttemptView {
    endpoint: String,
    url: String,
    attempt: u32,
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
    next_attempt_at: Option<String>,
}

#[derive(Serialize)]
struct MailView {
    endpoint: String,
    to: String,
    /// Which try at the SMTP server this outcome came from.
    attempts: u32,
    at: String,
    sent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `GET /users/{user}/tasks/{id}`: 404 for unknown ids and other users' ids.
pub(crate) async fn show(
    State(state): State<AppState>,
    Path((user, id)): Path<(String, String)>,
) -> Result<Json<TaskView>, ApiError> {
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
                })
                .collect();
            let state = task_state(&record, &events);
            let (attempts, mails) = split_events(events);
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
            }
        }
    };
    Ok(Json(view))
}

fn split_events(events: Vec<TaskEvent>) -> (Vec<AttemptView>, Vec<MailView>) {
    let mut attempts = Vec::new();
    let mut mails = Vec::new();
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
            }),
            TaskEvent::Mail(m) => mails.push(MailView {
                endpoint: m.endpoint.to_string(),
                to: m.to,
                attempts: m.attempt,
                at: rfc3339(m.at_ms),
                sent: m.sent,
                error: m.error,
            }),
        }
    }
    (attempts, mails)
}
