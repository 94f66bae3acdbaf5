//! NATS locked down: a nats-server that requires TLS with client
//! certificates (mutual TLS) and per-role users whose permissions are
//! `deploy/nats/permissions.conf` itself. Every role runs as its own
//! `herald` process with its own credentials, as the chart deploys them.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use herald_queue::{NatsConfig, connect_with};
use herald_testkit::{
    Mailpit, NatsServer, ReceiverBehaviour, TestPki, TestReceiver, free_port, http_client,
    include_path, wait_until,
};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::harness::{ALLOW_LOOPBACK_ENV, DEADLINE, TEST_KEY};

/// Each role's NATS user and the permissions variable the shipped file
/// defines for it.
pub(crate) const ROLES: [(&str, &str); 5] = [
    ("herald-api", "HERALD_API"),
    ("herald-tasks", "HERALD_WORKER_TASKS"),
    ("herald-webhooks", "HERALD_WORKER_WEBHOOKS"),
    ("herald-mail", "HERALD_WORKER_MAIL"),
    ("herald-operator", "HERALD_OPERATOR"),
];

const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub(crate) fn permissions_file() -> PathBuf {
    herald_testkit::workspace_root()
        .join("deploy/nats/permissions.conf")
        .canonicalize()
        .expect("deploy/nats/permissions.conf exists")
}

pub(crate) fn password_of(user: &str) -> String {
    format!("pw-{user}-7f3a")
}

/// The server's TLS, the shipped permissions, and one user per role.
/// The users in `revoked` get another password (their access is revoked).
pub(crate) fn server_config(pki: &TestPki, config_dir: &Path, revoked: &[&str]) -> String {
    let users: Vec<String> = ROLES
        .iter()
        .map(|(user, permissions)| {
            let password = if revoked.contains(user) {
                "rotated-elsewhere".to_string()
            } else {
                password_of(user)
            };
            format!(
                "    {{ user: \"{user}\", password: \"{password}\", permissions: ${permissions} }}"
            )
        })
        .collect();
    format!(
        "{}include \"{}\"\nauthorization {{\n  users = [\n{}\n  ]\n}}\n",
        pki.server_tls_block(),
        include_path(config_dir, &permissions_file()),
        users.join("\n")
    )
}

/// A locked-down server and the files each role's configuration names.
pub(crate) struct LockedNats {
    pub(crate) nats: NatsServer,
    pub(crate) pki: TestPki,
    files: TempDir,
}

impl LockedNats {
    pub(crate) async fn start() -> LockedNats {
        let pki = TestPki::generate();
        let nats = NatsServer::start_with_config(|dir| server_config(&pki, dir, &[])).await;
        let files = tempfile::tempdir().unwrap();
        for (user, _) in ROLES {
            std::fs::write(files.path().join(user), password_of(user)).unwrap();
        }
        std::fs::write(files.path().join("wrong"), "not-the-password").unwrap();
        LockedNats { nats, pki, files }
    }

    pub(crate) fn password_file(&self, name: &str) -> String {
        self.files.path().join(name).display().to_string()
    }

