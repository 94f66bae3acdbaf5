//! `herald dev` as a user runs it: its own nats-server, endpoints from a
//! YAML file, every role in one process, a clean exit on SIGTERM.

use std::process::Stdio;

use herald_testkit::{
    ReceiverBehaviour, TestReceiver, free_port, http_client, tool, verify_with_standardwebhooks,
    wait_until,
};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;

use crate::harness::DEADLINE;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test]
async fn herald_dev_runs_everything_from_an_endpoints_file() {
    let receiver = TestReceiver::start(ReceiverBehaviour::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let endpoints = dir.path().join("endpoints.yaml");
    std::fs::write(
        &endpoints,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: signing}}\n\
             stringData: {{secret: {SECRET}}}\n---\n\
             apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\n\
             metadata: {{name: laptop}}\n\
             spec: {{userId: '1', url: '{}', secretRef: {{name: signing, key: secret}}}}\n",
            receiver.url("/in")
        ),
    )
    .unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    let mut dev = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("dev")
        .arg("--endpoints")
        .arg(&endpoints)
        .args(["--nats-port", &free_port().to_string(), "--listen", &api])
        .arg("--store-dir")
        .arg(dir.path().join("store"))
        .env("HERALD_NATS_SERVER", tool("nats-server"))
        .env("HERALD_LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald dev");

    let http = http_client();
    let id = wait_until("herald dev to accept a task", DEADLINE, || async {
        let response = http
            .post(format!("http://{api}/users/1/tasks/echo"))
            .json(&serde_json::json!({ "from": "dev" }))
            .send()
            .await
            .ok()?;
        if response.status() != 201 {
            return None;
        }
        let body: Value = response.json().await.ok()?;
        body["id"].as_str().map(String::from)
    })
    .await;
    let webhook = receiver.wait_for(1, DEADLINE).await.remove(0);
    assert_eq!(
        webhook.headers["webhook-id"],
        format!("{id}.default_laptop")
    );
    verify_with_standardwebhooks(SECRET, &webhook).expect("signed with the file's secret");

    kill(
        Pid::from_raw(dev.id().expect("running") as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let status = tokio::time::timeout(DEADLINE, dev.wait())
        .await
        .expect("herald dev did not stop on SIGTERM")
        .unwrap();
    assert!(status.success(), "herald dev exited with {status}");
    // Its nats-server child went with it.
    assert!(
        std::fs::read_to_string(dir.path().join("store/nats-server.log"))
            .unwrap()
            .contains("Server Exiting"),
        "nats-server was not shut down"
    );
}
