//! Sending deliveries again:
//!
//! - `POST /users/{user}/tasks/{id}/redeliver`, body optional
//!   `{"endpoint": "<id>"}`: the task's webhook again, to that endpoint or to
//!   every endpoint it was fanned out to that still exists. `202
//!   {"redelivery", "endpoints"}`; 404 for an unknown task or an endpoint
//!   not of this task; 409 `task_not_finished` while the task is queued or
//!   running, 409 `delivery_in_progress` while an earlier round still has
//!   attempts to come, 409 `no_endpoints` when none is left.
//! - `POST /users/{user}/endpoints/{endpoint}/recover`, body
//!   `{"since": "<RFC 3339>"}`: every delivery to the endpoint whose latest
//!   round since then ended unaccepted (exhausted, gone, abandoned, held).
//!   `202 {"queued", "tasks", ...}`; 409 `endpoint_disabled` while disabled.
//!   At most [`RECOVER_LIMIT`] tasks are examined per call; `truncated` and
//!   `next_since` say where to continue.
//! - `POST /users/{user}/endpoints/{endpoint}/enable`: clears the disabled
//!   flag, then recovers from shortly before it was disabled. `200` with
//!   what was recovered; `200 {"was_disabled": false}` and nothing done when
//!   it was not disabled, so a repeated call is harmless.
//!
//! A re-sent webhook has the same body and `webhook-id` as the original; it
//! is a new round of attempts in the task's history (see
//! [`workflows`]). "Queued" means the replay request is stored
//! (JetStream's publish ack); the task worker then rebuilds the webhook
//! from the task's record and queues it, so the API never publishes a
//! delivery job.

use axum::{
    Json,
    body::Body,
    extract::{Path, State, rejection::PathRejection},
    http::{HeaderMap, StatusCode},
};
use herald_core::{EndpointId, TaskId, UserId, rfc3339};
mod workflows;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use workflows::{RECOVER_LIMIT, Recovered, ReplayError};

use crate::{
    ApiConfig, ApiError, AppState, ErrorBody,
    tasks::{BodyRules, read_json_body},
};

/// Largest body these calls read; they take one short field.
const MAX_BODY_BYTES: usize = 4096;

fn user_token(user: String) -> Result<UserId, ApiError> {
    UserId::new(user).map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// An endpoint id from the path or the body: one that is not even a valid
/// id names no endpoint.
fn endpoint_token(user: &UserId, endpoint: String) -> Result<EndpointId, ApiError> {
    EndpointId::new(endpoint.clone())
        .map_err(|_| ApiError::NotFound(format!("user {user} has no endpoint {endpoint:?}")))
}

impl From<ReplayError> for ApiError {
    fn from(e: ReplayError) -> Self {
        let message = e.to_string();
        match e {
            ReplayError::Queue(e) => ApiError::Unavailable(e),
            ReplayError::TaskNotFound | ReplayError::EndpointNotFound(_) => {
                ApiError::NotFound(message)
            }
            ReplayError::NotFinished => ApiError::Conflict {
                code: "task_not_finished",
                message,
            },
            ReplayError::InProgress(_) => ApiError::Conflict {
                code: "delivery_in_progress",
                message,
            },
            ReplayError::NoEndpoints => ApiError::Conflict {
                code: "no_endpoints",
                message,
            },
            ReplayError::Disabled => ApiError::Conflict {
                code: "endpoint_disabled",
                message,
            },
            ReplayError::Unreadable(_) => ApiError::Conflict {
                code: "record_unreadable",
                message,
            },
        }
    }
}

/// A JSON body read into `T`; an empty body is `None`.
async fn optional_body<T: serde::de::DeserializeOwned>(
    config: &ApiConfig,
    headers: &HeaderMap,
    body: Body,
) -> Result<Option<T>, ApiError> {
    let rules = BodyRules {
        limit: MAX_BODY_BYTES,
        why: "these calls take one short field".into(),
        max_depth: config.max_json_depth,
        timeout: config.body_read_timeout,
    };
    let raw = read_json_body(headers, body, &rules).await?;
    if raw.get() == "null" {
        return Ok(None);
    }
    serde_json::from_str(raw.get())
        .map(Some)
        .map_err(|e| ApiError::BadRequest(format!("unexpected body: {e}")))
}

/// Which endpoint to redeliver to.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RedeliverRequest {
    /// One endpoint the task went to; absent: every one that still exists.
    endpoint: Option<String>,
}

/// A redelivery queued.
#[derive(Serialize, ToSchema)]
pub(crate) struct RedeliverResponse {
    /// The round's id; the task's attempts in this round carry it.
    redelivery: String,
    /// The endpoints it was queued for.
    endpoints: Vec<EndpointId>,
}

