//! Bearer-token authentication.
//!
//! Tokens are configured in a TOML file (`api.tokens_file`; in Kubernetes a
//! Secret mounted as a file) that holds, per token, a name for logs, the
//! SHA-256 of the token and the users it may act for:
//!
//! ```toml
//! [[tokens]]
//! name = "ci"
//! sha256 = "<64 hex digits>"
//! users = ["alice", "bob"]   # or: all_users = true
//! ```
//!
//! `herald token new` prints a fresh token and its entry. Every route under
//! `/users/{user}/` needs a token for that user (401 without a valid token,
//! 403 with another user's); `/metrics` needs any valid token when
//! `api.metrics_require_token` is set; the probes and `/openapi.json` stay
//! open. Without a tokens file authentication is off (development, tests),
//! and the API says so in a warning at start.

mod tokens;

use std::{path::PathBuf, sync::Arc, time::Duration};

use axum::{
    extract::{RawPathParams, Request, State, rejection::RawPathParamsRejection},
    http::{HeaderMap, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use utoipa::openapi::{
    ContentBuilder, Ref, RefOr, ResponseBuilder,
    header::HeaderBuilder,
    path::Operation,
    schema::{ObjectBuilder, Type},
    security::SecurityRequirement,
};
use utoipa_axum::router::OpenApiRouter;

pub use tokens::{NewToken, Scope, TOKEN_PREFIX, TokenEntry, Tokens, TokensFileError, new_token};
use tokens::{Token, TokenStore};

use crate::{ApiConfig, ApiError, AppState, operations::operations};

/// The security scheme's name in the OpenAPI document.
pub(crate) const SCHEME: &str = "bearer";

/// Who may call what: built at start from [`ApiConfig`], the tokens kept
/// current by [`Access::watch`].
#[derive(Clone, Debug)]
pub struct Access {
    /// None: authentication is off.
    store: Option<Arc<TokenStore>>,
    metrics_require_token: bool,
    reload_interval: Duration,
}

impl Access {
    /// Reads `api.tokens_file` (if set); a bad file is an error naming it.
    /// Checked here rather than with the rest of the configuration: the
    /// file is mounted only where the API runs (workers share the config).
    pub fn from_config(config: &ApiConfig) -> Result<Access, TokensFileError> {
        let store = if config.tokens_file.trim().is_empty() {
            if config.metrics_require_token {
                return Err(TokensFileError::MetricsWithoutTokens);
            }
            None
        } else {
            let path = PathBuf::from(config.tokens_file.trim());
            Some(Arc::new(TokenStore::open(path)?))
        };
        Ok(Access {
            store,
            metrics_require_token: config.metrics_require_token,
            reload_interval: config.tokens_reload_interval,
        })
    }

    /// No authentication at all.
    pub fn off() -> Access {
        Access {
            store: None,
            metrics_require_token: false,
            reload_interval: Duration::ZERO,
        }
    }

    fn tokens(&self) -> Option<Arc<Tokens>> {
        self.store.as_ref().map(|store| store.tokens())
    }

    /// Says at start whether the API is protected, and by how many tokens.
    pub fn log_state(&self) {
        match self.tokens() {
            Some(tokens) => tracing::info!(
                tokens = tokens.len(),
                metrics_require_token = self.metrics_require_token,
                "API authentication on"
            ),
            None => tracing::warn!(
                "API authentication is OFF (api.tokens_file is not set): anyone who can \
                 reach the API can post tasks and read every user's tasks"
            ),
        }
    }

    /// Re-reads the tokens file every `api.tokens_reload_interval` until
    /// `shutdown`, so adding or revoking a token (a Kubernetes Secret
    /// update reaches the mounted file within a minute or so) needs no
    /// restart.
    pub async fn watch(self, shutdown: CancellationToken) {
        let Some(store) = self.store else { return };
        if self.reload_interval.is_zero() {
            return;
        }
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.reload_interval) => {}
            }
            let store = store.clone();
            // File I/O off the async workers.
            let _ = tokio::task::spawn_blocking(move || store.reload()).await;
        }
    }
}

/// The token of the request: 401 if it is missing or unknown.
fn authenticate<'a>(tokens: &'a Tokens, headers: &HeaderMap) -> Result<&'a Token, ApiError> {
    let unauthorized = |message: &str, invalid_token| ApiError::Unauthorized {
        message: message.to_string(),
        invalid_token,
    };
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(unauthorized(
            "this route needs a bearer token (Authorization: Bearer <token>)",
            false,
        ));
    };
    let presented = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|token| !token.is_empty())
        .ok_or_else(|| unauthorized("the Authorization header is not `Bearer <token>`", true))?;
    tokens.find(presented).ok_or_else(|| {
        tracing::debug!("401: unknown bearer token");
        unauthorized("the bearer token is not valid", true)
    })
}

