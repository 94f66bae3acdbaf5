//! Where the pinned external programs live.

use std::{net::TcpListener, path::PathBuf};

/// `$HERALD_TOOLS`, or `~/.cache/herald-tools`: the cache that
/// `scripts/install-tools.sh` fills.
pub fn tools_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HERALD_TOOLS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is not set and neither is HERALD_TOOLS");
    PathBuf::from(home).join(".cache/herald-tools")
}

/// The installed program `name`; panics with the way to install it when it
/// is not there.
pub fn tool(name: &str) -> PathBuf {
    installed(name, "`make tools` (scripts/install-tools.sh)")
}

/// `name` in the tools cache; panics naming `installer` when it is missing.
pub(crate) fn installed(name: &str, installer: &str) -> PathBuf {
    let path = tools_dir().join("bin").join(name);
    assert!(
        path.is_file(),
        "{name} is not installed at {}: run {installer} first",
        path.display()
    );
    path
}

/// A TCP port on 127.0.0.1 that nothing listens on right now. For servers
/// that cannot be handed a listener (child processes); in-process servers
/// bind port 0 instead.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("cannot bind a loopback port")
        .port()
}

/// An HTTP client for tests. Herald builds reqwest without a default TLS
/// crypto provider, so the first client installs ring as the process's
/// provider (what `herald_worker::webhooks::http_client` does in Herald).
pub fn http_client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::new()
}

/// Installs ring as the process's rustls provider, once.
pub(crate) fn install_crypto_provider() {
    // Err means a provider is already installed: fine either way.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
