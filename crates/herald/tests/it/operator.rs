//! The operator against a real kube-apiserver (with etcd), a real
//! nats-server and loopback receivers: `kubectl apply` of a WebhookEndpoint
//! routes deliveries; changes, rotations, deletions, bad objects, missing
//! Secrets, endpoint health and leader election, as a user sees them.

use std::process::Stdio;

use herald::roles::Roles;
use herald_core::signing::SigningSecret;
use herald_testkit::{
    ControlPlane, NatsServer, ReceivedWebhook, ReceiverBehaviour, TestReceiver, free_port,
    http_client, verify_with_standardwebhooks, wait_until,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::json;

use crate::harness::{DEADLINE, Herald, TEST_KEY, test_config};

/// Runs kubectl; panics with its output unless it succeeds.
pub(crate) fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    let output = cp.kubectl(args);
    assert!(
        output.status.success(),
        "kubectl {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `kubectl apply -f` of `yaml`; returns the output, success or not.
pub(crate) fn apply(cp: &ControlPlane, yaml: &str) -> std::process::Output {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    cp.kubectl(["apply", "-f", &file.path().display().to_string()])
}

pub(crate) fn apply_ok(cp: &ControlPlane, yaml: &str) {
    let output = apply(cp, yaml);
    assert!(
        output.status.success(),
        "kubectl apply failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

pub(crate) fn install_crd(cp: &ControlPlane) {
    let crd = herald_testkit::workspace_root().join("crds/webhookendpoints.herald.dev.yaml");
    kubectl(cp, &["apply", "-f", &crd.display().to_string()]);
    kubectl(
        cp,
        &[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd/webhookendpoints.herald.dev",
        ],
    );
}

/// Grants `namespace` the users `patterns` match, as a cluster admin does
/// on the Namespace (see docs/design.md, "Tenancy").
pub(crate) fn grant(cp: &ControlPlane, namespace: &str, patterns: &str) {
    kubectl(
        cp,
        &[
            "annotate",
            "--overwrite",
            "namespace",
            namespace,
            &format!("herald.dev/users={patterns}"),
        ],
    );
}

fn secret_yaml(name: &str, secret: &SigningSecret) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: default}}\n\
         stringData: {{secret: {}}}\n",
        secret.expose()
    )
}

fn endpoint_yaml(name: &str, user: &str, url: &str, extra: &str) -> String {
    format!(
        "apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  userId: '{user}'\n  url: '{url}'\n  email: ops@example.com\n{extra}"
    )
}

/// `herald operator` as a process, with short timings for tests.
fn operator_process(cp: &ControlPlane, nats: &NatsServer, identity: &str) -> tokio::process::Child {
    operator_process_with(cp, nats, identity, &[])
}

pub(crate) fn operator_process_with(
    cp: &ControlPlane,
    nats: &NatsServer,
    identity: &str,
    env: &[(&str, &str)],
) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("operator")
        .env("HERALD_SECRETS__KEY", TEST_KEY)
        .envs(env.iter().copied())
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("HERALD_NATS__URL", nats.url())
        .env("HERALD_OPERATOR__HEALTH_RESYNC", "300ms")
        .env("HERALD_OPERATOR__ERROR_BACKOFF", "300ms")
        .env("HERALD_OPERATOR__LEASE_NAMESPACE", "default")
        .env("HERALD_OPERATOR__LEASE_DURATION", "3s")
        .env("HERALD_OPERATOR__RENEW_INTERVAL", "1s")
        .env("POD_NAME", identity)
        .env("HERALD_LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald operator")
}

/// How many signatures a webhook carries.
fn signatures(webhook: &ReceivedWebhook) -> usize {
    webhook.headers["webhook-signature"].split(' ').count()
}

/// A tampered body, a stale timestamp or another secret fail the
/// reference verifier.
fn refused_when_tampered(webhook: &ReceivedWebhook, secrets: &[&SigningSecret]) {
    for secret in secrets {
        let mut tampered = webhook.clone();
        tampered.body.push(' ');
        assert!(verify_with_standardwebhooks(&secret.expose(), &tampered).is_err());
        let mut stale = webhook.clone();
        let sent: u64 = webhook.headers["webhook-timestamp"].parse().unwrap();
        stale
            .headers
            .insert("webhook-timestamp".into(), (sent - 600).to_string());
        assert!(verify_with_standardwebhooks(&secret.expose(), &stale).is_err());
    }
    let stranger = SigningSecret::generate();
    assert!(verify_with_standardwebhooks(&stranger.expose(), webhook).is_err());
}