/// Middleware of every route under `/users/{user}/`: a token for that user.
async fn require_user(
    State(access): State<Access>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    request: Request,
    next: Next,
) -> Response {
    let Some(tokens) = access.tokens() else {
        return next.run(request).await;
    };
    let token = match authenticate(&tokens, request.headers()) {
        Ok(token) => token,
        Err(e) => return e.into_response(),
    };
    let name = &token.name;
    let params = match params {
        Ok(params) => params,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let user = params
        .iter()
        .find(|(key, _)| *key == "user")
        .map(|(_, v)| v);
    // Fails closed: a route in this group without {user} admits nobody.
    let allowed = user.is_some_and(|user| token.scope.allows(user));
    if !allowed {
        let user = shown_user(user.unwrap_or_default());
        tracing::info!(token = %name, user = %user, "403: token not valid for this user");
        return ApiError::Forbidden(format!("token {name:?} is not valid for user {user}"))
            .into_response();
    }
    // The token's name (never its secret) on the request's trace span.
    herald_queue::trace_context::with_current(|span| {
        span.set_attribute(herald_queue::trace_context::KeyValue::new(
            "herald.token",
            name.to_string(),
        ));
    });
    next.run(request)
        .instrument(tracing::info_span!("authenticated", token = %name))
        .await
}

/// A user id from the path as a log line or message may show it: quoted
/// as is when it is a valid id, else escaped and cut short, since it is
/// unvalidated client input (newlines would forge log lines, control
/// characters reach terminals).
fn shown_user(raw: &str) -> String {
    const SHOWN_CHARS: usize = 64;
    if herald_core::UserId::new(raw.to_string()).is_ok() {
        return format!("{raw:?}");
    }
    let escaped: String = raw.escape_default().take(SHOWN_CHARS).collect();
    let cut = if raw.escape_default().nth(SHOWN_CHARS).is_some() {
        "…"
    } else {
        ""
    };
    format!("\"{escaped}{cut}\" (not a valid user id)")
}

/// Middleware of `/metrics`: any valid token, when so configured.
async fn require_metrics_token(
    State(access): State<Access>,
    request: Request,
    next: Next,
) -> Response {
    match access.tokens() {
        Some(tokens) if access.metrics_require_token => {
            match authenticate(&tokens, request.headers()) {
                Ok(_) => next.run(request).await,
                Err(e) => e.into_response(),
            }
        }
        _ => next.run(request).await,
    }
}

/// Protects every route of `routes` with [`require_user`] and says so in
/// their documentation (bearer security, 401 and 403).
pub(crate) fn for_users(
    mut routes: OpenApiRouter<AppState>,
    access: &Access,
) -> OpenApiRouter<AppState> {
    for operation in operations(routes.get_openapi_mut()) {
        operation.security = Some(vec![SecurityRequirement::new(SCHEME, [""; 0])]);
        document_401(operation);
        operation.responses.responses.insert(
            "403".into(),
            error_response("The token is valid, but not for this user.").into(),
        );
    }
    routes.route_layer(middleware::from_fn_with_state(access.clone(), require_user))
}

/// Protects `/metrics` with [`require_metrics_token`]; documented as open or
/// with a token, as the configuration decides.
pub(crate) fn for_metrics(
    mut routes: OpenApiRouter<AppState>,
    access: &Access,
) -> OpenApiRouter<AppState> {
    for operation in operations(routes.get_openapi_mut()) {
        // An empty requirement next to the bearer one: either may apply.
        operation.security = Some(vec![
            SecurityRequirement::default(),
            SecurityRequirement::new(SCHEME, [""; 0]),
        ]);
        document_401(operation);
    }
    routes.route_layer(middleware::from_fn_with_state(
        access.clone(),
        require_metrics_token,
    ))
}

fn document_401(operation: &mut Operation) {
    let mut response = error_response("No bearer token, or not a valid one.");
    response.headers.insert(
        "WWW-Authenticate".into(),
        HeaderBuilder::new()
            .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
            .description(Some(
                "`Bearer realm=\"herald\"`, with `error=\"invalid_token\"` when a token was given.",
            ))
            .build()
            .into(),
    );
    operation
        .responses
        .responses
        .insert("401".into(), response.into());
}

pub(crate) fn error_response(description: &str) -> utoipa::openapi::Response {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(Ref::from_schema_name("ErrorBody"))))
                .build(),
        )
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unvalidated_user_is_logged_escaped_and_short() {
        assert_eq!(shown_user("alice"), "\"alice\"");
        let forged = "x\n2026-12-01T00:00:00Z INFO herald: token admin accepted\u{1b}[2J";
        let shown = shown_user(forged);
        assert!(!shown.contains('\n'), "{shown}");
        assert!(!shown.contains('\u{1b}'), "{shown}");
        assert!(shown.contains("\\n") && shown.ends_with("(not a valid user id)"));
        let long = "é".repeat(500);
        assert!(shown_user(&long).chars().count() < 120, "cut short");
    }
}
