//! The API's one error type: a status, a stable code and a message, always
//! rendered as `{"error": {"code": ..., "message": ...}}` ([`ErrorBody`],
//! which is also the error schema of the OpenAPI document).

use axum::{
    Json,
    extract::rejection::{PathRejection, RawPathParamsRejection},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use herald_queue::QueueError;
use serde::Serialize;
use utoipa::{
    ToSchema,
    openapi::schema::{ObjectBuilder, Schema, Type},
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    InvalidJson(String),
    /// No bearer token, or one that is not in the tokens file.
    #[error("{message}")]
    Unauthorized {
        message: String,
        /// The token was presented and is wrong (RFC 6750 `invalid_token`),
        /// rather than missing.
        invalid_token: bool,
    },
    /// A valid token, but not for this user (or route).
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// `why` says which limit decided (configuration or the NATS server).
    #[error("the body is larger than {limit} bytes, the most this API accepts ({why})")]
    PayloadTooLarge { limit: usize, why: String },
    /// The client took longer than `api.body_read_timeout` to send the body.
    #[error("the body was not received within {0:?}")]
    RequestTimeout(std::time::Duration),
    /// More connections than `api.max_connections`: only probes are served.
    #[error("the API is at its connection limit; retry later")]
    Overloaded,
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The request is valid but the resource is not in a state that allows
    /// it; `code` says which state.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// NATS is down or did not answer in time: nothing was accepted, try
    /// again. (A task whose store went unanswered may have been stored; a
    /// retry with an `Idempotency-Key` finds it instead of storing another.)
    #[error(
        "the task queue is unavailable; retry later (with an Idempotency-Key a retry never stores a task twice)"
    )]
    Unavailable(#[source] QueueError),
}

impl ApiError {
    /// Every [`ApiError::code`], for the OpenAPI document's enum.
    pub const CODES: [&'static str; 16] = [
        "bad_request",
        "invalid_json",
        "unauthorized",
        "forbidden",
        "not_found",
        "method_not_allowed",
        "payload_too_large",
        "request_timeout",
        "overloaded",
        "unsupported_media_type",
        "task_not_finished",
        "delivery_in_progress",
        "no_endpoints",
        "endpoint_disabled",
        "record_unreadable",
        "unavailable",
    ];

    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) | ApiError::InvalidJson(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable, machine-readable code for clients and metrics; listed in
    /// [`ApiError::CODES`].
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::Unauthorized { .. } => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::Overloaded => "overloaded",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Conflict { code, .. } => code,
            ApiError::Unavailable(_) => "unavailable",
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        ApiError::Unavailable(e)
    }
}

/// A path segment that is not UTF-8 after percent-decoding (`%FF`) is the
/// client's mistake: a JSON 400 like every other, not axum's plain text.
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

impl From<RawPathParamsRejection> for ApiError {
    fn from(rejection: RawPathParamsRejection) -> Self {
        ApiError::BadRequest(rejection.body_text())
    }
}

/// What every error response carries.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": {"code": "not_found", "message": "user 1 has no task \"x\""}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable; branch on this, not on the message.
    #[schema(schema_with = error_code_schema)]
    pub code: &'static str,
    /// For people; may change between versions.
    pub message: String,
}

fn error_code_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(ApiError::CODES))
        .into()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Unavailable(cause) = &self {
            tracing::warn!(error = %cause, "answering 503");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                message: self.to_string(),
            },
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        match &self {
            ApiError::Unavailable(_) | ApiError::Overloaded => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::RequestTimeout(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::Unauthorized { invalid_token, .. } => {
                // RFC 6750 section 3: which scheme to use, and whether the
                // token given was wrong rather than missing.
                let challenge = if *invalid_token {
                    r#"Bearer realm="herald", error="invalid_token""#
                } else {
                    r#"Bearer realm="herald""#
                };
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            _ => {}
        }
        response
    }
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::NotFound("no such route".into())
}

pub(crate) async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_listed_for_the_document() {
        let every_variant = [
            ApiError::BadRequest(String::new()),
            ApiError::InvalidJson(String::new()),
            ApiError::Unauthorized {
                message: String::new(),
                invalid_token: false,
            },
            ApiError::Forbidden(String::new()),
            ApiError::NotFound(String::new()),
            ApiError::MethodNotAllowed,
            ApiError::PayloadTooLarge {
                limit: 1,
                why: String::new(),
            },
            ApiError::RequestTimeout(std::time::Duration::ZERO),
            ApiError::Overloaded,
            ApiError::UnsupportedMediaType(String::new()),
        ];
        for error in &every_variant {
            assert!(ApiError::CODES.contains(&error.code()), "{}", error.code());
        }
        assert!(ApiError::CODES.contains(&"unavailable"));
    }
}
