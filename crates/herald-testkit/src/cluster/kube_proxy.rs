//! kube-proxy in iptables mode: ClusterIPs and NodePorts (on the node's
//! address only) for the pods and the host. Its chains are machine-global,
//! which is one reason only one cluster runs at a time.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    STOP_GRACE,
    host::output,
    kubelet::NODE_NAME,
    network::{NODE_ADDRESS, POD_CIDR},
};
use crate::{ControlPlane, free_port, http_client, process::ChildProcess, wait_until};

const READY: Duration = Duration::from_secs(60);

/// A running kube-proxy; dropping it stops it and removes every rule and
/// chain it made (`kube-proxy --cleanup`).
pub(super) struct KubeProxy {
    process: Option<ChildProcess>,
    binary: PathBuf,
}

impl KubeProxy {
    /// Starts kube-proxy in `dir`; returns once its health check says its
    /// rules are in place.
    pub(super) async fn start(
        binary: &Path,
        dir: &Path,
        control_plane: &ControlPlane,
    ) -> KubeProxy {
        // A stale set from a cluster that died without cleaning up.
        cleanup(binary);
        let kubeconfig = control_plane.kubeconfig_for("system:kube-proxy", &[]);
        let healthz_port = free_port();
        let config = dir.join("kube-proxy.json");
        std::fs::write(
            &config,
            configuration(&kubeconfig, healthz_port).to_string(),
        )
        .expect("cannot write kube-proxy's configuration");
        let process = ChildProcess::spawn(
            "kube-proxy",
            binary,
            &[
                format!("--config={}", config.display()),
                "--v=1".to_string(),
            ],
            dir.join("kube-proxy.log"),
        );
        let mut proxy = KubeProxy {
            process: Some(process),
            binary: binary.to_path_buf(),
        };
        let http = http_client();
        let healthz = format!("http://127.0.0.1:{healthz_port}/healthz");
        wait_until("kube-proxy to program its rules", READY, || {
            proxy
                .process
                .as_mut()
                .expect("kube-proxy runs")
                .assert_running();
            let request = http.get(&healthz).send();
            async move { request.await.ok()?.status().is_success().then_some(()) }
        })
        .await;
        proxy
    }
}

impl Drop for KubeProxy {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop_blocking(STOP_GRACE);
        }
        cleanup(&self.binary);
    }
}

/// Removes kube-proxy's chains and rules, whichever mode made them.
fn cleanup(binary: &Path) {
    let binary = binary.display().to_string();
    let _ = output(&binary, &["--cleanup"]);
}

/// The KubeProxyConfiguration: iptables mode; NodePorts on the node's
/// address only; pods are the cluster CIDR, so traffic to a Service from
/// elsewhere (the host) is masqueraded to the node's address and its reply
/// comes back. It leaves the machine's conntrack sysctls alone (all zero
/// means "do not set").
fn configuration(kubeconfig: &Path, healthz_port: u16) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clientConnection": { "kubeconfig": kubeconfig },
        "hostnameOverride": NODE_NAME,
        "clusterCIDR": POD_CIDR,
        "nodePortAddresses": [format!("{NODE_ADDRESS}/32")],
        "healthzBindAddress": format!("127.0.0.1:{healthz_port}"),
        "metricsBindAddress": format!("127.0.0.1:{}", free_port()),
        "oomScoreAdj": 0,
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    })
}
