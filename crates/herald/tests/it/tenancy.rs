//! Tenants against a real kube-apiserver, nats-server and loopback
//! receivers: a namespace serves only the users the cluster admin granted
//! it, and nothing on a resource decides which endpoint record the
//! operator replaces or removes.

use futures::StreamExt;
use herald::roles::Roles;
use herald_core::{
    EndpointId, UserId,
    endpoint_secrets::open_record,
    names,
    payload::{EndpointConfig, owner_of_resource},
    signing::SigningSecret,
};
use herald_crd::WebhookEndpointSpec;
use herald_queue::endpoints::{self, RecordWriter};
use herald_testkit::{ControlPlane, NatsServer, ReceiverBehaviour, TestReceiver, wait_until};
use serde_json::json;

use crate::{
    harness::{DEADLINE, Herald, broker, test_config},
    operator::{
        READY, READY_REASON, apply_ok, grant, install_crd, kubectl, next_delivery_at,
        operator_process_with,
    },
};

/// The operator, with `toml` as its configuration file (the grants).
fn operator_with(
    cp: &ControlPlane,
    nats: &NatsServer,
    toml: &str,
) -> (tokio::process::Child, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), toml).unwrap();
    let path = file.path().display().to_string();
    let operator = operator_process_with(cp, nats, "operator-a", &[("HERALD_CONFIG", &path)]);
    (operator, file)
}

fn create_namespaces(cp: &ControlPlane, namespaces: &[&str]) {
    for namespace in namespaces {
        kubectl(cp, &["create", "namespace", namespace]);
    }
}

fn endpoint_in(namespace: &str, name: &str, user: &str, url: &str, annotations: &str) -> String {
    format!(
        "apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\n\
         metadata: {{name: {name}, namespace: {namespace}, annotations: {{{annotations}}}}}\n\
         spec:\n  userId: '{user}'\n  url: '{url}'\n"
    )
}

