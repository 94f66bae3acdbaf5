//! A real single-node Kubernetes for tests, without Docker: the
//! [`ControlPlane`] (etcd, kube-apiserver) on the node's address, then
//! kube-controller-manager, kube-scheduler, containerd with runc, a
//! kubelet, kube-proxy and CoreDNS, all from
//! `scripts/install-control-plane.sh` (docs/kubernetes-node.md says which
//! versions and why).
//!
//! Pods run on a bridge network of the test's own, and nothing they send
//! leaves this machine ([`network`] says how). Images are never pulled:
//! every pod's image is imported with [`Cluster::import_image`] under a
//! `localhost/` name and used with `imagePullPolicy: Never`.
//!
//! Parts of the cluster are machine-global (the bridge, iptables chains,
//! port 53 on the node's address), so one cluster runs at a time: `start`
//! waits for any other to finish. Everything stops when the cluster is
//! dropped, also when a test panics or `start` fails halfway: each part is
//! a guard that undoes itself, dropped in the reverse order of starting.
//!
//! One file per part: [`network`], [`containerd`], [`kubelet`],
//! [`controllers`], [`kube_proxy`], [`coredns`]; [`lock`] and [`host`]
//! hold what they share.

use std::{
    ffi::OsStr,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
};
use tempfile::TempDir;

use crate::{ControlPlane, process::ChildProcess, tools::installed, tools_dir, wait_until};

mod containerd;
mod controllers;
mod coredns;
mod host;
mod kube_proxy;
mod kubelet;
mod lock;
mod network;

use containerd::Containerd;
use kube_proxy::KubeProxy;
use lock::ClusterLock;
use network::{NODE_ADDRESS, Network};

pub use kubelet::NODE_NAME;

/// SIGTERM grace period before SIGKILL for the node's processes.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long the kubelet may take to register its node and make it Ready.
const NODE_READY: Duration = Duration::from_secs(120);
/// How long the controller-manager may take to make namespace `default`'s
/// ServiceAccount (pods cannot be created before it).
const CONTROLLERS_READY: Duration = Duration::from_secs(60);

/// The image `scripts/install-control-plane.sh` builds from tools/test-pod:
/// the pods' sandbox (pause) image, and a tiny HTTP server and client for
/// tests (`pod serve ADDR TEXT`, `pod get URL`, `pod dial ADDR`).
pub const TEST_POD_IMAGE: &str = "localhost/herald-test-pod:v1";

/// A single-node cluster, Ready, with cluster DNS answering and a default
/// ServiceAccount; stopped and cleaned up when dropped.
pub struct Cluster {
    // Dropped in this order (the reverse of starting).
    _kube_proxy: KubeProxy,
    _coredns: Stopped,
    _scheduler: Stopped,
    _controller_manager: Stopped,
    _kubelet: Stopped,
    containerd: Containerd,
    control_plane: ControlPlane,
    _network: Network,
    _sweep: Sweep,
    dir: TempDir,
    _lock: ClusterLock,
}

impl Cluster {
    /// Starts the cluster; returns once its node is Ready, CoreDNS answers
    /// for the `kubernetes` Service, kube-proxy has programmed its rules and
    /// namespace `default` has its ServiceAccount. Needs root. Panics with
    /// the failing component's log on any failure, after undoing what was
    /// started.
    pub async fn start() -> Cluster {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "a test cluster needs root: it runs containerd and a kubelet and changes the network"
        );
        let binaries = Binaries::find();
        let started = Instant::now();
        let lock = tokio::task::spawn_blocking(ClusterLock::acquire)
            .await
            .expect("taking the cluster lock panicked");
        let waited = started.elapsed();
        if waited > Duration::from_secs(1) {
            eprintln!("cluster: waited {waited:.1?} for another test's cluster to finish");
        }
        let dir = tempfile::Builder::new()
            .prefix("herald-cluster-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let sweep = Sweep {
            dir: dir.path().to_path_buf(),
            made: host::FIXED_DIRS
                .into_iter()
                .filter(|fixed| !Path::new(fixed).exists())
                .collect(),
        };
        // What a cluster that died without cleaning up may have left.
        host::remove_kubelet_chains();
        let network = Network::set_up();
        let control_plane = ControlPlane::start_for_node(&network::node_network()).await;

