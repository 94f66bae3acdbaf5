//! NATS JetStream inside the test cluster: the chart
//! `deploy/nats/test-cluster` (a StatefulSet of the local nats-server
//! image, a headless Service for its routes and the client Service `nats`),
//! and the storage it claims.
//!
//! The test cluster has no storage provisioner, so the claims of the
//! StatefulSet's `volumeClaimTemplates` are bound to local
//! PersistentVolumes made here, one per server, each a directory on the
//! node owned by the image's user (65532): a kubelet applies `fsGroup` to
//! few volume types, and this way the server can write whatever it does.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use crate::Image;

/// The uid and gid every test image runs as.
pub const IMAGE_USER: u32 = 65532;

/// The StorageClass of the chart's claims (its `storage.className`).
pub const LOCAL_STORAGE_CLASS: &str = "herald-test-local";

/// The test NATS chart's directory.
pub fn nats_chart() -> PathBuf {
    crate::workspace_root().join("deploy/nats/test-cluster")
}

/// `helm install` arguments after the release name and chart: the image
/// of images.json, and `replicas` servers (1, or 3 for a cluster; Herald
/// then needs `config.topology.replicas=3`).
pub fn nats_chart_values(image: &Image, replicas: u8) -> Vec<String> {
    [
        format!("image.repository={}", image.repository()),
        format!("image.tag={}", image.tag()),
        format!("replicas={replicas}"),
    ]
    .into_iter()
    .flat_map(|value| ["--set".to_string(), value])
    .collect()
}

/// Creates `replicas` directories under `dir` for the servers' volumes
/// and returns the manifest of the StorageClass and of one local
/// PersistentVolume per directory, on node `node`.
pub fn local_volumes(node: &str, dir: &Path, replicas: u8, size: &str) -> String {
    let mut manifest = format!(
        "apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: {LOCAL_STORAGE_CLASS}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
"
    );
    for i in 0..replicas {
        let path = dir.join(format!("nats-{i}"));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        std::os::unix::fs::chown(&path, Some(IMAGE_USER), Some(IMAGE_USER))
            .unwrap_or_else(|e| panic!("cannot chown {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
        manifest.push_str(&format!(
            "---
apiVersion: v1
kind: PersistentVolume
metadata:
  name: herald-test-nats-{i}
spec:
  capacity:
    storage: {size}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: {LOCAL_STORAGE_CLASS}
  local:
    path: {path}
  nodeAffinity:
    required:
      nodeSelectorTerms:
        - matchExpressions:
            - key: kubernetes.io/hostname
              operator: In
              values: [{node}]
",
            path = path.display()
        ));
    }
    manifest
}