fn field_in(cp: &ControlPlane, namespace: &str, name: &str, jsonpath: &str) -> String {
    let output = cp.kubectl([
        "get",
        "whe",
        name,
        "-n",
        namespace,
        "-o",
        &format!("jsonpath={jsonpath}"),
    ]);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn wait_for_field_in(cp: &ControlPlane, namespace: &str, name: &str, path: &str, want: &str) {
    let what = format!("{namespace}/{name} {path} to be {want:?}");
    wait_until(&what, DEADLINE, || async {
        (field_in(cp, namespace, name, path) == want).then_some(())
    })
    .await;
}

const READY_MESSAGE: &str = "{.status.conditions[?(@.type==\"Ready\")].message}";

fn records(nats: &NatsServer) -> RecordWriter {
    test_config(nats, None)
        .secrets
        .record_writer("a test")
        .unwrap()
}

/// The record under `<user>.<namespace>_<name>`, opened, if any.
async fn record(
    nats: &NatsServer,
    user: &str,
    namespace: &str,
    name: &str,
) -> Option<EndpointConfig> {
    let broker = broker(nats).await;
    let bucket = broker
        .jetstream_for_tests()
        .get_key_value(names::ENDPOINTS_BUCKET)
        .await
        .unwrap();
    let id = EndpointId::from_resource(namespace, name).unwrap();
    let key = names::endpoint_key(&UserId::new(user).unwrap(), &id);
    let bytes = bucket.get(&key).await.unwrap()?;
    Some(
        open_record(&key, &bytes, &records(nats).keyring)
            .unwrap()
            .config,
    )
}

/// Writes a record as another writer would, before any resource claims it.
async fn seed_record(
    nats: &NatsServer,
    namespace: &str,
    name: &str,
    url: &str,
    owner: Option<&str>,
) {
    let broker = broker(nats).await;
    herald_queue::topology::ensure(&broker, &Default::default())
        .await
        .unwrap();
    let spec: WebhookEndpointSpec =
        serde_json::from_value(json!({ "userId": "alice", "url": url })).unwrap();
    let mut config = spec
        .to_config(namespace, name, vec![SigningSecret::generate()])
        .unwrap();
    config.owner = owner.map(str::to_string);
    endpoints::put_if_changed(&broker, &records(nats), &config)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_namespace_serves_only_the_users_its_admin_granted() {
    let cp = ControlPlane::start().await;
    let nats = NatsServer::start().await;
    let receiver_a = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let receiver_b = TestReceiver::start(ReceiverBehaviour::Ok).await;
    install_crd(&cp);
    create_namespaces(&cp, &["team-a", "team-b"]);
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;
    // team-a is granted alice in the operator's configuration; team-b
    // nothing.
    let (_operator, _config) = operator_with(
        &cp,
        &nats,
        "[operator.tenancy.namespaces]\nteam-a = [\"alice\"]\n",
    );

    apply_ok(
        &cp,
        &endpoint_in("team-a", "orders", "alice", &receiver_a.url("/a"), ""),
    );
    // team-b claims alice too, under the same name.
    apply_ok(
        &cp,
        &endpoint_in("team-b", "orders", "alice", &receiver_b.url("/b"), ""),
    );
    wait_for_field_in(&cp, "team-a", "orders", READY, "True").await;
    wait_for_field_in(&cp, "team-b", "orders", READY, "False").await;
    assert_eq!(
        field_in(&cp, "team-b", "orders", READY_REASON),
        "UserNotAllowed"
    );
    let message = field_in(&cp, "team-b", "orders", READY_MESSAGE);
    assert!(
        message.contains("operator.tenancy.namespaces.team-b")
            && message.contains("herald.dev/users=alice"),
        "the refusal names the rule to add: {message}"
    );
    assert_eq!(field_in(&cp, "team-b", "orders", "{.status.state}"), "");
    wait_until("a UserNotAllowed Event in team-b", DEADLINE, || async {
        let reasons = kubectl(
            &cp,
            &[
                "get",
                "events",
                "-n",
                "team-b",
                "-o",
                "jsonpath={.items[*].reason}",
            ],
        );
        reasons.contains("UserNotAllowed").then_some(())
    })
    .await;
    assert!(record(&nats, "alice", "team-b", "orders").await.is_none());

    // alice's results go to team-a's receiver only.
    for n in 0..3 {
        let id = herald.accept("alice", "echo", json!({ "n": n })).await;
        let task = herald.wait_for_state("alice", &id, "delivered").await;
        assert_eq!(task["endpoints"].as_array().unwrap().len(), 1, "{task}");
        assert!(receiver_a.received().iter().any(|w| w.body.contains(&id)));
    }
    assert!(
        receiver_b.received().is_empty(),
        "team-b received alice's results"
    );

    // The admin grants team-b alice on its Namespace: it serves her too.
    grant(&cp, "team-b", "bob,alice");
    wait_for_field_in(&cp, "team-b", "orders", READY, "True").await;
    wait_for_field_in(&cp, "team-b", "orders", "{.status.state}", "Active").await;
    next_delivery_at(&herald, "alice", &receiver_b, "/b").await;

    // The grant withdrawn: the record goes, deliveries stop.
    kubectl(
        &cp,
        &["annotate", "namespace", "team-b", "herald.dev/users-"],
    );
    wait_for_field_in(&cp, "team-b", "orders", READY_REASON, "UserNotAllowed").await;
    assert!(record(&nats, "alice", "team-b", "orders").await.is_none());
    let id = wait_until(
        "alice's tasks to fan out to team-a only",
        DEADLINE,
        || async {
            let id = herald.accept("alice", "echo", json!({})).await;
            let task = herald.wait_for_state("alice", &id, "delivered").await;
            (task["endpoints"].as_array().unwrap().len() == 1).then_some(id)
        },
    )
    .await;
    assert!(receiver_a.received().iter().any(|w| w.body.contains(&id)));
    assert!(!receiver_b.received().iter().any(|w| w.body.contains(&id)));
    herald.stop().await;
}

#[tokio::test]
async fn a_hostile_annotation_removes_nothing_of_another_tenant() {
    let cp = ControlPlane::start().await;
    let nats = NatsServer::start().await;
    let victim = TestReceiver::start(ReceiverBehaviour::Ok).await;
    install_crd(&cp);
    create_namespaces(&cp, &["team-a", "team-b"]);
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;
    let (_operator, _config) = operator_with(
        &cp,
        &nats,
        "[operator.tenancy.namespaces]\nteam-a = [\"alice\"]\nteam-b = [\"mallory\"]\n",
    );
    apply_ok(
        &cp,
        &endpoint_in("team-a", "orders", "alice", &victim.url("/a"), ""),
    );
    wait_for_field_in(&cp, "team-a", "orders", READY, "True").await;
    next_delivery_at(&herald, "alice", &victim, "/a").await;

    // Every change to the victim's record from here on.
    let broker = broker(&nats).await;
    let bucket = broker
        .jetstream_for_tests()
        .get_key_value(names::ENDPOINTS_BUCKET)
        .await
        .unwrap();
    let victim_key = "alice.team-a_orders";
    let mut changes = bucket.watch(victim_key).await.unwrap();

    // team-b's object names the victim's key in the annotation the
    // operator used to trust, then is deleted.
    let annotation = format!("herald.dev/endpoint-key: {victim_key}");
    apply_ok(
        &cp,
        &endpoint_in(
            "team-b",
            "evil",
            "mallory",
            "https://example.com/x",
            &annotation,
        ),
    );
    wait_for_field_in(&cp, "team-b", "evil", READY, "True").await;
    kubectl(
        &cp,
        &["delete", "whe", "evil", "-n", "team-b", "--timeout=30s"],
    );

    let mut seen = Vec::new();
    while let Ok(Some(change)) =
        tokio::time::timeout(std::time::Duration::from_millis(200), changes.next()).await
    {
        seen.push(change.unwrap().operation);
    }
    assert!(
        seen.iter()
            .all(|op| *op == async_nats::jetstream::kv::Operation::Put),
        "the victim's record was removed: {seen:?}"
    );
    assert!(record(&nats, "alice", "team-a", "orders").await.is_some());
    // The victim still receives; mallory's record is gone with its object.
    next_delivery_at(&herald, "alice", &victim, "/a").await;
    assert!(record(&nats, "mallory", "team-b", "evil").await.is_none());
    herald.stop().await;
}

#[tokio::test]
async fn records_name_their_owner_and_no_identity_overwrites_another() {
    let cp = ControlPlane::start().await;
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    install_crd(&cp);
    create_namespaces(&cp, &["team-a"]);
    // Under the key team-a/taken derives: another writer's record, and one
    // from before owners (adopted by the resource whose key it is).
    seed_record(
        &nats,
        "team-a",
        "taken",
        &receiver.url("/foreign"),
        Some("herald-file"),
    )
    .await;
    seed_record(
        &nats,
        "team-a",
        "legacy",
        &receiver.url("/legacy-old"),
        None,
    )
    .await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;
    let (_operator, _config) = operator_with(
        &cp,
        &nats,
        "[operator.tenancy.namespaces]\nteam-a = [\"alice\", \"alice-*\"]\n",
    );

    // Names that differ only where a key cannot (a dot), and the two
    // claimed keys.
    for (name, path) in [
        ("billing.hooks", "/dots"),
        ("billing-hooks", "/dashes"),
        ("taken", "/mine"),
        ("legacy", "/legacy-new"),
    ] {
        apply_ok(
            &cp,
            &endpoint_in("team-a", name, "alice", &receiver.url(path), ""),
        );
    }
    for name in ["billing.hooks", "billing-hooks", "legacy"] {
        wait_for_field_in(&cp, "team-a", name, READY, "True").await;
    }
    wait_for_field_in(&cp, "team-a", "taken", READY_REASON, "KeyOwnedElsewhere").await;
    let message = field_in(&cp, "team-a", "taken", READY_MESSAGE);
    assert!(message.contains("herald-file"), "{message}");

    for (name, path, owner) in [
        (
            "billing.hooks",
            "/dots",
            owner_of_resource("team-a", "billing.hooks"),
        ),
        (
            "billing-hooks",
            "/dashes",
            owner_of_resource("team-a", "billing-hooks"),
        ),
        ("taken", "/foreign", "herald-file".to_string()),
        (
            "legacy",
            "/legacy-new",
            owner_of_resource("team-a", "legacy"),
        ),
    ] {
        let stored = record(&nats, "alice", "team-a", name).await.unwrap();
        assert_eq!(stored.url, receiver.url(path), "{name}");
        assert_eq!(stored.owner.as_deref(), Some(owner.as_str()), "{name}");
    }

    // One task reaches each record once, the foreign one included.
    let id = wait_until("a fan-out to the four endpoints", DEADLINE, || async {
        let id = herald.accept("alice", "echo", json!({})).await;
        let task = herald.wait_for_state("alice", &id, "delivered").await;
        (task["endpoints"].as_array().unwrap().len() == 4).then_some(id)
    })
    .await;
    for path in ["/dots", "/dashes", "/foreign", "/legacy-new"] {
        let hits = receiver
            .received()
            .into_iter()
            .filter(|w| w.path == path && w.body.contains(&id))
            .count();
        assert_eq!(hits, 1, "{path}");
    }

    // A changed userId moves the record: found by the resource's identity,
    // not by anything written on it.
    apply_ok(
        &cp,
        &endpoint_in(
            "team-a",
            "billing-hooks",
            "alice-2",
            &receiver.url("/dashes"),
            "",
        ),
    );
    wait_until("the record to move to alice-2", DEADLINE, || async {
        let moved = record(&nats, "alice-2", "team-a", "billing-hooks")
            .await
            .is_some();
        let left = record(&nats, "alice", "team-a", "billing-hooks")
            .await
            .is_some();
        (moved && !left).then_some(())
    })
    .await;

    // Deleting the resource that lost leaves the owner's record alone.
    kubectl(
        &cp,
        &["delete", "whe", "taken", "-n", "team-a", "--timeout=30s"],
    );
    let stored = record(&nats, "alice", "team-a", "taken").await.unwrap();
    assert_eq!(stored.owner.as_deref(), Some("herald-file"));
    herald.stop().await;
}

#[tokio::test]
async fn the_operator_shows_endpoint_urls_only_redacted() {
    let cp = ControlPlane::start().await;
    let nats = NatsServer::start().await;
    install_crd(&cp);
    grant(&cp, "default", "alice");
    // The operator at info level, its log kept.
    let log = tempfile::NamedTempFile::new().unwrap();
    let _operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("operator")
        .env("HERALD_SECRETS__KEY", crate::harness::TEST_KEY)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("HERALD_NATS__URL", nats.url())
        .env("HERALD_OPERATOR__LEASE_NAMESPACE", "default")
        .env("HERALD_LOG__FILTER", "info")
        .env("HERALD_LOG__FORMAT", "text")
        .stderr(log.reopen().unwrap())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // A Slack-style URL: the path and the query are the credential.
    let url = "https://hooks.example.com/services/T000/B000/s3cretpath?token=t0ken";
    apply_ok(&cp, &endpoint_in("default", "slack", "alice", url, ""));
    wait_for_field_in(&cp, "default", "slack", READY, "True").await;
    let events = wait_until("the Synced Event", DEADLINE, || async {
        let events = kubectl(&cp, &["get", "events", "-n", "default", "-o", "json"]);
        events.contains("Synced").then_some(events)
    })
    .await;
    assert!(events.contains("hooks.example.com"), "{events}");
    let logged = wait_until("the operator to log the write", DEADLINE, || async {
        let text = std::fs::read_to_string(log.path()).unwrap();
        text.contains("endpoint written").then_some(text)
    })
    .await;
    for (what, text) in [("Events", &events), ("the operator log", &logged)] {
        assert!(
            !text.contains("s3cretpath") && !text.contains("t0ken"),
            "{what} show the URL in clear:\n{text}"
        );
    }
}
