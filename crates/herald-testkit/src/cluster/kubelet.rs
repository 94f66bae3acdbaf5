//! The kubelet: registered as node [`NODE_NAME`] with a client certificate
//! the control plane's CA signed, its state under the test's directory, its
//! pods' DNS the cluster's CoreDNS on the node's address.

use std::path::{Path, PathBuf};

use super::network::NODE_ADDRESS;
use crate::{ControlPlane, free_port, process::ChildProcess};

/// The node's name (and the kubelet's and kube-proxy's hostname override).
pub const NODE_NAME: &str = "herald-test-node";

/// Starts the kubelet in `dir` against `containerd_endpoint`. It is up when
/// its node is Ready, which the caller waits for.
pub(super) fn start(
    binary: &Path,
    dir: &Path,
    control_plane: &ControlPlane,
    containerd_endpoint: &str,
) -> ChildProcess {
    std::fs::create_dir_all(dir).expect("cannot create the kubelet's directory");
    let kubeconfig =
        control_plane.kubeconfig_for(&format!("system:node:{NODE_NAME}"), &["system:nodes"]);
    // Pods resolve only through the cluster's DNS: no search domains or
    // servers of the host's.
    let resolv_conf = dir.join("resolv.conf");
    std::fs::write(&resolv_conf, "").expect("cannot write the kubelet's resolv.conf");
    let config = dir.join("kubelet.json");
    std::fs::write(
        &config,
        configuration(
            dir,
            &control_plane.certs_dir(),
            containerd_endpoint,
            &resolv_conf,
        )
        .to_string(),
    )
    .expect("cannot write the kubelet's configuration");
    let args = [
        format!("--config={}", config.display()),
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--root-dir={}", dir.join("root").display()),
        format!("--cert-dir={}", dir.join("pki").display()),
        format!("--hostname-override={NODE_NAME}"),
        format!("--node-ip={NODE_ADDRESS}"),
        "--v=1".to_string(),
    ];
    ChildProcess::spawn("kubelet", binary, &args, dir.join("kubelet.log"))
}

/// The KubeletConfiguration. What this machine needs (see
/// docs/kubernetes-node.md): cgroup v1 allowed, cgroupfs, no QoS cgroups
/// and no node-allocatable enforcement, swap tolerated. What a test needs:
/// the API server may call it (logs, exec) with the certificate the control
/// plane gave it, which the kubelet checks against the client CA and then
/// asks the API server about; no image is ever garbage-collected (they are
/// imported, not pullable); nothing evicted for a full disk.
fn configuration(
    dir: &Path,
    certs: &Path,
    containerd_endpoint: &str,
    resolv_conf: &PathBuf,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": false,
        "cgroupDriver": "cgroupfs",
        "cgroupsPerQOS": false,
        "enforceNodeAllocatable": [],
        "failSwapOn": false,
        "containerRuntimeEndpoint": containerd_endpoint,
        "address": NODE_ADDRESS.to_string(),
        "port": free_port(),
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": free_port(),
        "clusterDomain": "cluster.local",
        "clusterDNS": [NODE_ADDRESS.to_string()],
        "resolvConf": resolv_conf,
        "podLogsDir": dir.join("pod-logs"),
        "authentication": {
            "anonymous": { "enabled": false },
            "webhook": { "enabled": true },
            "x509": { "clientCAFile": certs.join("client-cert-auth-ca.crt") },
        },
        "authorization": { "mode": "Webhook" },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "maxPods": 60,
        "serializeImagePulls": false,
    })
}
