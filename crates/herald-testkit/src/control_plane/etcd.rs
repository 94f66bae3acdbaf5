//! etcd for the control plane: one member, plain HTTP on loopback, as
//! envtest runs it.

use std::{path::Path, time::Instant};

use super::{SLACK, STARTUP, assert_in_time, port_taken, unique_number};
use crate::{free_port, process::ChildProcess, wait_until};

/// A running etcd and the URL its clients use.
pub(super) struct Etcd {
    pub(super) process: ChildProcess,
    /// `http://127.0.0.1:<port>`.
    pub(super) url: String,
}

/// Starts etcd from `binary` with its data and log in `dir`; returns once it
/// answers as the member it was started as. `Err` only for a lost port
/// race; every other failure panics with its log.
pub(super) async fn start(binary: &Path, dir: &Path) -> Result<Etcd, String> {
    let http = crate::http_client();
    // A unique member name
    // lets the readiness probe tell our etcd from another test's that won a
    // port race.
    let etcd_port = free_port();
    let peer_port = free_port();
    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let name = format!(
        "herald-test-{}-{}",
        std::process::id(),
        unique_number() % 1_000_000_000
    );
    let etcd_args = [
        format!("--name={name}"),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster={name}={peer_url}"),
        // Nothing here needs to survive a power cut.
        "--unsafe-no-fsync=true".to_string(),
    ];
    let etcd_log = dir.join("etcd.log");
    let mut etcd = ChildProcess::spawn("etcd", binary, &etcd_args, etcd_log.clone());
    let members = format!("{etcd_url}/v3/cluster/member/list");
    let give_up = Instant::now() + STARTUP;
    wait_until("etcd to become ready", STARTUP + SLACK, || {
        let port_taken = port_taken(&etcd_log);
        if port_taken.is_none() {
            etcd.assert_running();
            assert_in_time(&etcd, "etcd", give_up, "become ready");
        }
        let request = http.post(&members).body("{}").send();
        let name = name.clone();
        async move {
            if let Some(taken) = port_taken {
                return Some(Err(format!("etcd: {taken}")));
            }
            let response = request.await.ok()?;
            if !response.status().is_success() {
                return None;
            }
            let members = response.text().await.ok()?;
            members
                .contains(&format!("\"name\":\"{name}\""))
                .then_some(Ok(()))
        }
    })
    .await?;

    Ok(Etcd {
        process: etcd,
        url: etcd_url,
    })
}