/// Redeliver a task's webhook.
///
/// The same body under the same `webhook-id`, as a new round of attempts
/// (numbered from 1, with the whole retry schedule) appended to the task's
/// history; the latest round decides the task's state.
#[utoipa::path(
    post,
    path = "/users/{user}/tasks/{task}/redeliver",
    tag = "replay",
    operation_id = "redeliver_task",
    params(
        ("user" = UserId, Path, description = "The user the task is for."),
        ("task" = TaskId, Path, description = "The task id returned by the POST."),
    ),
    request_body(
        content = Option<RedeliverRequest>,
        content_type = "application/json",
        description = "Optional: one endpoint. Without a body, every endpoint the task went to that still exists.",
    ),
    responses(
        (status = 202, description = "Queued: the redelivery request is stored (acknowledged by JetStream), \
            so the webhook will be sent; the task worker rebuilds it from the task's stored record.", body = RedeliverResponse),
        (status = 400, description = "A bad user id or body.", body = ErrorBody),
        (status = 404, description = "No such task, or the endpoint is not one the task went to.", body = ErrorBody),
        (status = 409, description = "`task_not_finished`: the task has not run yet. \
            `delivery_in_progress`: an earlier round still has attempts to come. \
            `no_endpoints`: none of the task's endpoints exists any more. \
            `record_unreadable`: the task's stored record cannot be read.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 415, description = "The body is not JSON.", body = ErrorBody),
        (status = 503, description = "NATS is unavailable, retry later.", body = ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait."))),
    ),
)]
pub(crate) async fn redeliver(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<RedeliverResponse>), ApiError> {
    let Path((user, id)) = path?;
    let user = user_token(user)?;
    let request: Option<RedeliverRequest> = optional_body(&state.config, &headers, body).await?;
    let Ok(task) = TaskId::new(id.clone()) else {
        return Err(ApiError::NotFound(format!(
            "user {user} has no task {id:?}"
        )));
    };
    let endpoint = request
        .and_then(|r| r.endpoint)
        .map(|e| endpoint_token(&user, e))
        .transpose()?;
    let queued = workflows::redeliver(&state.broker, &user, &task, endpoint.as_ref())
        .await
        .map_err(|e| match e {
            ReplayError::TaskNotFound => {
                ApiError::NotFound(format!("user {user} has no task {id:?}"))
            }
            e => e.into(),
        })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RedeliverResponse {
            redelivery: queued.redelivery,
            endpoints: queued.endpoints,
        }),
    ))
}

/// From when to recover.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecoverRequest {
    /// RFC 3339, such as `2024-05-01T12:00:00Z`.
    #[schema(format = DateTime)]
    since: String,
}

/// Task ids are listed up to this many; beyond it only the count.
const LISTED_TASKS: usize = 1000;

/// What a recovery queued.
#[derive(Serialize, ToSchema)]
pub(crate) struct RecoverResponse {
    #[schema(format = DateTime)]
    since: String,
    /// Deliveries queued again: their requests are stored, and the task
    /// worker sends them.
    queued: usize,
    /// Their tasks, when there are at most [`LISTED_TASKS`].
    #[serde(skip_serializing_if = "Option::is_none")]
    tasks: Option<Vec<TaskId>>,
    /// Deliveries an identical call queued moments before.
    already_queued: usize,
    /// Deliveries that could not be rebuilt: their task record expired.
    expired: usize,
    /// Deliveries skipped because their task's stored record cannot be
    /// read; those tasks.
    unreadable: Vec<TaskId>,
    /// More than the per-call limit of tasks had events since `since`.
    truncated: bool,
    /// Where to continue when truncated.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    next_since: Option<String>,
    /// Tasks examined at most per call.
    limit: usize,
}

impl RecoverResponse {
    fn new(since_ms: u64, recovered: Recovered) -> Self {
        let queued = recovered.tasks.len();
        Self {
            since: rfc3339(since_ms),
            queued,
            tasks: (queued <= LISTED_TASKS).then_some(recovered.tasks),
            already_queued: recovered.already_queued,
            expired: recovered.expired,
            unreadable: recovered.unreadable,
            truncated: recovered.next_since_ms.is_some(),
            next_since: recovered.next_since_ms.map(rfc3339),
            limit: RECOVER_LIMIT,
        }
    }
}

