//! Authentication on the router alone (`oneshot`, no server). NATS is down
//! (port 9), so a request that gets past authentication answers 503 or 404
//! from its handler: anything but 401/403 means the token was accepted.

// Helpers as well as tests panic on an unexpected answer: that is the failure.
#![allow(clippy::unwrap_used)]

use std::io::Write;

use axum::{
    body::{Body, to_bytes},
    http::{HeaderMap, Request, StatusCode},
};
use herald_api::{
    ApiConfig, AppState,
    auth::{Scope, new_token},
    router,
};
use herald_core::UserId;
use serde_json::Value;
use tower::ServiceExt;

struct Fixture {
    alice: String,
    bob: String,
    all: String,
    _file: tempfile::NamedTempFile,
    config: ApiConfig,
}

fn users(names: &[&str]) -> Scope {
    Scope::Users(names.iter().map(|n| UserId::new(*n).unwrap()).collect())
}

fn fixture(metrics_require_token: bool) -> Fixture {
    let alice = new_token("alice-app", &users(&["alice"])).unwrap();
    let bob = new_token("bob-app", &users(&["bob"])).unwrap();
    let all = new_token("backend", &Scope::AllUsers).unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for made in [&alice, &bob, &all] {
        writeln!(file, "{}", made.entry.to_toml()).unwrap();
    }
    let config = ApiConfig {
        tokens_file: file.path().display().to_string(),
        metrics_require_token,
        ..Default::default()
    };
    Fixture {
        alice: alice.token,
        bob: bob.token,
        all: all.token,
        _file: file,
        config,
    }
}

async fn app(config: ApiConfig) -> axum::Router {
    let broker = herald_queue::connect("nats://127.0.0.1:9", "auth-test")
        .await
        .unwrap();
    router(AppState::new(broker, config).unwrap())
}

/// Sends `method uri` with `authorization` (if any); status, headers, body.
async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    authorization: Option<&str>,
) -> (StatusCode, HeaderMap, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    if method == "POST" {
        request = request.header("content-type", "application/json");
    }
    let body = if method == "POST" { "{}" } else { "" };
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

const USER_ROUTES: [(&str, &str); 2] = [
    ("POST", "/users/alice/tasks/echo"),
    ("GET", "/users/alice/tasks/some-id"),
];

#[tokio::test]
async fn user_routes_need_a_token_for_that_user() {
    let f = fixture(false);
    let app = app(f.config.clone()).await;
    let bearer = |t: &str| format!("Bearer {t}");
    for (method, uri) in USER_ROUTES {
        // Missing: 401 with the challenge, no error= (RFC 6750 3.1).
        let (status, headers, body) = call(&app, method, uri, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {uri}: {body}");
        assert_eq!(headers["www-authenticate"], r#"Bearer realm="herald""#);
        assert_eq!(body["error"]["code"], "unauthorized");

        for wrong in [
            bearer("herald_not-a-token"),
            bearer(""),
            format!("Basic {}", f.alice),
            f.alice.clone(), // no scheme
            bearer(&f.alice[..f.alice.len() - 1]),
        ] {
            let (status, headers, body) = call(&app, method, uri, Some(&wrong)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong:?}: {body}");
            assert_eq!(
                headers["www-authenticate"],
                r#"Bearer realm="herald", error="invalid_token""#
            );
            assert_eq!(body["error"]["code"], "unauthorized");
        }

        let (status, _, body) = call(&app, method, uri, Some(&bearer(&f.bob))).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["error"]["code"], "forbidden");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("bob-app")
        );

        for good in [&f.alice, &f.all] {
            for scheme in ["Bearer", "bearer"] {
                let (status, _, body) =
                    call(&app, method, uri, Some(&format!("{scheme} {good}"))).await;
                assert_eq!(
                    status,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "past auth, NATS is down: {body}"
                );
            }
        }
    }
    // A scoped token checks the user before anything else looks at it.
    let (status, _, _) = call(
        &app,
        "POST",
        "/users/a.b/tasks/echo",
        Some(&bearer(&f.alice)),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = call(&app, "POST", "/users/a.b/tasks/echo", Some(&bearer(&f.all))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn probes_and_the_document_stay_open_and_metrics_follow_the_config() {
    for metrics_require_token in [false, true] {
        let f = fixture(metrics_require_token);
        let app = app(f.config.clone()).await;
        for (uri, open_status) in [
            ("/healthz", StatusCode::OK),
            ("/readyz", StatusCode::SERVICE_UNAVAILABLE),
            ("/openapi.json", StatusCode::OK),
        ] {
            let (status, _, _) = call(&app, "GET", uri, None).await;
            assert_eq!(status, open_status, "{uri}");
        }
        let (status, headers, _) = call(&app, "GET", "/metrics", None).await;
        if metrics_require_token {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(headers.contains_key("www-authenticate"));
            let (status, _, _) = call(&app, "GET", "/metrics", Some("Bearer wrong")).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            // Any valid token, whatever its users.
            for token in [&f.bob, &f.all] {
                let (status, _, _) =
                    call(&app, "GET", "/metrics", Some(&format!("Bearer {token}"))).await;
                assert_eq!(status, StatusCode::OK);
            }
        } else {
            assert_eq!(status, StatusCode::OK);
        }
    }
}

#[tokio::test]
async fn without_a_tokens_file_authentication_is_off() {
    let app = app(ApiConfig::default()).await;
    for (method, uri) in USER_ROUTES {
        let (status, _, body) = call(&app, method, uri, None).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
}

#[tokio::test]
async fn a_bad_tokens_file_is_an_error_naming_it() {
    let broker = herald_queue::connect("nats://127.0.0.1:9", "auth-test")
        .await
        .unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        file,
        "[[tokens]]\nname = \"ci\"\ntoken = \"plain-text-token\"\nusers = [\"1\"]"
    )
    .unwrap();
    for (path, wanted) in [
        (file.path().display().to_string(), "unknown field `token`"),
        ("/nonexistent/tokens.toml".to_string(), "cannot read it"),
    ] {
        let config = ApiConfig {
            tokens_file: path.clone(),
            ..Default::default()
        };
        let Err(err) = AppState::new(broker.clone(), config) else {
            panic!("{path} was accepted");
        };
        let err = err.to_string();
        assert!(
            err.contains("api.tokens_file") && err.contains(&path) && err.contains(wanted),
            "{err}"
        );
    }
}
