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
const ROLES: [(&str, &str); 5] = [
    ("herald-api", "HERALD_API"),
    ("herald-tasks", "HERALD_WORKER_TASKS"),
    ("herald-webhooks", "HERALD_WORKER_WEBHOOKS"),
    ("herald-mail", "HERALD_WORKER_MAIL"),
    ("herald-operator", "HERALD_OPERATOR"),
];

const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn permissions_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/nats/permissions.conf")
        .canonicalize()
        .expect("deploy/nats/permissions.conf exists")
}

fn password_of(user: &str) -> String {
    format!("pw-{user}-7f3a")
}

/// The server's TLS, the shipped permissions, and one user per role.
/// The users in `revoked` get another password (their access is revoked).
fn server_config(pki: &TestPki, config_dir: &Path, revoked: &[&str]) -> String {
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
struct LockedNats {
    nats: NatsServer,
    pki: TestPki,
    files: TempDir,
}

impl LockedNats {
    async fn start() -> LockedNats {
        let pki = TestPki::generate();
        let nats = NatsServer::start_with_config(|dir| server_config(&pki, dir, &[])).await;
        let files = tempfile::tempdir().unwrap();
        for (user, _) in ROLES {
            std::fs::write(files.path().join(user), password_of(user)).unwrap();
        }
        std::fs::write(files.path().join("wrong"), "not-the-password").unwrap();
        LockedNats { nats, pki, files }
    }

    fn password_file(&self, name: &str) -> String {
        self.files.path().join(name).display().to_string()
    }

    /// The `nats` settings of `user`, as `HERALD_NATS__*` variables.
    fn env(&self, user: &str) -> Vec<(String, String)> {
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
    fn config(&self, user: &str) -> NatsConfig {
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
fn role(
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
async fn run_to_end(
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

async fn get_json(url: &str) -> Option<Value> {
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
        .jetstream
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
    let forbidden = [
        // The API writes no endpoint record and no mail job.
        ("herald-api", "$KV.herald-endpoints.1.evil"),
        ("herald-api", "herald.mail.1"),
        ("herald-api", "herald.retries.1.evil.x"),
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
            .jetstream
            .delete_stream(herald_core::names::TASKS_STREAM)
            .await
            .is_err()
    );
    assert!(
        broker
            .jetstream
            .get_stream(herald_core::names::TASKS_STREAM)
            .await
            .is_ok(),
        "the API's credentials deleted the tasks stream"
    );
}

#[tokio::test]
async fn wrong_credentials_and_untrusted_certificates_stop_the_process() {
    let locked = LockedNats::start().await;
    let path = |name: &str| locked.pki.path(name).display().to_string();
    for (what, extra, named) in [
        (
            "a wrong password",
            vec![("HERALD_NATS__PASSWORD_FILE", locked.password_file("wrong"))],
            "nats.user and nats.password_file",
        ),
        (
            "a CA that did not sign the server's certificate",
            vec![("HERALD_NATS__TLS__CA_FILE", path("other-ca.pem"))],
            "nats.tls.ca_file",
        ),
        (
            "a client certificate the server does not trust",
            vec![
                ("HERALD_NATS__TLS__CERT_FILE", path("other-client.pem")),
                ("HERALD_NATS__TLS__KEY_FILE", path("other-client-key.pem")),
            ],
            "nats.tls.cert_file",
        ),
        (
            "no client certificate",
            vec![
                ("HERALD_NATS__TLS__CERT_FILE", String::new()),
                ("HERALD_NATS__TLS__KEY_FILE", String::new()),
            ],
            "nats.tls.cert_file",
        ),
        (
            "a missing CA file",
            vec![("HERALD_NATS__TLS__CA_FILE", "/nonexistent/ca.pem".into())],
            "nats.tls.ca_file",
        ),
        (
            "a missing password file",
            vec![("HERALD_NATS__PASSWORD_FILE", "/nonexistent/pw".into())],
            "nats.password_file",
        ),
    ] {
        let (ok, stderr) = run_to_end(&locked, "herald-mail", &["worker", "mail"], &extra).await;
        assert!(!ok, "{what}: the worker kept running");
        assert!(
            stderr.contains(named) && stderr.contains("herald:"),
            "{what}: the message does not name {named}:\n{stderr}"
        );
    }
    // The same for the API, with a wrong password.
    let listen = format!("127.0.0.1:{}", free_port());
    let (ok, stderr) = run_to_end(
        &locked,
        "herald-api",
        &["api", "--listen", &listen],
        &[("HERALD_NATS__PASSWORD_FILE", locked.password_file("wrong"))],
    )
    .await;
    assert!(!ok && stderr.contains("nats.password_file"), "{stderr}");
}

#[tokio::test]
async fn readyz_is_false_while_nats_refuses_the_role() {
    let mut locked = LockedNats::start().await;
    let (ok, stderr) =
        run_to_end(&locked, "herald-operator", &["endpoints", "/dev/null"], &[]).await;
    assert!(ok, "{stderr}");
    let probes = format!("127.0.0.1:{}", free_port());
    let _worker = role(
        &locked,
        "herald-webhooks",
        &["worker", "webhooks"],
        &[("HERALD_HEALTH__LISTEN", probes.clone())],
    );
    let listen = format!("127.0.0.1:{}", free_port());
    let _api = role(&locked, "herald-api", &["api", "--listen", &listen], &[]);
    let ready = [
        format!("http://{probes}/readyz"),
        format!("http://{listen}/readyz"),
    ];
    let statuses = || async {
        let mut statuses = Vec::new();
        for url in &ready {
            let response = http_client().get(url).send().await.ok();
            statuses.push(response.map(|r| r.status().as_u16()));
        }
        statuses
    };
    wait_until("the worker and the API to be ready", DEADLINE, || async {
        (statuses().await == [Some(200), Some(200)]).then_some(())
    })
    .await;

    // The cluster admin revokes both roles' passwords: the server drops
    // their connections and refuses every reconnect.
    let revoked = server_config(
        &locked.pki,
        locked.nats.config_dir(),
        &["herald-webhooks", "herald-api"],
    );
    locked.nats.reload_with_config(&revoked);
    wait_until("both to report not ready", DEADLINE, || async {
        (statuses().await == [Some(503), Some(503)]).then_some(())
    })
    .await;
    // Alive all the while (a restart would not help), and ready again once
    // the server lets them in.
    for healthz in [
        format!("http://{probes}/healthz"),
        format!("http://{listen}/healthz"),
    ] {
        assert!(
            get_json(&healthz).await.is_some(),
            "{healthz} stopped answering"
        );
    }
    let restored = server_config(&locked.pki, locked.nats.config_dir(), &[]);
    locked.nats.reload_with_config(&restored);
    wait_until("both to be ready again", DEADLINE, || async {
        (statuses().await == [Some(200), Some(200)]).then_some(())
    })
    .await;
}

/// An NKey seed file and a token file authenticate too (the `.creds` file of
/// JWT auth goes through the same path in async-nats); a seed or token the
/// server does not know stops the start naming its setting.
#[tokio::test]
async fn nkey_seeds_and_tokens_authenticate_and_wrong_ones_are_named() {
    let pki = TestPki::generate();
    let files = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = files.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let known = nkeys::KeyPair::new_user();
    let known_seed = write("known.nk", &known.seed().unwrap());
    let stranger_seed = write("stranger.nk", &nkeys::KeyPair::new_user().seed().unwrap());
    let tls = |config: &mut NatsConfig| {
        config.tls.ca_file = pki.path("ca.pem").display().to_string();
        config.tls.cert_file = pki.path("client.pem").display().to_string();
        config.tls.key_file = pki.path("client-key.pem").display().to_string();
    };

    let nats = NatsServer::start_with_config(|dir| {
        format!(
            "{}include \"{}\"\nauthorization {{\n  users = [\n    {{ nkey: \"{}\", permissions: $HERALD_API }}\n{}  ]\n}}\n",
            pki.server_tls_block(),
            include_path(dir, &permissions_file()),
            known.public_key(),
            // Every variable of the file must be used (nats-server refuses
            // unknown keys): the other roles as password users.
            ROLES
                .iter()
                .filter(|(_, p)| *p != "HERALD_API")
                .map(|(u, p)| format!("    {{ user: \"{u}\", password: \"x\", permissions: ${p} }}\n"))
                .collect::<String>(),
        )
    })
    .await;
    let mut config = NatsConfig::url(&nats.url());
    tls(&mut config);
    config.nkey_seed_file = known_seed;
    let broker = connect_with(&config, "herald-test-nkey").await.unwrap();
    wait_until("the NKey user to be let in", DEADLINE, || async {
        broker.is_connected().then_some(())
    })
    .await;
    config.nkey_seed_file = stranger_seed;
    let error = connect_with(&config, "herald-test-nkey")
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("nats.nkey_seed_file"), "{error}");

    let token_server = NatsServer::start_with_config(|_| {
        format!(
            "{}authorization {{ token: \"t0ken-for-herald\" }}\n",
            pki.server_tls_block()
        )
    })
    .await;
    let mut config = NatsConfig::url(&token_server.url());
    tls(&mut config);
    config.token_file = write("token", "t0ken-for-herald\n");
    let broker = connect_with(&config, "herald-test-token").await.unwrap();
    wait_until("the token to be accepted", DEADLINE, || async {
        broker.is_connected().then_some(())
    })
    .await;
    config.token_file = write("wrong-token", "guessed");
    let error = connect_with(&config, "herald-test-token")
        .await
        .err()
        .unwrap();
    assert!(error.to_string().contains("nats.token_file"), "{error}");
}

/// A role started before NATS is up waits for it, and once the server is
/// there and turns it away, stops with the same message.
#[tokio::test]
async fn a_role_started_before_nats_stops_once_nats_refuses_it() {
    use tokio::io::AsyncBufReadExt;

    let mut locked = LockedNats::start().await;
    locked.nats.stop().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["worker", "mail"])
        .envs(locked.env("herald-mail"))
        .env("HERALD_NATS__PASSWORD_FILE", locked.password_file("wrong"))
        .env("HERALD_LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald");
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let collected = stderr.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut text = collected.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
    let said = |what: &'static str| {
        let stderr = stderr.clone();
        move || {
            let found = stderr.lock().unwrap().contains(what);
            async move { found.then_some(()) }
        }
    };
    wait_until(
        "the worker to wait for NATS",
        DEADLINE,
        said("not reachable yet"),
    )
    .await;
    locked.nats.start_again().await;
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the worker kept running although NATS refuses it")
        .unwrap();
    reader.await.unwrap();
    let stderr = stderr.lock().unwrap().clone();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("nats.user and nats.password_file"),
        "{stderr}"
    );
}
