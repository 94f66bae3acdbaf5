//! CoreDNS as a process on the node, serving the cluster's zone and nothing
//! else: it answers for Services and pods from the API server, refuses
//! every other name and forwards nothing, so no lookup in the cluster ever
//! reaches the host's resolver.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use tokio::net::UdpSocket;

use super::network::NODE_ADDRESS;
use crate::{ControlPlane, free_port, http_client, process::ChildProcess, wait_until};

const READY: Duration = Duration::from_secs(60);
/// `wait_until`'s own deadline is this much later than ours, which panics
/// with CoreDNS's log.
const SLACK: Duration = Duration::from_secs(5);

/// Starts CoreDNS on the node's address, port 53 (where the kubelet points
/// every pod); returns once it has read the API server and answers for
/// `kubernetes.default.svc.cluster.local`.
pub(super) async fn start(binary: &Path, dir: &Path, control_plane: &ControlPlane) -> ChildProcess {
    let ready_port = free_port();
    let corefile = dir.join("Corefile");
    std::fs::write(
        &corefile,
        corefile_text(control_plane.kubeconfig_path(), ready_port),
    )
    .expect("cannot write the Corefile");
    let args = [
        "-conf".to_string(),
        corefile.display().to_string(),
        "-dns.port=53".to_string(),
    ];
    let mut coredns = ChildProcess::spawn("coredns", binary, &args, dir.join("coredns.log"));
    let http = http_client();
    let ready = format!("http://127.0.0.1:{ready_port}/ready");
    wait_until("CoreDNS to be ready", READY, || {
        coredns.assert_running();
        let request = http.get(&ready).send();
        async move { request.await.ok()?.status().is_success().then_some(()) }
    })
    .await;
    let give_up = Instant::now() + READY;
    wait_until(
        "CoreDNS to answer for the kubernetes Service",
        READY + SLACK,
        || {
            coredns.assert_running();
            assert!(
                Instant::now() < give_up,
                "CoreDNS did not answer for the kubernetes Service in {READY:?}; its log ends:\n{}",
                coredns.log_tail()
            );
            async {
                let addresses = query_a("kubernetes.default.svc.cluster.local").await?;
                (!addresses.is_empty()).then_some(())
            }
        },
    )
    .await;
    coredns
}

/// The Corefile: the cluster zone and the reverse zones of the pod and
/// service ranges, from the API server as the admin user; no `forward`.
fn corefile_text(kubeconfig: &Path, ready_port: u16) -> String {
    format!(
        r#"cluster.local:53 0.77.10.in-addr.arpa:53 1.77.10.in-addr.arpa:53 {{
    bind {NODE_ADDRESS}
    errors
    ready 127.0.0.1:{ready_port}
    kubernetes cluster.local 0.77.10.in-addr.arpa 1.77.10.in-addr.arpa {{
        kubeconfig {} herald-test
        pods insecure
    }}
    log
}}
"#,
        kubeconfig.display()
    )
}

/// Asks the cluster's DNS for the A records of `name`: `None` when it does
/// not answer in a second or answers with an error.
pub(crate) async fn query_a(name: &str) -> Option<Vec<Ipv4Addr>> {
    let socket = UdpSocket::bind("0.0.0.0:0").await.ok()?;
    socket
        .connect(SocketAddr::from((NODE_ADDRESS, 53)))
        .await
        .ok()?;
    let id: u16 = 0x4852;
    // Header: id, flags (recursion desired), one question.
    let mut query = Vec::new();
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        query.push(u8::try_from(label.len()).ok()?);
        query.extend_from_slice(label.as_bytes());
    }
    // Root, type A, class IN.
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    socket.send(&query).await.ok()?;
    let mut reply = [0u8; 1500];
    let length = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut reply))
        .await
        .ok()?
        .ok()?;
    parse_a_records(&reply[..length], id, query.len())
}

/// The A records in `reply` to our query (`id`, whose question ends at
/// `question_end`); `None` for another id, an error code or a malformed
/// reply.
fn parse_a_records(reply: &[u8], id: u16, question_end: usize) -> Option<Vec<Ipv4Addr>> {
    if reply.len() < question_end || reply[..2] != id.to_be_bytes() || reply[3] & 0x0f != 0 {
        return None;
    }
    let answers = u16::from_be_bytes([reply[6], reply[7]]);
    let mut at = question_end;
    let mut addresses = Vec::new();
    for _ in 0..answers {
        at = skip_name(reply, at)?;
        let kind = u16::from_be_bytes([*reply.get(at)?, *reply.get(at + 1)?]);
        let data_length = usize::from(u16::from_be_bytes([
            *reply.get(at + 8)?,
            *reply.get(at + 9)?,
        ]));
        at += 10;
        let data = reply.get(at..at + data_length)?;
        if kind == 1 && data_length == 4 {
            addresses.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += data_length;
    }
    Some(addresses)
}

/// Where the (possibly compressed) domain name at `at` ends.
fn skip_name(message: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let length = *message.get(at)?;
        match length {
            0 => return Some(at + 1),
            // A pointer ends the name.
            _ if length & 0xc0 == 0xc0 => return Some(at + 2),
            _ => at += 1 + usize::from(length),
        }
    }
}
