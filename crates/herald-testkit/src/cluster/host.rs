//! What the cluster does to the machine outside its own processes: commands
//! that change the network, and the sweeps that undo whatever a process
//! left behind (mounts, shims, log links) when a test ends.

use std::{
    path::Path,
    process::{Command, Output},
};

/// Runs `program` with `args`; panics with what it printed when it fails.
pub(super) fn run(program: &str, args: &[&str]) -> String {
    let output = output(program, args);
    assert!(
        output.status.success(),
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `program` with `args` for its outcome, which the caller checks (or,
/// when undoing something that may not be there, ignores).
pub(super) fn output(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Writes `value` into the sysctl file `path` (under /proc/sys) and returns
/// what was there before.
pub(super) fn set_sysctl(path: &str, value: &str) -> String {
    let before = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
        .trim()
        .to_string();
    std::fs::write(path, value).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
    before
}

/// Unmounts everything mounted under `dir`, deepest first, detaching what
/// is busy: the pods' volumes, network namespaces and root filesystems.
pub(super) fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = format!("{}/", dir.display());
    // Field 5 is the mount point, with spaces and the like octal-escaped;
    // our directories have none.
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|point| point.starts_with(&prefix))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.len()));
    points.dedup();
    for point in points {
        let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// SIGKILLs every process whose command line names `dir`: the containerd
/// shims our containerd started (they outlive it by design, and name its
/// socket) and anything they left. Processes of other tests never name our
/// directory.
pub(super) fn kill_processes_naming(dir: &Path) {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Removes the links the kubelet makes in /var/log/containers (a fixed
/// path) that point into `dir`.
pub(super) fn remove_log_links_into(dir: &Path) {
    let Ok(entries) = std::fs::read_dir("/var/log/containers") else {
        return;
    };
    for entry in entries.flatten() {
        if std::fs::read_link(entry.path()).is_ok_and(|target| target.starts_with(dir)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The kubelet's iptables chains (KUBE-FIREWALL, which it hooks into INPUT
/// and OUTPUT, and its canaries), in IPv4 and IPv6: the kubelet makes them
/// and never removes them, and kube-proxy's `--cleanup` leaves them.
pub(super) fn remove_kubelet_chains() {
    for program in ["iptables", "ip6tables"] {
        for hook in ["INPUT", "OUTPUT"] {
            while output(program, &["-w", "-D", hook, "-j", "KUBE-FIREWALL"])
                .status
                .success()
            {}
        }
        for table in ["filter", "nat", "mangle"] {
            for chain in ["KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT"] {
                let _ = output(program, &["-w", "-t", table, "-F", chain]);
                let _ = output(program, &["-w", "-t", table, "-X", chain]);
            }
        }
    }
}

/// The results libcni caches in /var/lib/cni/results (a fixed path in
/// containerd 1.6) for the pods of network `network`, and their loopback
/// twins.
pub(super) fn remove_cni_results(network: &str) {
    let results = Path::new("/var/lib/cni/results");
    let Ok(entries) = std::fs::read_dir(results) else {
        return;
    };
    let prefix = format!("{network}-");
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let _ = std::fs::remove_file(entry.path());
        if let Some((sandbox, _interface)) = rest.rsplit_once('-') {
            let _ = std::fs::remove_file(results.join(format!("cni-loopback-{sandbox}-lo")));
        }
    }
}

/// Removes the cgroup `parent` and the empty cgroups under it in every
/// cgroup v1 hierarchy (containerd puts pods' cgroups under its namespace's
/// name when the kubelet makes no QoS cgroups). The kernel refuses to
/// remove a cgroup that has processes, so nothing running is touched.
pub(super) fn remove_cgroups(parent: &str) {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        let dir = hierarchy.path().join(parent);
        if let Ok(children) = std::fs::read_dir(&dir) {
            for child in children.flatten() {
                if child.file_type().is_ok_and(|kind| kind.is_dir()) {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&dir);
    }
}

/// Directories at fixed paths that the kubelet (its device-plugin socket,
/// the container log links) and libcni (its result cache) create whatever
/// their configuration says; the cluster removes them again when it made
/// them.
pub(super) const FIXED_DIRS: [&str; 3] =
    ["/var/lib/kubelet", "/var/log/containers", "/var/lib/cni"];
