//! What records, mails and logs show: endpoint URLs redacted (their
//! secrets stay in the sealed endpoint record), internal answers not kept.

use herald::roles::Roles;
use herald_testkit::{Mailpit, NatsServer, ReceiverBehaviour, TestReceiver};
use serde_json::{Value, json};

use crate::harness::{DEADLINE, Herald, add_endpoint, test_config, worker_command};

#[tokio::test]
async fn url_secrets_reach_no_attempt_mail_or_worker_log() {
    let nats = NatsServer::start().await;
    let mail = Mailpit::start().await;
    let receiver = TestReceiver::start(ReceiverBehaviour::Status(500)).await;
    let owner = "owner60@example.com";
    // (Credentials in the URL itself are refused by the endpoint spec.)
    let urls = [
        ("query", receiver.url("/hooks?token=SECRET-query")),
        ("slack", receiver.url("/services/T000/B000/SECRET-path")),
    ];
    for (name, url) in &urls {
        add_endpoint(&nats, "60", name, url, Some(owner)).await;
    }
    // Every worker in one child process, whose log is read below; the
    // API in this one.
    let herald = Herald::start(test_config(&nats, Some(&mail)), Roles::api_only()).await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let smtp_port = mail.smtp_port().to_string();
    let mut worker = worker_command(
        &nats,
        "tasks,webhooks,mail",
        &[
            ("HERALD_WEBHOOKS__RETRY_SCHEDULE", r#"["10ms", "20ms"]"#),
            ("HERALD_MAIL__SMTP_PORT", &smtp_port),
            (
                "HERALD_LOG__FILTER",
                "info,herald=debug,herald_worker=debug,herald_queue=debug",
            ),
        ],
    )
    .stderr(log.reopen().unwrap())
    .spawn()
    .expect("start herald worker");

    let id = herald.accept("60", "echo", json!({})).await;
    let task = herald.wait_for_state("60", &id, "mailed").await;
    let mails = mail.wait_for_messages(owner, 2, DEADLINE).await;
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();

    // The real URLs were used.
    let paths: Vec<String> = receiver.received().into_iter().map(|w| w.path).collect();
    assert!(paths.contains(&"/services/T000/B000/SECRET-path".to_string()));
    let attempts = task["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 6, "{task}");
    let shown = format!("{}/…#", receiver.url(""));
    for attempt in attempts {
        let url = attempt["url"].as_str().unwrap();
        assert!(url.starts_with(&shown), "{url}");
    }
    assert!(
        !task.to_string().contains("SECRET"),
        "GET shows a secret: {task}"
    );
    for mail in &mails {
        assert!(mail.subject.contains(&shown), "{}", mail.subject);
        assert!(!mail.subject.contains("SECRET"), "{}", mail.subject);
        assert!(!mail.text.contains("SECRET"), "{}", mail.text);
    }
    let log = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        log.contains("failure mail sent"),
        "the log was not captured: {log}"
    );
    assert!(
        !log.contains("SECRET"),
        "the worker logged a secret:\n{log}"
    );
    herald.stop().await;
}

/// The attempts of the task's only endpoint.
fn only_attempt(task: &Value) -> &Value {
    let attempts = task["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{task}");
    &attempts[0]
}

#[tokio::test]
async fn an_allow_listed_receivers_answer_is_kept_only_when_configured() {
    let nats = NatsServer::start().await;
    let answer = "internal service: db at 10.1.2.3, build 42";
    let receiver = TestReceiver::start(ReceiverBehaviour::Answer {
        status: 200,
        body: answer.into(),
    })
    .await;
    add_endpoint(&nats, "61", "hooks", &receiver.url("/hooks"), None).await;
    // Loopback is reachable only through the allow-list.
    let config = test_config(&nats, None);
    let herald = Herald::start(config.clone(), Roles::all()).await;
    let id = herald.accept("61", "echo", json!({})).await;
    let task = herald.wait_for_state("61", &id, "delivered").await;
    let attempt = only_attempt(&task);
    assert_eq!(attempt["status"], 200, "{task}");
    assert!(attempt["response_body"].is_null(), "{task}");
    herald.stop().await;

    let mut config = config;
    config.webhooks.ssrf.allowed_response_body_bytes = 16;
    let herald = Herald::start(config, Roles::all()).await;
    let id = herald.accept("61", "echo", json!({})).await;
    let task = herald.wait_for_state("61", &id, "delivered").await;
    assert_eq!(
        only_attempt(&task)["response_body"],
        &answer[..16],
        "{task}"
    );
    herald.stop().await;
}
