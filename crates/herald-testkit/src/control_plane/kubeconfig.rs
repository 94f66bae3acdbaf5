//! Kubeconfig files for the control plane's users.

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};

use super::certificates::CertifiedKey;

/// A kubeconfig, as JSON (which kubeconfig readers accept), readable by its
/// owner only so helm does not warn about it.
pub(super) fn write_kubeconfig(
    path: &Path,
    server_url: &str,
    ca_pem: &str,
    user: &str,
    identity: &CertifiedKey,
) {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "herald-test",
            "cluster": {
                "server": server_url,
                "certificate-authority-data": BASE64.encode(ca_pem),
            },
        }],
        "users": [{
            "name": user,
            "user": {
                "client-certificate-data": BASE64.encode(&identity.certificate_pem),
                "client-key-data": BASE64.encode(&identity.key_pem),
            },
        }],
        "contexts": [{
            "name": "herald-test",
            "context": { "cluster": "herald-test", "user": user },
        }],
        "current-context": "herald-test",
    });
    let text = serde_json::to_string_pretty(&config).expect("a kubeconfig serializes");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