    /// The `nats` settings of `user`, as `HERALD_NATS__*` variables.
    pub(crate) fn env(&self, user: &str) -> Vec<(String, String)> {
        let manage = user == "herald-operator";
        [
            ("HERALD_NATS__URL", self.nats.url()),
            ("HERALD_NATS__USER", user.to_string()),
            ("HERALD_NATS__PASSWORD_FILE", self.password_file(user)),
            ("HERALD_NATS__MANAGE_TOPOLOGY", manage.to_string()),
            (
                "HERALD_NATS__TLS__CA_FILE",
                self.pki.path("ca.pem").display().to_string(),
            ),
            (
                "HERALD_NATS__TLS__CERT_FILE",
                self.pki.path("client.pem").display().to_string(),
            ),
            (
                "HERALD_NATS__TLS__KEY_FILE",
                self.pki.path("client-key.pem").display().to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The same settings as a [`NatsConfig`], for connecting from the test.
    pub(crate) fn config(&self, user: &str) -> NatsConfig {
        let mut config = NatsConfig::url(&self.nats.url());
        config.user = user.to_string();
        config.password_file = self.password_file(user);
        config.manage_topology = false;
        config.tls.ca_file = self.pki.path("ca.pem").display().to_string();
        config.tls.cert_file = self.pki.path("client.pem").display().to_string();
        config.tls.key_file = self.pki.path("client-key.pem").display().to_string();
        config
    }
}

/// `herald <args>` as `user`, killed when dropped.
pub(crate) fn role(
    locked: &LockedNats,
    user: &str,
    args: &[&str],
    extra: &[(&str, String)],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .envs(locked.env(user))
        .env("HERALD_SECRETS__KEY", TEST_KEY)
        .env(ALLOW_LOOPBACK_ENV.0, ALLOW_LOOPBACK_ENV.1)
        .env("HERALD_WEBHOOKS__RETRY_SCHEDULE", r#"["10ms", "20ms"]"#)
        .env("HERALD_WEBHOOKS__HEALTH_FLUSH_INTERVAL", "100ms")
        .env("HERALD_MAIL__RETRY_SCHEDULE", r#"["50ms", "100ms"]"#)
        .env("HERALD_LOG__FILTER", "warn")
        .envs(extra.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald")
}

/// Runs `herald <args>` as `user` to its end; (success, stderr).
pub(crate) async fn run_to_end(
    locked: &LockedNats,
    user: &str,
    args: &[&str],
    extra: &[(&str, String)],
) -> (bool, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .envs(locked.env(user))
        .env("HERALD_SECRETS__KEY", TEST_KEY)
        .env("HERALD_LOG__FILTER", "warn")
        .envs(extra.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald");
    let output = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("herald {args:?} as {user} did not end"))
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn endpoints_yaml(ok: &str, failing: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: signing}}\n\
         stringData: {{secret: {SIGNING_SECRET}}}\n---\n\
         apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\nmetadata: {{name: good}}\n\
         spec: {{userId: '1', url: '{ok}', secretRef: {{name: signing, key: secret}}}}\n---\n\
         apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\nmetadata: {{name: bad}}\n\
         spec: {{userId: '2', url: '{failing}', email: owner2@example.com, \
         secretRef: {{name: signing, key: secret}}}}\n"
    )
}

pub(crate) async fn get_json(url: &str) -> Option<Value> {
    let response = http_client().get(url).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.json().await.ok()
}

async fn wait_for_state(api: &str, user: &str, id: &str, state: &str) -> Value {
    let url = format!("{api}/users/{user}/tasks/{id}");
    wait_until(&format!("task {id} to be {state}"), DEADLINE, || async {
        let task = get_json(&url).await?;
        (task["state"] == state).then_some(task)
    })
    .await
}

async fn post_task(api: &str, user: &str, body: Value) -> String {
    let url = format!("{api}/users/{user}/tasks/echo");
    wait_until("the API to accept a task", DEADLINE, || async {
        let response = http_client().post(&url).json(&body).send().await.ok()?;
        if response.status() != 201 {
            return None;
        }
        let body: Value = response.json().await.ok()?;
        body["id"].as_str().map(String::from)
    })
    .await
}

#[tokio::test]
async fn every_role_works_with_its_own_credentials_over_mutual_tls() {
    let locked = LockedNats::start().await;
    let mail = Mailpit::start().await;
    let good = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let bad = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    let file = locked.files.path().join("endpoints.yaml");
    std::fs::write(&file, endpoints_yaml(&good.url("/in"), &bad.url("/in"))).unwrap();

    // The operator's credentials create the topology and write the records.
    let file = file.display().to_string();
    let (ok, stderr) = run_to_end(&locked, "herald-operator", &["endpoints", &file], &[]).await;
    assert!(ok, "herald endpoints as the operator failed: {stderr}");

    let listen = format!("127.0.0.1:{}", free_port());
    let api = format!("http://{listen}");
    let smtp = [("HERALD_MAIL__SMTP_PORT", mail.smtp_port().to_string())];
    let _api = role(&locked, "herald-api", &["api", "--listen", &listen], &[]);
    let _tasks = role(&locked, "herald-tasks", &["worker", "tasks"], &[]);
    let _webhooks = role(&locked, "herald-webhooks", &["worker", "webhooks"], &[]);
    let _mail = role(&locked, "herald-mail", &["worker", "mail"], &smtp);

    let delivered = post_task(&api, "1", json!({ "locked": "down" })).await;
    let webhook = good.wait_for(1, DEADLINE).await.remove(0);
    assert!(
        webhook.body.contains("\"locked\":\"down\""),
        "{}",
        webhook.body
    );
    herald_testkit::verify_with_standardwebhooks(SIGNING_SECRET, &webhook)
        .expect("signed with the endpoint's secret");
    wait_for_state(&api, "1", &delivered, "delivered").await;

    let failed = post_task(&api, "2", json!({ "will": "fail" })).await;
    let mails = mail
        .wait_for_messages("owner2@example.com", 1, DEADLINE)
        .await;
    assert!(mails[0].text.contains(&failed), "{}", mails[0].text);
    wait_for_state(&api, "2", &failed, "mailed").await;

    // What the API publishes beyond tasks: a redelivery and a recovery.
    let http = http_client();
    let redeliver = format!("{api}/users/1/tasks/{delivered}/redeliver");
    let response = http.post(&redeliver).send().await.unwrap();
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    good.wait_for(2, DEADLINE).await;
    bad.set_behaviour(ReceiverBehaviour::Ok);
    let recover = format!("{api}/users/2/endpoints/default_bad/recover");
    let response = http
        .post(&recover)
        .json(&json!({ "since": "2000-01-01T00:00:00Z" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    wait_for_state(&api, "2", &failed, "delivered").await;

    // Nothing any role did on the way was refused: the permissions are
    // complete for every role's work, not only tight.
    let log = locked.nats.log();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
    assert!(
        refused.is_empty(),
        "a role was refused something it needs:\n{}",
        refused.join("\n")
    );
}

/// Publishes `subject` as `user` through JetStream (waiting for the
/// stream's ack); whether it was stored.
async fn stored(locked: &LockedNats, user: &str, subject: &str) -> bool {
    let broker = connect_with(&locked.config(user), "herald-test-intruder")
        .await
        .unwrap();
    let ack = match broker
        .jetstream_for_tests()
        .publish(subject.to_string(), "{\"v\":1}".into())
        .await
    {
        Ok(ack) => ack,
        Err(_) => return false,
    };
    tokio::time::timeout(Duration::from_secs(3), ack)
        .await
        .is_ok_and(|ack| ack.is_ok())
}

#[tokio::test]
async fn a_role_cannot_publish_what_its_permissions_forbid() {
    let locked = LockedNats::start().await;
    let (ok, stderr) =
        run_to_end(&locked, "herald-operator", &["endpoints", "/dev/null"], &[]).await;
    assert!(ok, "the operator could not create the topology: {stderr}");

    let task = "herald.tasks.echo.1.01a22359-3238-7167-a1b7-33a2de398bde";
    // Allowed: each role can do its own work (the refusals below are not a
    // broken connection).
    assert!(
        stored(&locked, "herald-api", task).await,
        "the API cannot post a task"
    );
    assert!(
        stored(&locked, "herald-api", "herald.replays.1.t.rd-1").await,
        "the API cannot ask for a redelivery"
    );
    let forbidden = [
        // The API writes no endpoint record and no mail job.
        ("herald-api", "$KV.herald-endpoints.1.evil"),
        ("herald-api", "herald.mail.1"),
        ("herald-api", "herald.retries.1.evil.x"),
        // nor a delivery job or history: redeliver and recover only store
        // a request, which the task worker carries out from the record.
        ("herald-api", "herald.webhooks.x.y"),
        ("herald-api", "herald.attempts.x.y"),
        // Webhook workers never create tasks nor endpoints.
        ("herald-webhooks", task),
        ("herald-webhooks", "$KV.herald-endpoints.1.evil"),
        // nor publish a delivery job directly (retries are schedules).
        ("herald-webhooks", "herald.webhooks.1.evil"),
        // Task workers never create tasks, mail or endpoint records.
        ("herald-tasks", task),
        ("herald-tasks", "herald.mail.1"),
        ("herald-tasks", "$KV.herald-endpoints.1.evil"),
        // Mail workers only record mail outcomes.
        ("herald-mail", task),
        ("herald-mail", "herald.webhooks.1.evil"),
        ("herald-mail", "$KV.herald-endpoint-health.1.evil"),
        // The operator writes endpoint records, not work.
        ("herald-operator", task),
        ("herald-operator", "herald.webhooks.1.evil"),
    ];
    let results = futures::future::join_all(
        forbidden
            .iter()
            .map(|(user, subject)| stored(&locked, user, subject)),
    )
    .await;
    for ((user, subject), stored) in forbidden.iter().zip(results) {
        assert!(!stored, "{user} could publish to {subject}");
        // Refused by the server's permissions, not lost some other way.
        wait_until(
            &format!("the server to refuse {user} {subject}"),
            DEADLINE,
            || async {
                locked
                    .nats
                    .log()
                    .lines()
                    .any(|line| {
                        line.contains("Violation") && line.contains(subject) && line.contains(user)
                    })
                    .then_some(())
            },
        )
        .await;
    }
    // JetStream administration is scoped too: only the operator may change
    // a stream.
    let broker = connect_with(&locked.config("herald-api"), "herald-test-intruder")
        .await
        .unwrap();
    assert!(
        broker
            .jetstream_for_tests()
            .delete_stream(herald_core::names::TASKS_STREAM)
            .await
            .is_err()
    );
    assert!(
        broker
            .jetstream_for_tests()
            .get_stream(herald_core::names::TASKS_STREAM)
            .await
            .is_ok(),
        "the API's credentials deleted the tasks stream"
    );
}