/// `kubectl get whe <name> -o jsonpath=<path>`.
fn field(cp: &ControlPlane, name: &str, jsonpath: &str) -> String {
    let output = cp.kubectl(["get", "whe", name, "-o", &format!("jsonpath={jsonpath}")]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn wait_for_field(cp: &ControlPlane, name: &str, jsonpath: &str, want: &str) {
    let what = format!("{name} {jsonpath} to be {want:?}");
    wait_until(&what, DEADLINE, || async {
        (field(cp, name, jsonpath) == want).then_some(())
    })
    .await;
}

pub(crate) const READY: &str = "{.status.conditions[?(@.type==\"Ready\")].status}";
pub(crate) const READY_REASON: &str = "{.status.conditions[?(@.type==\"Ready\")].reason}";

/// Posts tasks for `user` until one is delivered to `receiver` at `path`
/// (changes reach the workers' cache a moment after the resource changes);
/// returns that webhook.
pub(crate) async fn next_delivery_at(
    herald: &Herald,
    user: &str,
    receiver: &TestReceiver,
    path: &str,
) -> ReceivedWebhook {
    wait_until(&format!("a delivery to {path}"), DEADLINE, || async {
        let id = herald.accept(user, "echo", json!({})).await;
        herald.wait_for_state(user, &id, "delivered").await;
        receiver
            .received()
            .into_iter()
            .find(|w| w.path == path && w.body.contains(&id))
    })
    .await
}

#[tokio::test]
async fn a_webhook_endpoint_resource_routes_signed_deliveries_through_its_life() {
    let cp = ControlPlane::start().await;
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    install_crd(&cp);
    // These tests are about one tenant: it may serve every user.
    grant(&cp, "default", "*");
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;
    // Long enough to see both signatures, short enough to see it end.
    let overlap = &[("HERALD_SECRETS__ROTATION_OVERLAP", "20s")];
    let mut operator = operator_process_with(&cp, &nats, "operator-a", overlap);

    let first = SigningSecret::generate();
    apply_ok(&cp, &secret_yaml("hook-secret", &first));
    let ref_to_secret = "  secretRef: {name: hook-secret}\n";
    apply_ok(
        &cp,
        &endpoint_yaml("orders", "op1", &receiver.url("/a"), ref_to_secret),
    );
    wait_for_field(&cp, "orders", READY, "True").await;
    let webhook = next_delivery_at(&herald, "op1", &receiver, "/a").await;
    verify_with_standardwebhooks(&first.expose(), &webhook)
        .expect("signed with the referenced Secret");
    // kubectl get shows the printer columns.
    let table = kubectl(&cp, &["get", "whe", "orders"]);
    assert!(
        table.contains("op1") && table.contains(&receiver.url("/a")),
        "{table}"
    );

    // A new URL takes the next deliveries.
    apply_ok(
        &cp,
        &endpoint_yaml("orders", "op1", &receiver.url("/b"), ref_to_secret),
    );
    next_delivery_at(&herald, "op1", &receiver, "/b").await;

    // A rotated Secret signs the next deliveries, and for the overlap the
    // old one signs too: a receiver holding either secret verifies them.
    let second = SigningSecret::generate();
    apply_ok(&cp, &secret_yaml("hook-secret", &second));
    let during = wait_until(
        "deliveries signed with the new secret",
        DEADLINE,
        || async {
            let webhook = next_delivery_at(&herald, "op1", &receiver, "/b").await;
            verify_with_standardwebhooks(&second.expose(), &webhook)
                .ok()
                .map(|()| webhook)
        },
    )
    .await;
    verify_with_standardwebhooks(&first.expose(), &during)
        .expect("the old secret still signs during the overlap");
    assert_eq!(signatures(&during), 2, "{:?}", during.headers);
    refused_when_tampered(&during, &[&first, &second]);

    // The overlap is kept in herald-endpoints, not in the operator's
    // memory: a restarted operator that rewrites the record (new URL)
    // keeps the old secret signing.
    kill(
        Pid::from_raw(operator.id().expect("running") as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    operator.wait().await.unwrap();
    let _operator = operator_process_with(&cp, &nats, "operator-a", overlap);
    apply_ok(
        &cp,
        &endpoint_yaml("orders", "op1", &receiver.url("/c"), ref_to_secret),
    );
    let restarted = next_delivery_at(&herald, "op1", &receiver, "/c").await;
    for secret in [&first, &second] {
        verify_with_standardwebhooks(&secret.expose(), &restarted)
            .expect("both secrets sign after the operator restarted");
    }

    // The overlap ends: the old secret no longer verifies.
    let after = wait_until("the old secret to stop signing", DEADLINE, || async {
        let webhook = next_delivery_at(&herald, "op1", &receiver, "/c").await;
        verify_with_standardwebhooks(&first.expose(), &webhook)
            .is_err()
            .then_some(webhook)
    })
    .await;
    verify_with_standardwebhooks(&second.expose(), &after).expect("the new secret signs");
    assert_eq!(signatures(&after), 1, "{:?}", after.headers);

    // Deleted: the finalizer removes the record, then the resource goes.
    kubectl(&cp, &["delete", "whe", "orders", "--timeout=30s"]);
    wait_until("a task for op1 to find no endpoint", DEADLINE, || async {
        let id = herald.accept("op1", "echo", json!({})).await;
        let task = herald
            .wait_for_state_in("op1", &id, &["delivered", "no_endpoint"])
            .await;
        (task["state"] == "no_endpoint").then_some(())
    })
    .await;
    herald.stop().await;
}

#[tokio::test]
async fn bad_objects_are_refused_and_a_missing_secret_is_reported_until_it_appears() {
    let cp = ControlPlane::start().await;
    let nats = NatsServer::start().await;
    install_crd(&cp);
    // These tests are about one tenant: it may serve every user.
    grant(&cp, "default", "*");
    let _operator = operator_process(&cp, &nats, "operator-a");

    // The API server refuses what the schema can tell is wrong.
    for (spec, mentions) in [
        (
            endpoint_yaml("bad-url", "u1", "ftp://example.com/hook", ""),
            "spec.url",
        ),
        (
            endpoint_yaml("empty-user", "", "https://example.com/hook", ""),
            "spec.userId",
        ),
        (
            endpoint_yaml(
                "slow",
                "u1",
                "https://example.com/hook",
                "  timeoutSeconds: 600\n",
            ),
            "spec.timeoutSeconds",
        ),
    ] {
        let output = apply(&cp, &spec);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "accepted:\n{spec}");
        assert!(stderr.contains(mentions), "{stderr}");
    }

    // A Secret that does not exist yet: Ready=False with the reason.
    apply_ok(
        &cp,
        &endpoint_yaml(
            "waiting",
            "u2",
            "https://example.com/hook",
            "  secretRef: {name: later}\n",
        ),
    );
    wait_for_field(&cp, "waiting", READY, "False").await;
    assert_eq!(field(&cp, "waiting", READY_REASON), "SecretNotFound");
    let described = kubectl(&cp, &["describe", "whe", "waiting"]);
    assert!(described.contains("SecretNotFound"), "{described}");
    // The Secret appears: the watch on Secrets brings it to Ready.
    apply_ok(&cp, &secret_yaml("later", &SigningSecret::generate()));
    wait_for_field(&cp, "waiting", READY, "True").await;

    // Without secretRef the operator generates a Secret the resource owns.
    apply_ok(
        &cp,
        &endpoint_yaml("generated", "u3", "https://example.com/hook", ""),
    );
    wait_for_field(&cp, "generated", READY, "True").await;
    let owner = kubectl(
        &cp,
        &[
            "get",
            "secret",
            "generated-signing-secret",
            "-o",
            "jsonpath={.metadata.ownerReferences[0].name}",
        ],
    );
    assert_eq!(owner, "generated");
}

#[tokio::test]
async fn endpoint_health_shows_in_status_failing_then_active() {
    let cp = ControlPlane::start().await;
    let nats = NatsServer::start().await;
    // One failure per webhook, then success three seconds later.
    let receiver = TestReceiver::start(ReceiverBehaviour::FailFirst {
        times: 1,
        status: 500,
    })
    .await;
    install_crd(&cp);
    // These tests are about one tenant: it may serve every user.
    grant(&cp, "default", "*");
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;
    let _operator = operator_process(&cp, &nats, "operator-a");
    apply_ok(
        &cp,
        &endpoint_yaml(
            "flaky",
            "h1",
            &receiver.url("/flaky"),
            "  retry: {schedule: [3s]}\n",
        ),
    );
    wait_for_field(&cp, "flaky", "{.status.state}", "Active").await;

    let id = herald.accept("h1", "echo", json!({})).await;
    wait_for_field(&cp, "flaky", "{.status.state}", "Failing").await;
    assert!(!field(&cp, "flaky", "{.status.failingSince}").is_empty());
    let table = kubectl(&cp, &["get", "webhookendpoints"]);
    assert!(table.contains("Failing"), "{table}");

    herald.wait_for_state("h1", &id, "delivered").await;
    wait_for_field(&cp, "flaky", "{.status.state}", "Active").await;
    assert_eq!(field(&cp, "flaky", "{.status.failingSince}"), "");
    assert!(!field(&cp, "flaky", "{.status.lastDelivery}").is_empty());
    herald.stop().await;
}

#[tokio::test]
async fn two_operators_one_leads_and_the_other_takes_over_when_it_dies() {
    let cp = ControlPlane::start().await;
    let nats = NatsServer::start().await;
    install_crd(&cp);
    // These tests are about one tenant: it may serve every user.
    grant(&cp, "default", "*");
    let probes = format!("127.0.0.1:{}", free_port());
    let mut a = operator_process_with(
        &cp,
        &nats,
        "operator-a",
        &[("HERALD_HEALTH__LISTEN", &probes)],
    );
    let mut b = operator_process(&cp, &nats, "operator-b");
    // Operator a serves probes and metrics, leading or standing by.
    let http = http_client();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let url = format!("http://{probes}{path}");
        wait_until(
            &format!("operator a to answer {path}"),
            DEADLINE,
            || async {
                let response = http.get(&url).send().await.ok()?;
                response.status().is_success().then_some(())
            },
        )
        .await;
    }
    let holder = || {
        let output = cp.kubectl([
            "get",
            "lease",
            "herald-operator",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let leader = wait_until("a leader", DEADLINE, || async {
        let holder = holder();
        (!holder.is_empty()).then_some(holder)
    })
    .await;
    // The leader reconciles.
    apply_ok(
        &cp,
        &endpoint_yaml("one", "l1", "https://example.com/hook", ""),
    );
    wait_for_field(&cp, "one", READY, "True").await;

    // SIGKILL the leader: no release, the lease must expire.
    let (dead, survivor) = if leader == "operator-a" {
        (&mut a, "operator-b")
    } else {
        (&mut b, "operator-a")
    };
    dead.start_kill().unwrap();
    dead.wait().await.unwrap();
    wait_until("the other operator to take the lease", DEADLINE, || async {
        (holder() == survivor).then_some(())
    })
    .await;
    apply_ok(
        &cp,
        &endpoint_yaml("two", "l2", "https://example.com/hook", ""),
    );
    wait_for_field(&cp, "two", READY, "True").await;
}

/// The value of `sample` (a metric name with its labels) in what the
/// operator serves at `http://<probes>/metrics`; `None` until it is there.
async fn metric(http: &reqwest::Client, probes: &str, sample: &str) -> Option<f64> {
    let text = http
        .get(format!("http://{probes}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix(sample)?.strip_prefix(' ')?;
        value.split(' ').next()?.parse().ok()
    })
}

#[tokio::test]
async fn a_failed_reconcile_is_counted_under_its_step_and_retried_until_it_succeeds() {
    let cp = ControlPlane::start().await;
    let mut nats = NatsServer::start().await;
    install_crd(&cp);
    // These tests are about one tenant: it may serve every user.
    grant(&cp, "default", "*");
    let probes = format!("127.0.0.1:{}", free_port());
    let _operator = operator_process_with(
        &cp,
        &nats,
        "operator-a",
        &[("HERALD_HEALTH__LISTEN", &probes)],
    );
    let http = http_client();
    apply_ok(
        &cp,
        &endpoint_yaml("steady", "f1", "https://example.com/a", ""),
    );
    wait_for_field(&cp, "steady", READY, "True").await;
    assert_eq!(field(&cp, "steady", "{.status.observedGeneration}"), "1");
    let reconciles = metric(&http, &probes, "herald_operator_reconciles_total").await;
    assert!(reconciles >= Some(1.0), "{reconciles:?}");

    // Without NATS the record cannot be written: the reconcile fails at
    // that step, is counted under it, and the status is left alone.
    nats.stop().await;
    apply_ok(
        &cp,
        &endpoint_yaml("steady", "f1", "https://example.com/b", ""),
    );
    let failed_write = "herald_operator_reconcile_failures_total{error=\"record_write\"}";
    wait_until("a failed record write to be counted", DEADLINE, || async {
        (metric(&http, &probes, failed_write).await? >= 1.0).then_some(())
    })
    .await;
    assert_eq!(field(&cp, "steady", "{.status.observedGeneration}"), "1");
    assert_eq!(field(&cp, "steady", READY), "True");

    // NATS is back: the retry writes the new generation.
    nats.start_again().await;
    wait_for_field(&cp, "steady", "{.status.observedGeneration}", "2").await;
    assert_eq!(field(&cp, "steady", READY), "True");
}
