//! NATS refusing a role: wrong credentials and untrusted certificates stop
//! it at start, a role started before NATS stops once NATS refuses it, and
//! a running role whose credentials are revoked is not ready. Against the
//! locked-down server of [`crate::nats_auth`].

use std::process::Stdio;

use herald_queue::{NatsConfig, connect_with};
use herald_testkit::{NatsServer, TestPki, free_port, http_client, include_path, wait_until};

use crate::{
    harness::DEADLINE,
    nats_auth::{LockedNats, ROLES, get_json, permissions_file, role, run_to_end, server_config},
};

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