        let containerd = Containerd::start(&dir.path().join("containerd"), TEST_POD_IMAGE).await;
        containerd.import_image(&tools_dir().join("images/test-pod.oci.tar"), TEST_POD_IMAGE);
        let mut kubelet = Stopped(kubelet::start(
            &binaries.kubelet,
            &dir.path().join("kubelet"),
            &control_plane,
            &containerd.endpoint(),
        ));
        let mut controller_manager = Stopped(controllers::start_controller_manager(
            &binaries.controller_manager,
            dir.path(),
            &control_plane,
        ));
        let scheduler = Stopped(controllers::start_scheduler(
            &binaries.scheduler,
            dir.path(),
            &control_plane,
        ));
        let coredns = Stopped(coredns::start(&binaries.coredns, dir.path(), &control_plane).await);

        let client = client_for(control_plane.kubeconfig_path()).await;
        wait_until_node_ready(&client, &mut kubelet.0).await;
        let kube_proxy = KubeProxy::start(&binaries.kube_proxy, dir.path(), &control_plane).await;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, "default");
        wait_until(
            "the controller-manager to create namespace default's ServiceAccount",
            CONTROLLERS_READY,
            || {
                controller_manager.0.assert_running();
                let get = accounts.get_opt("default");
                async move { get.await.ok().flatten().map(|_| ()) }
            },
        )
        .await;
        eprintln!(
            "cluster: node {NODE_NAME} Ready with DNS and kube-proxy in {:.1?} after the lock",
            started.elapsed() - waited
        );
        Cluster {
            _kube_proxy: kube_proxy,
            _coredns: coredns,
            _scheduler: scheduler,
            _controller_manager: controller_manager,
            _kubelet: kubelet,
            containerd,
            control_plane,
            _network: network,
            _sweep: sweep,
            dir,
            _lock: lock,
        }
    }

    /// The control plane: kubeconfigs for other users, kubectl and helm.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// The admin kubeconfig (user `admin`, group `system:masters`).
    pub fn kubeconfig_path(&self) -> &Path {
        self.control_plane.kubeconfig_path()
    }

    /// A client as the admin user.
    pub async fn client(&self) -> Client {
        client_for(self.kubeconfig_path()).await
    }

    /// The node's address, on the pods' bridge: the host reaches NodePorts
    /// (and the API server) there.
    pub fn node_address(&self) -> Ipv4Addr {
        NODE_ADDRESS
    }

    /// The pods' and the Services' address ranges: what an SSRF guard
    /// must open for a receiver running in the cluster.
    pub fn cluster_ranges(&self) -> [&'static str; 2] {
        [network::POD_CIDR, network::SERVICE_CIDR]
    }

    /// A directory of the cluster's own, removed with it: for the files a
    /// test writes (manifests, values).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs kubectl as admin with `args` (see [`ControlPlane::kubectl`]).
    pub fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.control_plane.kubectl(args)
    }

    /// `kubectl apply -f -` of `manifest` (YAML or JSON); panics with
    /// kubectl's error when it fails.
    pub fn apply(&self, manifest: &str) {
        use std::io::Write;
        let mut command = self.control_plane.kubectl_command(self.kubeconfig_path());
        let mut child = command
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run kubectl: {e}"));
        child
            .stdin
            .take()
            .expect("kubectl's stdin is piped")
            .write_all(manifest.as_bytes())
            .expect("cannot write to kubectl");
        let output = child.wait_with_output().expect("kubectl did not finish");
        assert!(
            output.status.success(),
            "kubectl apply failed: {}\n{manifest}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Imports the OCI image archive at `archive` into the node's
    /// containerd (`ctr -n k8s.io images import`) and checks that it holds
    /// `name`, which must be `localhost/<name>:<tag>`. Pods then run it with
    /// `imagePullPolicy: Never`.
    pub fn import_image(&self, archive: &Path, name: &str) {
        self.containerd.import_image(archive, name);
    }

    /// How many packets from pods to anywhere outside the machine the
    /// host's isolation rules have rejected so far.
    pub fn rejected_pod_packets(&self) -> u64 {
        network::rejected_packets()
    }

    /// The A records CoreDNS gives for `name` (asked from the host), or
    /// `None` when it does not answer or answers with an error.
    pub async fn resolve(&self, name: &str) -> Option<Vec<Ipv4Addr>> {
        coredns::query_a(name).await
    }

    /// Waits until pod `name` in `namespace` is Ready; panics with its
    /// status when `deadline` passes or it fails.
    pub async fn wait_for_pod_ready(&self, namespace: &str, name: &str, deadline: Duration) -> Pod {
        let pods: Api<Pod> = Api::namespaced(self.client().await, namespace);
        let mut last = None;
        let give_up = Instant::now() + deadline;
        loop {
            if let Ok(pod) = pods.get(name).await {
                if pod_condition(&pod, "Ready") {
                    return pod;
                }
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
                assert!(
                    !matches!(phase.as_deref(), Some("Failed" | "Succeeded")),
                    "pod {namespace}/{name} ended ({phase:?}) instead of becoming Ready: {:#?}",
                    pod.status
                );
                last = Some(pod);
            }
            assert!(
                Instant::now() < give_up,
                "pod {namespace}/{name} was not Ready after {deadline:?}; its status: {:#?}",
                last.and_then(|pod| pod.status)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until pod `name` (one container, `restartPolicy: Never`) has
    /// run to its end; returns its exit code and termination message.
    pub async fn wait_for_pod_exit(
        &self,
        namespace: &str,
        name: &str,
        deadline: Duration,
    ) -> (i32, String) {
        let pods: Api<Pod> = Api::namespaced(self.client().await, namespace);
        let mut last = None;
        let give_up = Instant::now() + deadline;
        loop {
            if let Ok(pod) = pods.get(name).await {
                let terminated = pod
                    .status
                    .as_ref()
                    .and_then(|status| status.container_statuses.as_ref())
                    .and_then(|statuses| statuses.first())
                    .and_then(|status| status.state.as_ref())
                    .and_then(|state| state.terminated.as_ref());
                if let Some(terminated) = terminated {
                    return (
                        terminated.exit_code,
                        terminated.message.clone().unwrap_or_default(),
                    );
                }
                last = Some(pod);
            }
            assert!(
                Instant::now() < give_up,
                "pod {namespace}/{name} did not finish in {deadline:?}; its status: {:#?}",
                last.and_then(|pod| pod.status)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Whether `pod` has condition `kind` with status True.
fn pod_condition(pod: &Pod, kind: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c.type_ == kind && c.status == "True")
        })
}

async fn wait_until_node_ready(client: &Client, kubelet: &mut ChildProcess) {
    let nodes: Api<Node> = Api::all(client.clone());
    let give_up = Instant::now() + NODE_READY;
    loop {
        kubelet.assert_running();
        if let Ok(Some(node)) = nodes.get_opt(NODE_NAME).await {
            let ready = node
                .status
                .as_ref()
                .and_then(|status| status.conditions.as_ref())
                .is_some_and(|conditions| {
                    conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
                });
            if ready {
                return;
            }
        }
        assert!(
            Instant::now() < give_up,
            "node {NODE_NAME} was not Ready after {NODE_READY:?}; the kubelet's log ends:\n{}",
            kubelet.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A kube client from the kubeconfig at `path`.
pub(crate) async fn client_for(path: &Path) -> Client {
    crate::tools::install_crypto_provider();
    let kubeconfig = Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("cannot read the kubeconfig {}: {e}", path.display()));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("the kubeconfig is valid");
    Client::try_from(config).expect("cannot build a kube client")
}

/// A node process, stopped with SIGTERM (then SIGKILL) when dropped.
struct Stopped(ChildProcess);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.stop_blocking(STOP_GRACE);
    }
}

/// The last sweep before the directory goes: whatever is still mounted
/// under it (the kubelet's volumes), any process still naming it, and what
/// the kubelet and containerd leave at fixed paths outside it (iptables
/// chains, log links, CNI result caches, pod cgroups, and `made`: the
/// kubelet's fixed directories that were not there before).
struct Sweep {
    dir: PathBuf,
    made: Vec<&'static str>,
}

impl Drop for Sweep {
    fn drop(&mut self) {
        host::kill_processes_naming(&self.dir);
        host::unmount_under(&self.dir);
        host::remove_log_links_into(&self.dir);
        host::remove_kubelet_chains();
        host::remove_cni_results(network::CNI_NETWORK);
        host::remove_cgroups("k8s.io");
        for dir in &self.made {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The installed programs the node runs.
struct Binaries {
    kubelet: PathBuf,
    controller_manager: PathBuf,
    scheduler: PathBuf,
    kube_proxy: PathBuf,
    coredns: PathBuf,
}

impl Binaries {
    /// Panics with the way to install them when one is missing.
    fn find() -> Binaries {
        let tool = |name| {
            installed(
                name,
                "`make control-plane` (scripts/install-control-plane.sh)",
            )
        };
        let image = tools_dir().join("images/test-pod.oci.tar");
        assert!(
            image.is_file(),
            "the test pod image is not at {}: run `make control-plane` (scripts/install-control-plane.sh)",
            image.display()
        );
        Binaries {
            kubelet: tool("kubelet"),
            controller_manager: tool("kube-controller-manager"),
            scheduler: tool("kube-scheduler"),
            kube_proxy: tool("kube-proxy"),
            coredns: tool("coredns"),
        }
    }
}
