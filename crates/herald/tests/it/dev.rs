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

/// `herald dev` with an endpoints file of its own in `dir`, on free ports:
/// the command, the API's address and nats-server's port.
fn dev_command(dir: &std::path::Path) -> (tokio::process::Command, String, u16) {
    let endpoints = dir.join("endpoints.yaml");
    std::fs::write(
        &endpoints,
        "apiVersion: herald.dev/v1alpha1\nkind: WebhookEndpoint\n\
         metadata: {name: laptop}\nspec: {userId: '1', url: 'http://127.0.0.1:9/unused'}\n",
    )
    .unwrap();
    let (api, nats_port) = (format!("127.0.0.1:{}", free_port()), free_port());
    let mut dev = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    dev.arg("dev")
        .arg("--endpoints")
        .arg(&endpoints)
        .args(["--nats-port", &nats_port.to_string(), "--listen", &api])
        .arg("--store-dir")
        .arg(dir.join("store"))
        .env("HERALD_NATS_SERVER", tool("nats-server"))
        .env("HERALD_LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    (dev, api, nats_port)
}

/// Starts `herald dev` and waits until it is ready; returns it, its
/// nats-server child (killed if the test fails before it is gone) and the
/// port that child holds.
async fn start_dev(dir: &std::path::Path) -> (tokio::process::Child, NatsChild, u16) {
    // A free port can be handed to someone else (any outgoing connection's
    // local port) before herald dev binds it: a herald dev that exits at
    // start is started again on new ports.
    for _ in 0..3 {
        let (mut command, api, nats_port) = dev_command(dir);
        let mut dev = command.spawn().expect("start herald dev");
        let http = http_client();
        let (http, api) = (&http, api.as_str());
        let ready = wait_until("herald dev to be ready or to exit", DEADLINE, || {
            let exited = dev.try_wait().expect("herald dev's status").is_some();
            async move {
                if exited {
                    return Some(false);
                }
                let response = http.get(format!("http://{api}/readyz")).send().await.ok()?;
                (response.status() == 200).then_some(true)
            }
        })
        .await;
        if ready {
            return started_dev(dev, nats_port);
        }
    }
    panic!("herald dev exited at start three times (see its errors above)");
}

/// The checks on a `herald dev` that answered ready.
fn started_dev(
    dev: tokio::process::Child,
    nats_port: u16,
) -> (tokio::process::Child, NatsChild, u16) {
    let parent = dev.id().expect("running");
    let children = children_of(parent);
    assert_eq!(children.len(), 1, "herald dev has one child: {children:?}");
    let nats = NatsChild(children[0]);
    assert!(
        std::fs::read_to_string(format!("/proc/{}/cmdline", nats.0))
            .unwrap()
            .contains("nats-server"),
        "the child of herald dev is its nats-server"
    );
    assert!(!port_is_free(nats_port), "nats-server holds its port");
    (dev, nats, nats_port)
}

/// The terminal running `make dev` closes: `herald dev` gets SIGHUP, stops
/// as on SIGTERM and takes its nats-server with it, so the next `make dev`
/// finds the port free.
#[tokio::test]
async fn herald_dev_stops_cleanly_on_sighup_and_its_nats_server_goes_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, nats, nats_port) = start_dev(dir.path()).await;

    kill(
        Pid::from_raw(dev.id().expect("running") as i32),
        Signal::SIGHUP,
    )
    .unwrap();
    let status = tokio::time::timeout(DEADLINE, dev.wait())
        .await
        .expect("herald dev did not stop on SIGHUP")
        .unwrap();
    assert!(status.success(), "herald dev exited with {status}");
    assert!(!nats.is_running(), "nats-server outlived herald dev");
    assert!(port_is_free(nats_port), "port {nats_port} is still taken");
}

/// `herald dev` killed outright (SIGKILL: no chance to stop its child): the
/// nats-server child dies with it all the same (parent-death signal) and
/// frees the port.
#[tokio::test]
async fn a_killed_herald_dev_takes_its_nats_server_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut dev, nats, nats_port) = start_dev(dir.path()).await;

    dev.start_kill().unwrap();
    dev.wait().await.unwrap();
    wait_until("nats-server to die with herald dev", DEADLINE, || async {
        (!nats.is_running() && port_is_free(nats_port)).then_some(())
    })
    .await;
}

/// `herald child-of` whose parent is not the one named (it died before the
/// parent-death signal was set, and the child was handed to another
/// process): the program never starts, and it says why.
#[tokio::test]
async fn child_of_a_parent_that_is_gone_does_not_start_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["child-of", "1", "--", "/usr/bin/touch"])
        .arg(&marker)
        .output();
    let output = tokio::time::timeout(DEADLINE, output)
        .await
        .expect("herald child-of did not exit")
        .unwrap();
    assert!(!output.status.success(), "exited with {}", output.status);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("parent 1 is gone"), "{stderr}");
    assert!(!marker.exists(), "the program ran");
}

/// A process started by the test's `herald dev`: SIGKILLed on drop, so a
/// failed test leaves no nats-server behind.
struct NatsChild(i32);

impl NatsChild {
    /// Alive and not a zombie (a killed orphan may wait a while for a
    /// reaper that is not there; it holds nothing any more).
    fn is_running(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.0))
            .ok()
            .and_then(|stat| process_state(&stat))
            .is_some_and(|state| state != 'Z' && state != 'X')
    }
}

impl Drop for NatsChild {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = kill(Pid::from_raw(self.0), Signal::SIGKILL);
        }
    }
}

/// The processes whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_pid(&stat))
                == Some(parent)
        })
        .collect()
}

/// The state letter of a /proc/<pid>/stat line (after `(comm)`, which may
/// hold spaces and parentheses).
fn process_state(stat: &str) -> Option<char> {
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// The parent pid of a /proc/<pid>/stat line.
fn parent_pid(stat: &str) -> Option<u32> {
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether nothing listens on the loopback port.
fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}
