//! Bearer-token authentication on a running API with real NATS: every route
//! with no token, a wrong token, another user's token, an all-users token
//! and the right one; and a bad tokens file stopping the process.

use std::io::Write;

use herald::roles::Roles;
use herald_api::auth::{Scope, new_token};
use herald_core::UserId;
use herald_testkit::NatsServer;
use serde_json::{Value, json};

use crate::harness::{DEADLINE, Herald, test_config};

/// A tokens file with one token for alice, one for bob, one for all users.
pub struct TokensFile {
    pub alice: String,
    pub bob: String,
    pub all: String,
    pub file: tempfile::NamedTempFile,
}

pub fn tokens_file() -> TokensFile {
    let scoped = |user: &str| Scope::Users([UserId::new(user).unwrap()].into());
    let alice = new_token("alice-app", &scoped("alice")).unwrap();
    let bob = new_token("bob-app", &scoped("bob")).unwrap();
    let all = new_token("backend", &Scope::AllUsers).unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for made in [&alice, &bob, &all] {
        writeln!(file, "{}", made.entry.to_toml()).unwrap();
    }
    TokensFile {
        alice: alice.token,
        bob: bob.token,
        all: all.token,
        file,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Credential {
    None,
    Wrong,
    OtherUser,
    AllUsers,
    Right,
}

const CREDENTIALS: [Credential; 5] = [
    Credential::None,
    Credential::Wrong,
    Credential::OtherUser,
    Credential::AllUsers,
    Credential::Right,
];

impl TokensFile {
    /// The Authorization header for alice's routes.
    fn header(&self, credential: Credential) -> Option<String> {
        let token = match credential {
            Credential::None => return None,
            Credential::Wrong => "herald_this-is-not-a-token",
            Credential::OtherUser => &self.bob,
            Credential::AllUsers => &self.all,
            Credential::Right => &self.alice,
        };
        Some(format!("Bearer {token}"))
    }
}

/// What protects a route.
#[derive(Clone, Copy)]
enum Guard {
    /// A token for the user in the path.
    User,
    /// Any valid token when `api.metrics_require_token` is set.
    Metrics,
    Open,
}

impl Guard {
    /// The status that refuses `credential`, or None when the route answers.
    fn refusal(self, credential: Credential, metrics_require_token: bool) -> Option<u16> {
        match (self, credential) {
            (Guard::User, Credential::None | Credential::Wrong) => Some(401),
            (Guard::User, Credential::OtherUser) => Some(403),
            (Guard::Metrics, Credential::None | Credential::Wrong) if metrics_require_token => {
                Some(401)
            }
            _ => None,
        }
    }
}

async fn call(
    herald: &Herald,
    method: reqwest::Method,
    path: &str,
    authorization: Option<&str>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut request = herald
        .http
        .request(method.clone(), format!("{}{path}", herald.api));
    if method == reqwest::Method::POST {
        request = request.json(&json!({ "clip": 7 }));
    }
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn every_route_with_every_kind_of_credential() {
    let nats = NatsServer::start().await;
    for metrics_require_token in [true, false] {
        let tokens = tokens_file();
        let mut config = test_config(&nats, None);
        config.api.tokens_file = tokens.file.path().display().to_string();
        config.api.metrics_require_token = metrics_require_token;
        let herald = Herald::start(config, Roles::api_only()).await;

        // A task of alice's to read back, posted with her token.
        let (status, _, body) = call(
            &herald,
            reqwest::Method::POST,
            "/users/alice/tasks/echo",
            tokens.header(Credential::Right).as_deref(),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let task = format!("/users/alice/tasks/{}", body["id"].as_str().unwrap());
        let redeliver = format!("{task}/redeliver");

        let routes = [
            (
                reqwest::Method::POST,
                "/users/alice/tasks/echo",
                Guard::User,
                201,
            ),
            (reqwest::Method::GET, task.as_str(), Guard::User, 200),
            // Past authentication, the replay calls answer for themselves:
            // `{"clip": 7}` is neither a redeliver nor a recover request,
            // and alice has no endpoint to enable.
            (reqwest::Method::POST, redeliver.as_str(), Guard::User, 400),
            (
                reqwest::Method::POST,
                "/users/alice/endpoints/default_hooks/recover",
                Guard::User,
                400,
            ),
            (
                reqwest::Method::POST,
                "/users/alice/endpoints/default_hooks/enable",
                Guard::User,
                404,
            ),
            (reqwest::Method::GET, "/metrics", Guard::Metrics, 200),
            (reqwest::Method::GET, "/healthz", Guard::Open, 200),
            (reqwest::Method::GET, "/readyz", Guard::Open, 200),
            (reqwest::Method::GET, "/openapi.json", Guard::Open, 200),
        ];
        for (method, path, guard, success) in &routes {
            for credential in CREDENTIALS {
                let header = tokens.header(credential);
                let (status, headers, body) =
                    call(&herald, method.clone(), path, header.as_deref()).await;
                let want = guard
                    .refusal(credential, metrics_require_token)
                    .unwrap_or(*success);
                let case = format!(
                    "{method} {path} with {credential:?} (metrics_require_token={metrics_require_token})"
                );
                assert_eq!(status, want, "{case}: {body}");
                match status {
                    401 => {
                        assert_eq!(body["error"]["code"], "unauthorized", "{case}");
                        let challenge = headers["www-authenticate"].to_str().unwrap();
                        assert!(challenge.starts_with("Bearer"), "{case}: {challenge}");
                    }
                    403 => {
                        assert_eq!(body["error"]["code"], "forbidden", "{case}");
                        // Nothing of alice's task leaks to bob.
                        assert!(!body.to_string().contains("clip"), "{case}: {body}");
                    }
                    _ => {}
                }
                if *path == task && status == 200 {
                    assert_eq!(body["user"], "alice", "{case}: {body}");
                }
            }
        }
        herald.stop().await;
    }
}

/// A tokens file the API cannot use stops `herald api` at start with a
/// message naming the file and the problem; nothing serves unprotected.
#[tokio::test]
async fn a_bad_tokens_file_stops_the_api() {
    let mut plain = tempfile::NamedTempFile::new().unwrap();
    // A token pasted in clear instead of its hash.
    writeln!(
        plain,
        "[[tokens]]\nname = \"ci\"\ntoken = \"secret\"\nusers = [\"1\"]"
    )
    .unwrap();
    let plain_path = plain.path().display().to_string();
    for (file, mentions) in [
        (plain_path.as_str(), "unknown field `token`"),
        ("/nonexistent/tokens.toml", "cannot read it"),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args([
                "api",
                "--listen",
                "127.0.0.1:0",
                "--nats-url",
                "nats://127.0.0.1:9",
            ])
            .env("HERALD_API__TOKENS_FILE", file)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{file} was accepted");
        assert!(
            stderr.contains("api.tokens_file")
                && stderr.contains(file)
                && stderr.contains(mentions),
            "{file}: {stderr}"
        );
    }
    // metrics_require_token without tokens would lock Prometheus out.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["api", "--nats-url", "nats://127.0.0.1:9"])
        .env("HERALD_API__METRICS_REQUIRE_TOKEN", "true")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("api.metrics_require_token"));
}

/// `herald token new` prints a token and an entry that admits exactly it.
#[tokio::test]
async fn herald_token_new_prints_a_token_and_its_entry() {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["token", "new", "--name", "ci", "--users", "alice,bob"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let (token, entry) = stdout.split_once("\n\n").unwrap();
    assert!(token.starts_with("herald_"), "{stdout}");
    assert!(
        !entry.contains(token),
        "the token itself must not be in the file entry"
    );

    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(entry.as_bytes()).unwrap();
    let nats = NatsServer::start().await;
    let mut config = test_config(&nats, None);
    config.api.tokens_file = file.path().display().to_string();
    let herald = Herald::start(config, Roles::api_only()).await;
    let bearer = format!("Bearer {token}");
    for (user, want) in [("alice", 201), ("bob", 201), ("carol", 403)] {
        let path = format!("/users/{user}/tasks/echo");
        let (status, _, body) = call(&herald, reqwest::Method::POST, &path, Some(&bearer)).await;
        assert_eq!(status, want, "{user}: {body}");
    }
    herald.stop().await;
}

/// Tokens added to or removed from the file apply without a restart; a file
/// that turns invalid leaves the previous tokens in force.
#[tokio::test]
async fn the_tokens_file_is_reloaded_when_it_changes() {
    let tokens = tokens_file();
    let scoped = |user: &str| Scope::Users([UserId::new(user).unwrap()].into());
    let carol = new_token("carol-app", &scoped("carol")).unwrap();
    let nats = NatsServer::start().await;
    let mut config = test_config(&nats, None);
    config.api.tokens_file = tokens.file.path().display().to_string();
    config.api.tokens_reload_interval = std::time::Duration::from_millis(50);
    let herald = Herald::start(config, Roles::api_only()).await;
    let status_for = |user: &'static str, token: String| {
        let herald = &herald;
        async move {
            let bearer = format!("Bearer {token}");
            let path = format!("/users/{user}/tasks/echo");
            call(herald, reqwest::Method::POST, &path, Some(&bearer))
                .await
                .0
        }
    };
    assert_eq!(status_for("carol", carol.token.clone()).await, 401);

    // Added: carol's token works once the file is re-read.
    let original = std::fs::read_to_string(tokens.file.path()).unwrap();
    let with_carol = format!("{original}\n{}", carol.entry.to_toml());
    std::fs::write(tokens.file.path(), &with_carol).unwrap();
    herald_testkit::wait_until("carol's token to be accepted", DEADLINE, || async {
        (status_for("carol", carol.token.clone()).await == 201).then_some(())
    })
    .await;

    // Broken: everything stays as it was.
    std::fs::write(tokens.file.path(), "[[tokens]]\nname = \"oops\"\n").unwrap();
    let broken_since = std::time::Instant::now();
    while broken_since.elapsed() < std::time::Duration::from_millis(500) {
        assert_eq!(status_for("carol", carol.token.clone()).await, 201);
        assert_eq!(status_for("alice", tokens.alice.clone()).await, 201);
    }

    // Revoked: alice's entry removed, her token is refused.
    let without_alice: String = with_carol
        .split("\n\n")
        .filter(|entry| !entry.contains("alice-app"))
        .collect::<Vec<_>>()
        .join("\n\n");
    std::fs::write(tokens.file.path(), without_alice).unwrap();
    herald_testkit::wait_until("alice's token to be revoked", DEADLINE, || async {
        (status_for("alice", tokens.alice.clone()).await == 401).then_some(())
    })
    .await;
    assert_eq!(status_for("carol", carol.token.clone()).await, 201);
    herald.stop().await;
}
