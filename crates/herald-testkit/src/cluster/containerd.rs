//! containerd for the node, Debian's 1.6 with runc: everything it keeps
//! (root, state, socket, CNI configuration and IP allocations, network
//! namespaces) under the test's directory, and no way to reach a
//! registry.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    STOP_GRACE,
    host::{kill_processes_naming, output, unmount_under},
    network::cni_config,
};
use crate::{process::ChildProcess, wait_until};

/// The containerd namespace the CRI plugin (so the kubelet) uses.
const NAMESPACE: &str = "k8s.io";
/// Debian's CNI plugins.
const CNI_PLUGINS: &str = "/usr/lib/cni";
const READY: Duration = Duration::from_secs(60);

/// A running containerd; dropping it kills every container it runs, stops
/// it, SIGKILLs any shim left and unmounts what they mounted.
pub(super) struct Containerd {
    process: Option<ChildProcess>,
    dir: PathBuf,
    socket: PathBuf,
}

impl Containerd {
    /// Starts containerd in `dir` with `sandbox_image` as every pod's
    /// sandbox; returns once it answers on its socket.
    pub(super) async fn start(dir: &Path, sandbox_image: &str) -> Containerd {
        let binary = system_program("containerd");
        system_program("ctr");
        std::fs::create_dir_all(dir.join("cni/net.d"))
            .expect("cannot create containerd's directories");
        std::fs::write(
            dir.join("cni/net.d/10-herald-test.conflist"),
            cni_config(&dir.join("cni/ipam")),
        )
        .expect("cannot write the CNI configuration");
        let config = dir.join("containerd.toml");
        std::fs::write(&config, configuration(dir, sandbox_image))
            .expect("cannot write containerd's configuration");
        let process = ChildProcess::spawn(
            "containerd",
            &binary,
            &["--config".to_string(), config.display().to_string()],
            dir.join("containerd.log"),
        );
        let mut containerd = Containerd {
            process: Some(process),
            dir: dir.to_path_buf(),
            socket: dir.join("containerd.sock"),
        };
        wait_until("containerd to answer on its socket", READY, || {
            containerd
                .process
                .as_mut()
                .expect("containerd is running")
                .assert_running();
            let up = containerd.ctr(&["version"]).status.success();
            async move { up.then_some(()) }
        })
        .await;
        containerd
    }

    /// `unix://<socket>`, for the kubelet.
    pub(super) fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Runs `ctr` against this containerd in the CRI's namespace.
    pub(super) fn ctr(&self, args: &[&str]) -> std::process::Output {
        let socket = self.socket.display().to_string();
        let mut all = vec!["--address", &socket, "--namespace", NAMESPACE];
        all.extend_from_slice(args);
        output("ctr", &all)
    }

    /// Imports the OCI archive at `archive` and checks that it holds an
    /// image called `name` (a registry-qualified name such as
    /// `localhost/herald:test`; a short one would be read as docker.io's).
    pub(super) fn import_image(&self, archive: &Path, name: &str) {
        assert!(
            name.starts_with("localhost/"),
            "image {name}: name local images localhost/<name>:<tag>, so that no name ever means a registry's image"
        );
        let repository = name
            .rsplit_once(':')
            .map_or(name, |(repository, _)| repository);
        let archive_arg = archive.display().to_string();
        let imported = self.ctr(&[
            "images",
            "import",
            "--base-name",
            repository,
            "--digests",
            &archive_arg,
        ]);
        assert!(
            imported.status.success(),
            "ctr images import {archive_arg} failed: {}",
            String::from_utf8_lossy(&imported.stderr)
        );
        let listed = self.ctr(&["images", "list", "--quiet"]);
        let names = String::from_utf8_lossy(&listed.stdout);
        assert!(
            names.lines().any(|line| line == name),
            "{archive_arg} holds no image named {name}; containerd has:\n{names}"
        );
    }

    /// Kills every task (container process) and deletes it, so its shim
    /// exits.
    fn kill_all_tasks(&self) {
        let listed = self.ctr(&["tasks", "list", "--quiet"]);
        let tasks = String::from_utf8_lossy(&listed.stdout).into_owned();
        for task in tasks.lines().filter(|task| !task.is_empty()) {
            let _ = self.ctr(&["tasks", "kill", "--all", "--signal", "SIGKILL", task]);
        }
        for task in tasks.lines().filter(|task| !task.is_empty()) {
            let _ = self.ctr(&["tasks", "delete", "--force", task]);
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            self.kill_all_tasks();
            process.stop_blocking(STOP_GRACE);
        }
        kill_processes_naming(&self.dir);
        unmount_under(&self.dir);
    }
}

/// containerd's configuration, from `containerd config default` with what
/// this machine and the tests need: the CRI's sandbox image a local one,
/// `restrict_oom_score_adj` (nothing here may lower an oom_score_adj, and
/// runc fails every sandbox without it), network namespaces under the
/// state directory, CNI from Debian's plugins with our configuration, and
/// every registry mirrored to a dead loopback port, so that a wrong image
/// name fails at once, locally, instead of reaching for the internet.
fn configuration(dir: &Path, sandbox_image: &str) -> String {
    let dir = dir.display();
    format!(
        r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{dir}/containerd.sock"

[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  Root = "{dir}/runc"

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{CNI_PLUGINS}"
  conf_dir = "{dir}/cni/net.d"
  max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
  endpoint = ["http://127.0.0.1:1"]

[plugins."io.containerd.grpc.v1.cri".registry.mirrors."*"]
  endpoint = ["http://127.0.0.1:1"]
"#
    )
}

/// A program from the Debian packages scripts/install-control-plane.sh
/// installs; panics naming the script when it is missing.
pub(super) fn system_program(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/sbin", "/bin"] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!(
        "{name} is not installed: run `make control-plane` (scripts/install-control-plane.sh installs the node's Debian packages)"
    );
}
