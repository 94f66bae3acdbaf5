//! Signing secrets at rest and in rotation: what the `herald-endpoints`
//! bucket holds (nothing readable), the encryption key's rotation, a
//! signing secret's rotation through the file path (`herald endpoints`),
//! and roles refusing to start without the key.

use std::{path::Path, process::Stdio, sync::Arc, time::Duration};

use herald::{cli::WorkerKind, roles::Roles};
use herald_core::{
    keyring::{Keyring, new_key_text},
    names,
    signing::SigningSecret,
};
use herald_crd::WebhookEndpointSpec;
use herald_queue::endpoints::{self, EndpointCache, RecordWriter};
use herald_testkit::{
    NatsServer, ReceivedWebhook, ReceiverBehaviour, TestReceiver, verify_with_standardwebhooks,
    wait_until,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::harness::{
    DEADLINE, Herald, TEST_KEY, add_endpoint, broker, test_config, wait_for_scheduled_delivery,
};

fn writer(keys: &[&str]) -> RecordWriter {
    RecordWriter {
        keyring: keyring(keys),
        rotation_overlap: Duration::from_secs(3600),
    }
}

fn keyring(keys: &[&str]) -> Arc<Keyring> {
    Arc::new(Keyring::parse(&keys.join("\n")).unwrap())
}

/// Every message the bucket's stream holds, as stored.
async fn raw_bucket(broker: &herald_queue::Broker) -> Vec<Vec<u8>> {
    let stream = broker
        .jetstream_for_tests()
        .get_stream(format!("KV_{}", names::ENDPOINTS_BUCKET))
        .await
        .unwrap();
    let state = stream.get_info().await.unwrap().state;
    let mut messages = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(message) = stream.get_raw_message(seq).await {
            messages.push(message.payload.to_vec());
        }
    }
    assert!(!messages.is_empty(), "the bucket is empty");
    messages
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A cache over the bucket with `keyring`, watching.
async fn loaded_cache(
    nats: &NatsServer,
    keyring: Arc<Keyring>,
) -> (EndpointCache, CancellationToken) {
    let stop = CancellationToken::new();
    let cache = EndpointCache::start(
        &tokio_util::task::TaskTracker::new(),
        broker(nats).await,
        keyring,
        100,
        stop.clone(),
    );
    tokio::time::timeout(DEADLINE, cache.wait_watching())
        .await
        .expect("the endpoint cache did not start watching");
    (cache, stop)
}

#[tokio::test]
async fn the_bucket_reveals_nothing_and_a_key_rotation_re_encrypts_it() {
    let nats = NatsServer::start().await;
    let broker = broker(&nats).await;
    herald_queue::topology::ensure(&broker, &Default::default())
        .await
        .unwrap();
    let (k1, k2) = (new_key_text("k1").unwrap(), new_key_text("k2").unwrap());
    let secret = SigningSecret::generate();
    let spec: WebhookEndpointSpec = serde_json::from_value(json!({
        "userId": "9", "url": "https://hooks.example.com/in",
        "headers": { "authorization": "Bearer token-for-the-receiver" },
    }))
    .unwrap();
    let config = spec
        .to_config("default", "vault", vec![secret.clone()])
        .unwrap();
    let key = names::endpoint_key(&config.user, &config.id);
    assert!(
        endpoints::put_if_changed(&broker, &writer(&[&k1]), &config)
            .await
            .unwrap()
    );

    // Neither the whsec_ text, its base64 part, the raw key bytes, nor the
    // other fields appear in what NATS stores.
    let encoded = secret.expose()["whsec_".len()..].to_string();
    let raw_key = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&encoded)
            .unwrap()
    };
    for stored in raw_bucket(&broker).await {
        for clear in [
            secret.expose().as_bytes(),
            encoded.as_bytes(),
            raw_key.as_slice(),
            b"token-for-the-receiver",
            b"hooks.example.com",
        ] {
            assert!(
                !contains(&stored, clear),
                "{:?} in {}",
                String::from_utf8_lossy(clear),
                String::from_utf8_lossy(&stored)
            );
        }
        assert!(contains(&stored, br#""kid":"k1""#));
    }

    // Written under k1, read with [k2, k1].
    let (cache, stop) = loaded_cache(&nats, keyring(&[&k2, &k1])).await;
    let read = cache
        .get(&config.user, &config.id)
        .await
        .unwrap()
        .expect("readable");
    assert_eq!(read.secrets, std::slice::from_ref(&secret));
    stop.cancel();
    // The next write under [k2, k1] re-encrypts it under k2, though nothing
    // changed; after that a resync writes nothing.
    let rotating = writer(&[&k2, &k1]);
    assert!(
        endpoints::put_if_changed(&broker, &rotating, &config)
            .await
            .unwrap()
    );
    assert!(
        !endpoints::put_if_changed(&broker, &rotating, &config)
            .await
            .unwrap()
    );
    let latest = raw_bucket(&broker).await.pop().unwrap();
    assert!(contains(&latest, br#""kid":"k2""#));
    // k1 can go.
    let (cache, stop) = loaded_cache(&nats, keyring(&[&k2])).await;
    let found = cache.user(&config.user).await.unwrap();
    assert_eq!(
        found.get(&config.id).unwrap().secrets,
        std::slice::from_ref(&secret)
    );
    assert_eq!(found.unreadable(&config.id), None);
    stop.cancel();

    // A keyring without k2: the endpoint is reported, with the missing key,
    // and nothing panics.
    let k3 = new_key_text("k3").unwrap();
    let (cache, stop) = loaded_cache(&nats, keyring(&[&k3])).await;
    let found = cache.user(&config.user).await.unwrap();
    assert!(found.get(&config.id).is_none());
    let why = found.unreadable(&config.id).expect("reported unreadable");
    assert!(why.contains("\"k2\""), "{why}");
    assert_eq!(
        found.unreadable_without_earlier_version().map(|(k, _)| k),
        Some(key.clone())
    );
    stop.cancel();

    // A record in clear (as an older Herald wrote it) is not used, and the
    // next write replaces it with a sealed one.
    let bucket = broker
        .jetstream_for_tests()
        .get_key_value(names::ENDPOINTS_BUCKET)
        .await
        .unwrap();
    bucket
        .put(&key, herald_core::payload::encode(&config).into())
        .await
        .unwrap();
    let (cache, stop) = loaded_cache(&nats, keyring(&[&k2])).await;
    let found = cache.user(&config.user).await.unwrap();
    assert!(found.get(&config.id).is_none());
    assert!(found.unreadable(&config.id).unwrap().contains("in clear"));
    stop.cancel();
    assert!(
        endpoints::put_if_changed(&broker, &writer(&[&k2]), &config)
            .await
            .unwrap()
    );
    let latest = raw_bucket(&broker).await.pop().unwrap();
    assert!(!contains(&latest, encoded.as_bytes()));
}

fn endpoints_file(dir: &Path, url: &str, secret: &SigningSecret) -> std::path::PathBuf {
    let path = dir.join("endpoints.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: signing}}\n\
             stringData: {{secret: {}}}\n---\n\
             apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\n\
             metadata: {{name: rotating}}\n\
             spec: {{userId: 'r1', url: '{url}', secretRef: {{name: signing, key: secret}}}}\n",
            secret.expose()
        ),
    )
    .unwrap();
    path
}

/// `herald endpoints <file>` with the test key and `overlap`.
async fn sync_file(nats: &NatsServer, file: &Path, overlap: &str) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("endpoints")
        .arg(file)
        .args(["--nats-url", &nats.url()])
        .env("HERALD_SECRETS__KEY", TEST_KEY)
        .env("HERALD_SECRETS__ROTATION_OVERLAP", overlap)
        .env("HERALD_LOG__FILTER", "warn")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "herald endpoints failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Posts tasks for r1 until a delivery satisfies `check`; returns it.
async fn delivery_where(
    herald: &Herald,
    receiver: &TestReceiver,
    what: &str,
    check: impl Fn(&ReceivedWebhook) -> bool,
) -> ReceivedWebhook {
    wait_until(what, DEADLINE, || async {
        let id = herald.accept("r1", "echo", json!({})).await;
        herald.wait_for_state("r1", &id, "delivered").await;
        receiver
            .received()
            .into_iter()
            .find(|w| w.body.contains(&id))
            .filter(|w| check(w))
    })
    .await
}

#[tokio::test]
async fn a_rotated_file_secret_signs_beside_the_old_one_until_the_overlap_ends() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (SigningSecret::generate(), SigningSecret::generate());
    let url = receiver.url("/in");
    sync_file(&nats, &endpoints_file(dir.path(), &url, &old), "10s").await;
    let herald = Herald::start(test_config(&nats, None), Roles::all()).await;

    let before = delivery_where(&herald, &receiver, "a delivery", |_| true).await;
    verify_with_standardwebhooks(&old.expose(), &before).expect("signed with the file's secret");
    assert!(verify_with_standardwebhooks(&new.expose(), &before).is_err());

    sync_file(&nats, &endpoints_file(dir.path(), &url, &new), "10s").await;
    let during = delivery_where(&herald, &receiver, "a delivery with the new secret", |w| {
        verify_with_standardwebhooks(&new.expose(), w).is_ok()
    })
    .await;
    verify_with_standardwebhooks(&old.expose(), &during)
        .expect("a receiver still on the old secret verifies during the overlap");
    let mut tampered = during.clone();
    tampered.body = tampered.body.replace("r1", "r2");
    for secret in [&old, &new] {
        assert!(verify_with_standardwebhooks(&secret.expose(), &tampered).is_err());
    }

    let after = delivery_where(&herald, &receiver, "the old secret to stop signing", |w| {
        verify_with_standardwebhooks(&old.expose(), w).is_err()
    })
    .await;
    verify_with_standardwebhooks(&new.expose(), &after).expect("signed with the new secret");
    // The next sync drops the ended secret from the record.
    sync_file(&nats, &endpoints_file(dir.path(), &url, &new), "10s").await;
    let (cache, stop) = loaded_cache(&nats, keyring(&[TEST_KEY])).await;
    let user = "r1".parse().unwrap();
    let id = "default_rotating".parse().unwrap();
    let found = cache.get(&user, &id).await.unwrap().expect("readable");
    assert!(found.previous_secrets.is_empty());
    stop.cancel();
    herald.stop().await;
}

#[tokio::test]
async fn roles_that_read_or_write_endpoints_refuse_to_start_without_the_key() {
    for args in [
        &["worker", "webhooks"][..],
        &["worker", "tasks"],
        &["operator"],
        &["endpoints", "examples/endpoints.yaml"],
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(args)
            .args(["--nats-url", "nats://127.0.0.1:9"])
            .env_remove("HERALD_SECRETS__KEY")
            .env_remove("HERALD_SECRETS__KEY_FILE")
            .current_dir(herald_testkit::workspace_root())
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} started without a key");
        assert!(
            stderr.contains("encrypts signing secrets")
                && stderr.contains("herald secrets new-key"),
            "{args:?}: {stderr}"
        );
    }
    // `herald secrets new-key` makes a key a role accepts.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["secrets", "new-key", "--id", "k7"])
        .output()
        .await
        .unwrap();
    let key = String::from_utf8(output.stdout).unwrap();
    assert_eq!(Keyring::parse(&key).unwrap().ids(), ["k7"]);
}

