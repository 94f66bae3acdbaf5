//! One cluster at a time on a machine: the bridge, the pod and service
//! ranges, kube-proxy's iptables chains and CoreDNS's port are all
//! machine-global, so every cluster holds an exclusive lock on one
//! well-known file for its lifetime.

use std::{fs::File, path::Path};

/// Where the lock lives: the same path for every test process, on a tmpfs
/// that a reboot empties.
const LOCK_FILE: &str = "/run/lock/herald-test-cluster.lock";

/// Held while the cluster runs; dropping it (last) releases the lock, and
/// so does the kernel when a test process dies.
pub(super) struct ClusterLock {
    _file: File,
}

impl ClusterLock {
    /// Waits for any other cluster on this machine to finish, then takes
    /// the lock. Blocking, so call it off the async runtime.
    pub(super) fn acquire() -> ClusterLock {
        let path = Path::new(LOCK_FILE);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        }
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot open {LOCK_FILE}: {e}"));
        file.lock()
            .unwrap_or_else(|e| panic!("cannot lock {LOCK_FILE}: {e}"));
        ClusterLock { _file: file }
    }
}
