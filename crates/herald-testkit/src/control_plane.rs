//! A real Kubernetes control plane for tests, without Docker: etcd and
//! kube-apiserver on loopback, started the way controller-runtime's envtest
//! does, from the binaries `scripts/install-control-plane.sh` builds.
//!
//! Only the API server runs: no controller-manager, scheduler or kubelet. So
//! objects are stored, validated, admitted and authorized for real, but
//! nothing acts on them: Deployments never become ready, namespaces stay
//! `Terminating`, ownerReferences are never garbage-collected and no default
//! ServiceAccounts appear. [`Cluster`](crate::Cluster) starts one of these
//! on its node's address and adds the rest.

//!
//! One file per part: [`etcd`], [`certificates`], [`apiserver`] and the
//! [`kubeconfig`]s users connect with; this one starts them in order and
//! owns them.

use std::{
    ffi::OsStr,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tempfile::TempDir;

use crate::{process::ChildProcess, tools::installed};

mod apiserver;
mod certificates;
mod etcd;
mod kubeconfig;

use certificates::CertificateAuthority;
use kubeconfig::write_kubeconfig;

/// How many times `start` tries again on fresh ports when a port it picked
/// was taken before the server could bind it (envtest tries 5 times too).
const ATTEMPTS: usize = 5;
/// Deadline for each server to become ready. Generous: tests start several
/// control planes at once on small machines.
const STARTUP: Duration = Duration::from_secs(90);
/// After `/healthz`, how long the bootstrap controller may take to create
/// namespace `default`.
const DEFAULT_NAMESPACE: Duration = Duration::from_secs(30);
/// How much longer `wait_until`'s own deadlines are than ours, which panic
/// with the server's log.
const SLACK: Duration = Duration::from_secs(5);
/// SIGTERM grace period before SIGKILL, per process.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// etcd and kube-apiserver on free loopback ports, with RBAC authorization
/// and client-certificate users; stopped (SIGTERM, then SIGKILL) and deleted
/// when dropped, also when a test panics.
///
/// The admin user (`admin`, group `system:masters`) is in
/// [`kubeconfig_path`](Self::kubeconfig_path); [`kubeconfig_for`](Self::kubeconfig_for)
/// makes one for any other user and groups.
pub struct ControlPlane {
    // Stopped in Drop, before `dir` (their data and logs) is removed.
    apiserver: Option<ChildProcess>,
    etcd: Option<ChildProcess>,
    /// 127.0.0.1, or a cluster node's address.
    host: Ipv4Addr,
    port: u16,
    etcd_url: String,
    serving_ca_pem: String,
    client_ca: CertificateAuthority,
    kubeconfig: PathBuf,
    dir: TempDir,
}

impl ControlPlane {
    /// A client of this API server as its admin.
    pub async fn client(&self) -> kube::Client {
        crate::cluster::client_for(self.kubeconfig_path()).await
    }

    /// Starts etcd and kube-apiserver; returns once `/healthz` answers and
    /// namespace `default` exists. A port race (a port picked free was taken
    /// before the server bound it) makes it start again on new ports, up to
    /// 5 times; any other failure panics with the server's log.
    pub async fn start() -> ControlPlane {
        ControlPlane::start_on(None).await
    }

    /// The control plane of a [`Cluster`](crate::Cluster): the API server on
    /// `node`'s address and service range, ready for a kubelet, a
    /// controller-manager and in-cluster clients (see `apiserver::flags`).
    pub(crate) async fn start_for_node(node: &NodeNetwork) -> ControlPlane {
        ControlPlane::start_on(Some(node)).await
    }

    async fn start_on(node: Option<&NodeNetwork>) -> ControlPlane {
        let binaries = Binaries::find();
        let mut failures = Vec::new();
        for attempt in 1..=ATTEMPTS {
            match try_start(&binaries, node).await {
                Ok(plane) => return plane,
                Err(port_taken) => {
                    eprintln!(
                        "control plane: attempt {attempt} of {ATTEMPTS} lost a port race, starting again on new ports: {port_taken}"
                    );
                    failures.push(port_taken);
                }
            }
        }
        panic!(
            "the control plane did not start in {ATTEMPTS} attempts, each losing a port race:\n{}",
            failures.join("\n")
        );
    }

    /// `https://127.0.0.1:<port>`: the API server (a cluster's is on its
    /// node's address instead).
    pub fn server_url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }

    /// The directory of the API server's certificates, named as
    /// `certificates::write_pki` says: the cluster's components read the
    /// service-account signer and the CAs there.
    pub(crate) fn certs_dir(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// `http://127.0.0.1:<port>`: etcd's client URL.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// The PEM certificate of the CA that signed the API server's serving
    /// certificate (the kubeconfigs' `certificate-authority-data`).
    pub fn serving_ca_pem(&self) -> &str {
        &self.serving_ca_pem
    }

    /// A kubeconfig for user `admin` in group `system:masters`: allowed
    /// everything, whatever RBAC says.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// Writes a kubeconfig for `user` in `groups` (a client certificate with
    /// CN `user` and one O per group, signed by the API server's client CA)
    /// and returns its path. The API server adds `system:authenticated`;
    /// everything else is up to RBAC. For a ServiceAccount-like identity use
    /// `system:serviceaccount:<namespace>:<name>` in groups
    /// `system:serviceaccounts` and `system:serviceaccounts:<namespace>`.
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> PathBuf {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let file: String = user
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path = self.dir.path().join(format!(
            "kubeconfig-{file}-{}",
            MADE.fetch_add(1, Ordering::Relaxed)
        ));
        let identity = self.client_ca.client_certificate(user, groups);
        write_kubeconfig(
            &path,
            &self.server_url(),
            &self.serving_ca_pem,
            user,
            &identity,
        );
        path
    }

    /// Runs the installed kubectl as admin with `args`; returns what it
    /// printed and its exit status (check it: this does not).
    pub fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.kubectl_as(&self.kubeconfig, args)
    }

    /// Runs the installed kubectl with `kubeconfig` (one from
    /// [`kubeconfig_for`](Self::kubeconfig_for)) and `args`.
    pub fn kubectl_as<I, S>(&self, kubeconfig: &Path, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = self.kubectl_command(kubeconfig);
        command.args(args);
        command
            .output()
            .unwrap_or_else(|e| panic!("cannot run kubectl: {e}"))
    }

    /// A `Command` for the installed kubectl with `kubeconfig`, for what
    /// [`kubectl`](Self::kubectl) cannot do (stdin, environment). Its
    /// discovery cache is kept in the control plane's directory, not in
    /// `~/.kube`.
    pub fn kubectl_command(&self, kubeconfig: &Path) -> Command {
        let mut command = Command::new(control_plane_tool("kubectl"));
        command
            .env("KUBECONFIG", kubeconfig)
            .env("KUBECACHEDIR", self.dir.path().join("kube-cache"));
        command
    }

    /// Runs the installed helm as admin with `args`. helm's cache, config and
    /// data directories and its discovery cache are in the control plane's
    /// directory, not in `~`.
    pub fn helm<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let home = self.dir.path().join("helm");
        Command::new(control_plane_tool("helm"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("KUBECACHEDIR", self.dir.path().join("kube-cache"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run helm: {e}"))
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // The API server first, while its etcd is still there to let it shut
        // down cleanly.
        let processes: Vec<ChildProcess> = [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
            .collect();
        if processes.is_empty() {
            return;
        }
        // ChildProcess::stop is async and Drop is not; Drop may run inside a
        // runtime of either flavour or outside any, so stop them on a thread
        // of our own. Whatever goes wrong there, dropping a ChildProcess
        // still SIGKILLs it.
        let stopper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("cannot build a runtime to stop the control plane");
            runtime.block_on(async {
                for mut process in processes {
                    process.stop(STOP_GRACE).await;
                }
            });
        });
        let _ = stopper.join();
    }
}

/// The installed programs the control plane runs.
struct Binaries {
    etcd: PathBuf,
    apiserver: PathBuf,
}

impl Binaries {
    /// Panics with the way to install them when one is missing; kubectl is
    /// checked too, so a test fails at start rather than halfway.
    fn find() -> Binaries {
        control_plane_tool("kubectl");
        Binaries {
            etcd: control_plane_tool("etcd"),
            apiserver: control_plane_tool("kube-apiserver"),
        }
    }
}

/// Like [`crate::tool`], naming the script that builds the control plane.
fn control_plane_tool(name: &str) -> PathBuf {
    installed(
        name,
        "`make control-plane` (scripts/install-control-plane.sh)",
    )
}

/// Where a cluster's API server lives: on the node's `address` (which
/// pods reach), with Services in `service_cidr`, the first of which,
/// `kubernetes_service`, is its own.
pub(crate) struct NodeNetwork {
    pub(crate) address: Ipv4Addr,
    pub(crate) service_cidr: String,
    pub(crate) kubernetes_service: Ipv4Addr,
}

/// One attempt. `Err` only for a lost port race (worth another attempt);
/// every other failure panics.
async fn try_start(
    binaries: &Binaries,
    node: Option<&NodeNetwork>,
) -> Result<ControlPlane, String> {
    let dir = tempfile::tempdir().expect("cannot create a temporary directory");
    let mut etcd = etcd::start(&binaries.etcd, dir.path()).await?;
    let certs = dir.path().join("certs");
    // In-cluster clients dial the `kubernetes` Service by address or name.
    let extra_names: Vec<String> = node.map_or_else(Vec::new, |node| {
        vec![
            node.address.to_string(),
            node.kubernetes_service.to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
        ]
    });
    let pki = certificates::write_pki(&certs, &extra_names);
    let apiserver = apiserver::start(
        &binaries.apiserver,
        dir.path(),
        &certs,
        &mut etcd,
        &pki,
        node,
    )
    .await?;
    let host = node.map_or(Ipv4Addr::LOCALHOST, |node| node.address);
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(
        &kubeconfig,
        &format!("https://{host}:{}", apiserver.port),
        &pki.serving_ca.certificate_pem,
        "admin",
        &apiserver.admin,
    );
    Ok(ControlPlane {
        apiserver: Some(apiserver.process),
        etcd: Some(etcd.process),
        host,
        port: apiserver.port,
        etcd_url: etcd.url,
        serving_ca_pem: pki.serving_ca.certificate_pem,
        client_ca: pki.client_ca,
        kubeconfig,
        dir,
    })
}

/// Panics with `process`'s log once `give_up` has passed: `wait_until`'s
/// own deadline (a little later) would say what timed out but not why.
fn assert_in_time(process: &ChildProcess, name: &str, give_up: Instant, what: &str) {
    assert!(
        Instant::now() < give_up,
        "{name} did not {what} in time; its log ends:\n{}",
        process.log_tail()
    );
}

/// The line of `log` saying a port was already taken, if there is one.
fn port_taken(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .find(|line| line.contains("address already in use"))
        .map(|line| line.chars().take(500).collect())
}

fn write_file(path: &Path, contents: &str) {
    std::fs::write(path, contents)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Distinct on every call in this process and across processes in
/// practice: nanoseconds since the epoch, plus a counter. Positive, below
/// 2^127, so it fits a certificate serial number (at most 20 octets).
fn unique_number() -> u128 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_nanos();
    ((nanos << 16) + u128::from(COUNTER.fetch_add(1, Ordering::Relaxed))) & (u128::MAX >> 1)
}