#[tokio::test]
async fn a_keyring_missing_the_endpoints_key_keeps_its_deliveries() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "1", "hooks", &receiver.url("/"), None).await;
    let fan_out = Herald::start(
        test_config(&nats, None),
        Roles {
            api: true,
            workers: [WorkerKind::Tasks].into(),
        },
    )
    .await;
    let mut wrong_key = test_config(&nats, None);
    wrong_key.secrets.key = new_key_text("other").unwrap();
    wrong_key.webhooks.paused_recheck = Duration::from_millis(100);
    let blind = Herald::start(wrong_key, Roles::workers([WorkerKind::Webhooks].into())).await;

    let id = fan_out.accept("1", "echo", json!({})).await;
    // Not dropped as "endpoint removed": kept as a schedule, no attempt made.
    wait_for_scheduled_delivery(&nats, "1", "default_hooks", &id).await;
    let (_, task) = fan_out.get_task("1", &id).await;
    assert_eq!(task["state"], "delivering", "{task}");
    assert_eq!(task["attempts"], json!([]), "{task}");
    blind.stop().await;

    let fixed = Herald::start(
        test_config(&nats, None),
        Roles::workers([WorkerKind::Webhooks].into()),
    )
    .await;
    let task = fan_out.wait_for_state("1", &id, "delivered").await;
    assert_eq!(task["attempts"].as_array().unwrap().len(), 1, "{task}");
    assert_eq!(receiver.received().len(), 1);
    fixed.stop().await;
    fan_out.stop().await;
}

