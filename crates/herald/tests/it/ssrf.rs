//! The SSRF guard in the running system: refusals are failed attempts with
//! their reason in the API, and the allow-list opens exactly what it names.
//! Receivers are on loopback, the one non-global range tests may use; the
//! full table of ranges is tested in herald-worker's `ssrf` module.

use herald::roles::Roles;
use herald_testkit::{Mailpit, NatsServer, ReceiverBehaviour, TestReceiver};
use serde_json::{Value, json};

use crate::harness::{DEADLINE, Herald, add_endpoint, test_config};

/// The attempts for the endpoint `add_endpoint` named `name`.
fn attempts_of<'a>(task: &'a Value, name: &str) -> Vec<&'a Value> {
    let endpoint = format!("default_{name}");
    task["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["endpoint"] == endpoint.as_str())
        .collect()
}

#[tokio::test]
async fn by_default_loopback_is_refused_on_the_normal_failure_path() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let literal = receiver.url("/literal");
    // A name the system resolver answers with loopback.
    let named = literal.replace("127.0.0.1", "localhost");
    add_endpoint(
        &nats,
        "30",
        "literal",
        &literal,
        Some("owner30@example.com"),
    )
    .await;
    add_endpoint(&nats, "31", "named", &named, None).await;
    let mut config = test_config(&nats, Some(&mail));
    // Herald's default: the allow-list opens nothing.
    config.webhooks.ssrf = Default::default();
    let herald = Herald::start(config, Roles::all()).await;

    let id = herald.accept("30", "echo", json!({})).await;
    let task = herald.wait_for_state("30", &id, "mailed").await;
    let attempts = attempts_of(&task, "literal");
    assert_eq!(
        attempts
            .iter()
            .map(|a| a["outcome"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["retrying", "retrying", "retrying", "exhausted"],
        "{task}"
    );
    for attempt in &attempts {
        // By default the range, not the address it resolved to.
        assert_eq!(
            attempt["error"], "refused by the SSRF guard: the address is in 127.0.0.0/8 (loopback)",
            "{task}"
        );
        assert!(attempt["status"].is_null(), "{task}");
    }
    // Counted by range (the roles run in this process; other tests may
    // have counted loopback refusals too).
    let refusals = herald_core::metrics::render()
        .lines()
        .find_map(|line| line.strip_prefix(r#"herald_ssrf_refusals_total{range="loopback"} "#))
        .and_then(|count| count.parse::<u64>().ok());
    assert!(refusals.is_some_and(|n| n >= 4), "{refusals:?}");
    let mails = mail
        .wait_for_messages("owner30@example.com", 1, DEADLINE)
        .await;
    assert!(
        mails[0].text.contains("refused by the SSRF guard"),
        "{}",
        mails[0].text
    );

    let id = herald.accept("31", "echo", json!({})).await;
    let task = herald.wait_for_state("31", &id, "undelivered").await;
    let attempts = attempts_of(&task, "named");
    assert_eq!(attempts.len(), 4, "{task}");
    for attempt in &attempts {
        // localhost may answer ::1 as well as (or before) 127.0.0.1.
        let error = attempt["error"].as_str().unwrap();
        assert!(
            error.starts_with("refused by the SSRF guard: the address is in ")
                && error.ends_with("(loopback)"),
            "{task}"
        );
        assert!(
            !error.contains("127.0.0.1 ") && !error.contains("::1 "),
            "the resolved address is named: {error}"
        );
    }
    assert!(receiver.received().is_empty(), "a refused webhook arrived");
    herald.stop().await;
}

#[tokio::test]
async fn the_allow_list_opens_exactly_its_range_and_redirects_stay_unfollowed() {
    let nats = NatsServer::start().await;
    let open = TestReceiver::start_at("127.0.0.2:0", ReceiverBehaviour::Ok).await;
    let closed = TestReceiver::start_at("127.0.0.1:0", ReceiverBehaviour::Ok).await;
    // On an open address, pointing at a closed one.
    let redirecting = TestReceiver::start_at(
        "127.0.0.2:0",
        ReceiverBehaviour::RedirectTo(closed.url("/landed")),
    )
    .await;
    add_endpoint(&nats, "32", "open", &open.url("/hooks"), None).await;
    add_endpoint(&nats, "32", "closed", &closed.url("/hooks"), None).await;
    add_endpoint(&nats, "33", "redirecting", &redirecting.url("/hooks"), None).await;
    let mut config = test_config(&nats, None);
    config.webhooks.ssrf.allow = vec!["127.0.0.2/32".parse().unwrap()];
    // Configured to name the refused address.
    config.webhooks.ssrf.reveal_refused_address = true;
    let herald = Herald::start(config, Roles::all()).await;

    let id = herald.accept("32", "echo", json!({})).await;
    open.wait_for(1, DEADLINE).await;
    let task = herald.wait_for_state("32", &id, "undelivered").await;
    let delivered = attempts_of(&task, "open");
    assert_eq!(delivered.len(), 1, "{task}");
    assert_eq!(delivered[0]["outcome"], "delivered", "{task}");
    let refused = attempts_of(&task, "closed");
    assert_eq!(refused.len(), 4, "{task}");
    assert!(
        refused
            .iter()
            .all(|a| a["error"]
                == "refused by the SSRF guard: 127.0.0.1 is in 127.0.0.0/8 (loopback)"),
        "{task}"
    );

    let id = herald.accept("33", "echo", json!({})).await;
    let task = herald.wait_for_state("33", &id, "undelivered").await;
    let attempts = attempts_of(&task, "redirecting");
    assert_eq!(attempts.len(), 4, "{task}");
    assert!(attempts.iter().all(|a| a["status"] == 307), "{task}");
    assert_eq!(redirecting.received().len(), 4);
    assert!(closed.received().is_empty(), "a closed address was reached");
    assert_eq!(open.received().len(), 1);
    herald.stop().await;
}