/// Recover an endpoint's failed deliveries.
///
/// Re-sends every delivery to the endpoint whose latest round, as recorded
/// since `since`, ended without the endpoint accepting it (attempts
/// exhausted, 410 Gone, no email to tell, held while disabled). Examines at
/// most 10,000 tasks per call; when `truncated`, call again from
/// `next_since`.
#[utoipa::path(
    post,
    path = "/users/{user}/endpoints/{endpoint}/recover",
    tag = "replay",
    operation_id = "recover_endpoint",
    params(
        ("user" = UserId, Path, description = "The endpoint's user."),
        ("endpoint" = EndpointId, Path, description = "The endpoint: `<namespace>_<name>` of its WebhookEndpoint."),
    ),
    request_body(content = RecoverRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Queued: one request per task is stored (acknowledged by JetStream), \
            so each delivery will be sent again; the task worker rebuilds it from the task's stored record.", body = RecoverResponse),
        (status = 400, description = "A bad user id, body or time.", body = ErrorBody),
        (status = 404, description = "The user has no such endpoint.", body = ErrorBody),
        (status = 409, description = "`endpoint_disabled`: enable it instead, which recovers what it held.", body = ErrorBody),
        (status = 413, description = "The body is too large.", body = ErrorBody),
        (status = 415, description = "The body is not JSON.", body = ErrorBody),
        (status = 503, description = "NATS is unavailable, retry later.", body = ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait."))),
    ),
)]
pub(crate) async fn recover(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<RecoverResponse>), ApiError> {
    let Path((user, endpoint)) = path?;
    let user = user_token(user)?;
    let request: Option<RecoverRequest> = optional_body(&state.config, &headers, body).await?;
    let endpoint = endpoint_token(&user, endpoint)?;
    let Some(request) = request else {
        return Err(ApiError::BadRequest(
            r#"send {"since": "<RFC 3339 time>"}"#.into(),
        ));
    };
    let since_ms = herald_core::parse_rfc3339(&request.since).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "since {:?} is not an RFC 3339 time (like 2024-05-01T12:00:00Z)",
            request.since
        ))
    })?;
    let recovered = workflows::recover(&state.broker, &user, &endpoint, since_ms).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(RecoverResponse::new(since_ms, recovered)),
    ))
}

/// What enabling did.
#[derive(Serialize, ToSchema)]
pub(crate) struct EnableResponse {
    endpoint: EndpointId,
    /// False when the endpoint was not disabled and nothing was done.
    was_disabled: bool,
    /// What was queued again, when it was disabled.
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<RecoverResponse>,
}

/// Enable a disabled endpoint.
///
/// Clears the disabled flag and the failure streak, then recovers what
/// failed or was held from a minute before it was disabled. An endpoint
/// that is not disabled is left alone (`was_disabled: false`), so calling
/// again is harmless.
#[utoipa::path(
    post,
    path = "/users/{user}/endpoints/{endpoint}/enable",
    tag = "replay",
    operation_id = "enable_endpoint",
    params(
        ("user" = UserId, Path, description = "The endpoint's user."),
        ("endpoint" = EndpointId, Path, description = "The endpoint: `<namespace>_<name>` of its WebhookEndpoint."),
    ),
    responses(
        (status = 200, description = "Enabled (or it was not disabled). What it held is queued as by recover: \
            the requests are stored and the task worker sends them.", body = EnableResponse),
        (status = 400, description = "A bad user id.", body = ErrorBody),
        (status = 404, description = "The user has no such endpoint.", body = ErrorBody),
        (status = 503, description = "NATS is unavailable, retry later.", body = ErrorBody,
            headers(("Retry-After" = String, description = "Seconds to wait."))),
    ),
)]
pub(crate) async fn enable(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<EnableResponse>, ApiError> {
    let Path((user, endpoint)) = path?;
    let user = user_token(user)?;
    let endpoint = endpoint_token(&user, endpoint)?;
    let enabled = workflows::enable(&state.broker, &user, &endpoint).await?;
    Ok(Json(EnableResponse {
        endpoint,
        was_disabled: enabled.was_disabled,
        recovered: enabled
            .recovered
            .map(|(since_ms, recovered)| RecoverResponse::new(since_ms, recovered)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_a_listed_code() {
        let every_refusal = [
            ReplayError::Queue(herald_queue::QueueError::Disconnected),
            ReplayError::TaskNotFound,
            ReplayError::NotFinished,
            ReplayError::EndpointNotFound("e".into()),
            ReplayError::InProgress(vec![]),
            ReplayError::NoEndpoints,
            ReplayError::Disabled,
            ReplayError::Unreadable("r".into()),
        ];
        for refusal in every_refusal {
            let error = ApiError::from(refusal);
            assert!(ApiError::CODES.contains(&error.code()), "{}", error.code());
        }
    }
}
