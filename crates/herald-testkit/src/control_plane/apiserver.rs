//! kube-apiserver for the control plane, with envtest's flags, RBAC
//! authorization and client-certificate users.

use std::{net::Ipv4Addr, path::Path, time::Instant};

use super::{
    DEFAULT_NAMESPACE, NodeNetwork, SLACK, STARTUP, assert_in_time,
    certificates::{CertifiedKey, Pki},
    etcd::Etcd,
    port_taken,
};
use crate::{free_port, process::ChildProcess, wait_until};

/// A running kube-apiserver, and the admin identity that checked on it.
pub(super) struct ApiServer {
    pub(super) process: ChildProcess,
    pub(super) port: u16,
    /// User `admin` in group `system:masters`.
    pub(super) admin: CertifiedKey,
}

/// kube-apiserver's flags, envtest's: etcd at `etcd_url`, the files
/// [`write_pki`](super::certificates::write_pki) wrote in `certs`, HTTPS on
/// 127.0.0.1:`port`. Its serving pair is found in `--cert-dir` by name
/// (apiserver.crt/.key). There is no `--advertise-address`: loopback is
/// refused, so it derives one from the default route.
///
/// For a [`Cluster`](crate::Cluster) (`node` is `Some`) it is a real
/// cluster's API server instead: on the node's address, which pods reach
/// through the `kubernetes` Service; the Node authorizer beside RBAC, so
/// kubelets may register; the ServiceAccount admission plugin, since the
/// controller-manager makes the accounts and their tokens; and a client
/// certificate for calling kubelets (logs, exec).
fn flags(etcd_url: &str, certs: &Path, port: u16, node: Option<&NodeNetwork>) -> Vec<String> {
    let host = node.map_or(Ipv4Addr::LOCALHOST, |node| node.address);
    let mut flags = vec![
        format!("--etcd-servers={etcd_url}"),
        format!("--cert-dir={}", certs.display()),
        format!("--secure-port={port}"),
        format!("--bind-address={host}"),
        "--allow-privileged=true".to_string(),
        format!("--service-account-issuer=https://{host}:{port}/"),
        format!(
            "--service-account-key-file={}",
            certs.join("sa-signer.crt").display()
        ),
        format!(
            "--service-account-signing-key-file={}",
            certs.join("sa-signer.key").display()
        ),
        format!(
            "--client-ca-file={}",
            certs.join("client-cert-auth-ca.crt").display()
        ),
    ];
    match node {
        None => flags.extend([
            "--service-cluster-ip-range=10.0.0.0/24".to_string(),
            // No controller-manager creates default ServiceAccounts, so this
            // plugin would refuse every pod.
            "--disable-admission-plugins=ServiceAccount".to_string(),
            "--authorization-mode=RBAC".to_string(),
        ]),
        Some(node) => flags.extend([
            format!("--advertise-address={}", node.address),
            format!("--service-cluster-ip-range={}", node.service_cidr),
            "--enable-admission-plugins=NodeRestriction".to_string(),
            "--authorization-mode=Node,RBAC".to_string(),
            format!(
                "--kubelet-client-certificate={}",
                certs.join("kubelet-client.crt").display()
            ),
            format!(
                "--kubelet-client-key={}",
                certs.join("kubelet-client.key").display()
            ),
            "--kubelet-preferred-address-types=InternalIP".to_string(),
        ]),
    }
    flags
}

/// Starts kube-apiserver from `binary` against `etcd`, its log in `dir`
/// and its certificates in `certs` (written by
/// [`write_pki`](super::certificates::write_pki)); returns once `/healthz`
/// answers and namespace `default` exists. `Err` only for a lost port race;
/// every other failure panics with the server's log.
pub(super) async fn start(
    binary: &Path,
    dir: &Path,
    certs: &Path,
    etcd: &mut Etcd,
    pki: &Pki,
    node: Option<&NodeNetwork>,
) -> Result<ApiServer, String> {
    let port = free_port();
    let apiserver_args = flags(&etcd.url, certs, port, node);
    let apiserver_log = dir.join("kube-apiserver.log");
    let mut apiserver = ChildProcess::spawn(
        "kube-apiserver",
        binary,
        &apiserver_args,
        apiserver_log.clone(),
    );
    let host = node.map_or(Ipv4Addr::LOCALHOST, |node| node.address);
    let server_url = format!("https://{host}:{port}");

    // Only a server presenting our serving certificate counts: that is how a
    // port race with another test's API server shows.
    let trusting = |identity: Option<&CertifiedKey>| {
        let mut builder =
            reqwest::Client::builder().tls_certs_only([reqwest::Certificate::from_pem(
                pki.serving_ca.certificate_pem.as_bytes(),
            )
            .expect("the serving CA is valid PEM")]);
        if let Some(identity) = identity {
            let pem = format!("{}{}", identity.certificate_pem, identity.key_pem);
            builder = builder.identity(
                reqwest::Identity::from_pem(pem.as_bytes()).expect("the identity is valid PEM"),
            );
        }
        builder
            .build()
            .expect("cannot build an HTTPS client for the API server")
    };
    let probe = trusting(None);
    let healthz = format!("{server_url}/healthz");
    let give_up = Instant::now() + STARTUP;
    wait_until("kube-apiserver to become healthy", STARTUP + SLACK, || {
        let port_taken = port_taken(&apiserver_log);
        if port_taken.is_none() {
            etcd.process.assert_running();
            apiserver.assert_running();
            assert_in_time(&apiserver, "kube-apiserver", give_up, "answer /healthz");
        }
        let request = probe.get(&healthz).send();
        async move {
            if let Some(taken) = port_taken {
                return Some(Err(format!("kube-apiserver: {taken}")));
            }
            request.await.ok()?.status().is_success().then_some(Ok(()))
        }
    })
    .await?;

    let admin = pki
        .client_ca
        .client_certificate("admin", &["system:masters"]);
    let as_admin = trusting(Some(&admin));
    let default_namespace = format!("{server_url}/api/v1/namespaces/default");
    let give_up = Instant::now() + DEFAULT_NAMESPACE;
    wait_until(
        "namespace default to exist",
        DEFAULT_NAMESPACE + SLACK,
        || {
            apiserver.assert_running();
            assert_in_time(
                &apiserver,
                "kube-apiserver",
                give_up,
                "create namespace default",
            );
            let request = as_admin.get(&default_namespace).send();
            async move { request.await.ok()?.status().is_success().then_some(()) }
        },
    )
    .await;

    Ok(ApiServer {
        process: apiserver,
        port,
        admin,
    })
}
