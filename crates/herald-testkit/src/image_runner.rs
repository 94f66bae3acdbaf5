//! A standalone containerd to run the test images with `ctr`, outside any
//! cluster: proof that an image starts, as its non-root user, on a
//! read-only root filesystem.
//!
//! Its root, state, socket and runc state all live in a temporary
//! directory, its CRI plugin is disabled, and nothing here ever pulls:
//! images come from `ctr images import` of local archives. Containers use
//! the host's network namespace and are told to listen on loopback, or
//! none at all. Dropping it kills every task it started, deletes their
//! containers (so no shim outlives the test), then stops containerd.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::Mutex,
    time::Duration,
};

use tempfile::TempDir;

use crate::{process::ChildProcess, wait_until};

const NAMESPACE: &str = "herald-images";
const STARTUP: Duration = Duration::from_secs(60);
const INSTALL: &str = "scripts/install-containerd.sh (make images)";
/// What containerd's default spec grants, all dropped, as the chart's
/// `capabilities: {drop: [ALL]}` does (ctr 1.6 has no `ALL`).
const DEFAULT_CAPABILITIES: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// How a container runs, beyond the read-only root and the image's user.
#[derive(Debug, Default, Clone)]
pub struct RunOptions {
    /// Share the host's network namespace (servers on loopback); without
    /// it the container has a network namespace of its own with no
    /// interfaces but `lo`.
    pub host_network: bool,
    /// A writable tmpfs at /tmp, as the chart's emptyDir.
    pub tmp: bool,
    /// Extra `NAME=value` environment variables.
    pub env: Vec<String>,
}

pub struct ImageRunner {
    // Stopped in Drop, after every task, before `dir` is removed.
    containerd: Option<ChildProcess>,
    socket: PathBuf,
    runc_root: PathBuf,
    containers: Mutex<Vec<String>>,
    dir: TempDir,
}

fn program(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!("{name} is not installed: run {INSTALL}")
}

