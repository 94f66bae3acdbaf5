//! kube-apiserver for the control plane, with envtest's flags, RBAC
//! authorization and client-certificate users.

use std::{path::Path, time::Instant};

use super::{
    DEFAULT_NAMESPACE, SLACK, STARTUP, assert_in_time,
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
fn flags(etcd_url: &str, certs: &Path, port: u16) -> Vec<String> {
    vec![
        format!("--etcd-servers={etcd_url}"),
        format!("--cert-dir={}", certs.display()),
        format!("--secure-port={port}"),
        "--bind-address=127.0.0.1".to_string(),
        "--service-cluster-ip-range=10.0.0.0/24".to_string(),
        "--allow-privileged=true".to_string(),
        // No controller-manager creates default ServiceAccounts, so this
        // plugin would refuse every pod.
        "--disable-admission-plugins=ServiceAccount".to_string(),
        "--authorization-mode=RBAC".to_string(),
        format!("--service-account-issuer=https://127.0.0.1:{port}/"),
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
    ]
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
) -> Result<ApiServer, String> {
    let port = free_port();
    let apiserver_args = flags(&etcd.url, certs, port);
    let apiserver_log = dir.join("kube-apiserver.log");
    let mut apiserver = ChildProcess::spawn(
        "kube-apiserver",
        binary,
        &apiserver_args,
        apiserver_log.clone(),
    );
    let server_url = format!("https://127.0.0.1:{port}");

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