#[tokio::test]
async fn a_task_worker_that_cannot_read_an_endpoint_does_not_fan_out_without_it() {
    let nats = NatsServer::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    add_endpoint(&nats, "1", "hooks", &receiver.url("/"), None).await;
    let mut wrong_key = test_config(&nats, None);
    wrong_key.secrets.key = new_key_text("other").unwrap();
    let herald = Herald::start(
        wrong_key,
        Roles {
            api: true,
            workers: [WorkerKind::Tasks].into(),
        },
    )
    .await;

    let id = herald.accept("1", "echo", json!({})).await;
    // The task worker has taken the task and handed it back...
    let broker = broker(&nats).await;
    wait_until("the task worker to hand the task back", DEADLINE, || {
        let jetstream = broker.jetstream_for_tests().clone();
        async move {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = jetstream
                .get_consumer_from_stream(names::TASKS_CONSUMER, names::TASKS_STREAM)
                .await
                .ok()?;
            let info = consumer.info().await.ok()?;
            (info.delivered.consumer_sequence >= 1 && info.num_ack_pending == 1).then_some(())
        }
    })
    .await;
    // ...instead of fanning out to no endpoint: it is still queued.
    let (_, task) = herald.get_task("1", &id).await;
    assert_eq!(task["state"], "queued", "{task}");
    herald.stop().await;
}