impl ImageRunner {
    /// Starts containerd; returns once it answers on its socket.
    pub async fn start() -> ImageRunner {
        program("runc");
        let dir = tempfile::Builder::new()
            .prefix("herald-ctrd-")
            .tempdir()
            .expect("cannot create a temporary directory");
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, containerd_config(dir.path(), &socket))
            .expect("cannot write containerd's configuration");
        let containerd = ChildProcess::spawn(
            "containerd",
            &program("containerd"),
            &["--config".to_string(), config.display().to_string()],
            dir.path().join("containerd.log"),
        );
        let mut runner = ImageRunner {
            containerd: Some(containerd),
            socket,
            runc_root: dir.path().join("runc"),
            containers: Mutex::default(),
            dir,
        };
        let give_up = tokio::time::Instant::now() + STARTUP;
        while !runner.ctr(["version"]).status.success() {
            if let Some(containerd) = runner.containerd.as_mut() {
                containerd.assert_running();
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "containerd did not answer within {STARTUP:?}; its log:\n{}",
                runner.containerd_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        runner
    }

    fn containerd_log(&self) -> String {
        self.containerd
            .as_ref()
            .map(ChildProcess::log_tail)
            .unwrap_or_default()
    }

    /// Runs `ctr` against this containerd.
    pub fn ctr<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Command::new(program("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg(NAMESPACE)
            .args(args)
            .output()
            .expect("cannot run ctr")
    }

    fn ctr_ok<I, S>(&self, what: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let output = self.ctr(args);
        assert!(
            output.status.success(),
            "ctr {what} failed:\n{}{}\ncontainerd's log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.containerd_log()
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Imports `archive`; panics unless it holds an image named `reference`.
    pub fn import(&self, archive: &Path, reference: &str) {
        self.ctr_ok(
            "images import",
            ["images".as_ref(), "import".as_ref(), archive.as_os_str()],
        );
        let names = self.ctr_ok("images ls", ["images", "ls", "-q"]);
        assert!(
            names.lines().any(|name| name == reference),
            "{} imported, but not as {reference}; images now: {names}",
            archive.display()
        );
    }

    fn run_args(&self, reference: &str, id: &str, options: &RunOptions) -> Vec<String> {
        let mut args = vec![
            "run".to_string(),
            "--read-only".to_string(),
            "--runc-root".to_string(),
            self.runc_root.display().to_string(),
            "--seccomp".to_string(),
        ];
        for capability in DEFAULT_CAPABILITIES {
            args.push("--cap-drop".to_string());
            args.push(capability.to_string());
        }
        if options.host_network {
            args.push("--net-host".to_string());
        }
        if options.tmp {
            args.push("--mount".to_string());
            args.push(
                "type=tmpfs,src=tmpfs,dst=/tmp,options=rw:nosuid:nodev:size=65536k".to_string(),
            );
        }
        for variable in &options.env {
            args.push("--env".to_string());
            args.push(variable.clone());
        }
        args.push(reference.to_string());
        args.push(id.to_string());
        args
    }

    /// Runs `argv` (the whole command line: the image's entrypoint is not
    /// added) in a container of `reference` until it exits; returns its
    /// output. The container is removed afterwards.
    pub fn run_to_end(&self, reference: &str, id: &str, argv: &[&str]) -> Output {
        let mut args = self.run_args(reference, id, &RunOptions::default());
        args.insert(1, "--rm".to_string());
        args.extend(argv.iter().map(|a| a.to_string()));
        self.ctr(args)
    }

    /// Starts `argv` (empty: the image's entrypoint and command) in a new
    /// container `id`, detached, its output in [`log`](Self::log).
    pub fn start_task(&self, reference: &str, id: &str, argv: &[&str], options: &RunOptions) {
        let mut args = self.run_args(reference, id, options);
        args.insert(1, "--detach".to_string());
        args.insert(2, "--log-uri".to_string());
        args.insert(3, format!("file://{}", self.log_path(id).display()));
        args.extend(argv.iter().map(|a| a.to_string()));
        lock(&self.containers).push(id.to_string());
        self.ctr_ok(&format!("run {id}"), args);
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.dir.path().join(format!("{id}.log"))
    }

    /// What task `id` has written to stdout and stderr so far.
    pub fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    /// The host pid of task `id`'s process, once it runs; panics with its
    /// log if it has exited instead.
    pub async fn pid(&self, id: &str) -> u32 {
        wait_until(&format!("task {id} running"), STARTUP, || async {
            let tasks = self.ctr_ok("tasks ls", ["tasks", "ls"]);
            tasks.lines().find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                match fields.as_slice() {
                    [task, pid, "RUNNING"] if *task == id => pid.parse().ok(),
                    [task, _, "STOPPED"] if *task == id => {
                        panic!("task {id} exited; its log:\n{}", self.log(id))
                    }
                    _ => None,
                }
            })
        })
        .await
    }

    /// The OCI runtime spec containerd generated for container `id`.
    pub fn spec(&self, id: &str) -> serde_json::Value {
        let info = self.ctr_ok("containers info", ["containers", "info", id]);
        let info: serde_json::Value =
            serde_json::from_str(&info).expect("ctr containers info prints JSON");
        info["Spec"].clone()
    }

    fn remove(&self, id: &str) {
        let _ = self.ctr(["tasks", "kill", "--signal", "SIGKILL", id]);
        let _ = self.ctr(["tasks", "delete", "--force", id]);
        let _ = self.ctr(["containers", "delete", id]);
    }
}

impl Drop for ImageRunner {
    fn drop(&mut self) {
        for id in std::mem::take(&mut *lock(&self.containers)) {
            self.remove(&id);
        }
        if let Some(mut containerd) = self.containerd.take() {
            containerd.signal(nix::sys::signal::Signal::SIGTERM);
            // ChildProcess's own drop is a SIGKILL; give it a moment first.
            for _ in 0..100 {
                if !containerd.is_running() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// containerd's configuration: everything under `dir`, no CRI, no metrics
/// or debug listeners, and a docker.io mirror on a dead loopback port so
/// that a wrong image name fails at once, on this machine.
fn containerd_config(dir: &Path, socket: &Path) -> String {
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = ""

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
  endpoint = ["http://127.0.0.1:1"]
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        socket = socket.display(),
    )
}
