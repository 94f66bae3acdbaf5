//! kube-controller-manager and kube-scheduler, each with the identity the
//! bootstrap RBAC policy already grants (`system:kube-controller-manager`,
//! `system:kube-scheduler`). One of each, so no leader election; no
//! serving port (nothing probes them: the cluster waits on what they do).

use std::path::Path;

use super::network::POD_CIDR;
use crate::{ControlPlane, process::ChildProcess};

/// Every default controller, each with its own ServiceAccount
/// (`--use-service-account-credentials`), as kubeadm runs them; tokens
/// signed with the API server's service-account key, and the serving CA
/// published as `kube-root-ca.crt` in every namespace, so in-cluster
/// clients (Herald's operator) trust the API server.
pub(super) fn start_controller_manager(
    binary: &Path,
    dir: &Path,
    control_plane: &ControlPlane,
) -> ChildProcess {
    let kubeconfig = control_plane.kubeconfig_for("system:kube-controller-manager", &[]);
    let certs = control_plane.certs_dir();
    let args = [
        format!("--kubeconfig={}", kubeconfig.display()),
        "--leader-elect=false".to_string(),
        "--use-service-account-credentials=true".to_string(),
        format!(
            "--service-account-private-key-file={}",
            certs.join("sa-signer.key").display()
        ),
        format!("--root-ca-file={}", certs.join("serving-ca.crt").display()),
        format!("--cluster-cidr={POD_CIDR}"),
        "--secure-port=0".to_string(),
        "--v=1".to_string(),
    ];
    ChildProcess::spawn(
        "kube-controller-manager",
        binary,
        &args,
        dir.join("kube-controller-manager.log"),
    )
}

pub(super) fn start_scheduler(
    binary: &Path,
    dir: &Path,
    control_plane: &ControlPlane,
) -> ChildProcess {
    let kubeconfig = control_plane.kubeconfig_for("system:kube-scheduler", &[]);
    let args = [
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--authentication-kubeconfig={}", kubeconfig.display()),
        format!("--authorization-kubeconfig={}", kubeconfig.display()),
        "--leader-elect=false".to_string(),
        "--secure-port=0".to_string(),
        "--v=1".to_string(),
    ];
    ChildProcess::spawn(
        "kube-scheduler",
        binary,
        &args,
        dir.join("kube-scheduler.log"),
    )
}
