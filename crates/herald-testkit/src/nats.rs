//! nats-server with JetStream in a temporary store.

use std::{
    path::{Component, Path, PathBuf},
    time::Duration,
};

use tempfile::TempDir;

use crate::{free_port, process::ChildProcess, tool, wait_until};

const STARTUP: Duration = Duration::from_secs(30);

/// A nats-server with JetStream on a free loopback port. `stop` and
/// `start_again` keep the port and the store, as a restart would.
pub struct NatsServer {
    port: u16,
    monitor_port: u16,
    store: TempDir,
    /// Configuration file text after the listen, monitor and JetStream
    /// settings (TLS, authorization...); empty: none.
    extra_config: String,
    process: Option<ChildProcess>,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        NatsServer::start_with_config(|_| String::new()).await
    }

    /// Like [`NatsServer::start`], with more configuration (nats-server
    /// syntax: a `tls` block, `include`s, `authorization`...) appended to
    /// the server's configuration file. `extra` gets the file's directory,
    /// which `include` paths are relative to (see [`include_path`]).
    pub async fn start_with_config(extra: impl FnOnce(&Path) -> String) -> NatsServer {
        let store = tempfile::tempdir().expect("cannot create a temporary directory");
        let extra_config = extra(store.path());
        let mut server = NatsServer {
            port: free_port(),
            monitor_port: free_port(),
            store,
            extra_config,
            process: None,
        };
        server.start_again().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The `tls://` URL, for a server started with a `tls` block.
    pub fn tls_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    /// The server's log so far (permission violations, refused clients).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.path().join("nats-server.log")).unwrap_or_default()
    }

    /// Replaces the configuration's extra part and has the running server
    /// reload it (SIGHUP), as `nats-server --signal reload` would.
    pub fn reload_with_config(&mut self, extra: &str) {
        self.extra_config = extra.to_string();
        self.write_config();
        let process = self.process.as_ref().expect("nats-server is not running");
        process.signal(nix::sys::signal::Signal::SIGHUP);
    }

    /// The directory of the configuration file, for [`include_path`].
    pub fn config_dir(&self) -> &Path {
        self.store.path()
    }

    fn config_path(&self) -> std::path::PathBuf {
        self.store.path().join("nats-server.conf")
    }

    fn write_config(&self) {
        let text = format!(
            "listen: \"127.0.0.1:{}\"\nhttp: \"127.0.0.1:{}\"\nserver_name: herald-test\n\
             jetstream {{ store_dir: \"{}\" }}\n{}\n",
            self.port,
            self.monitor_port,
            self.store.path().join("jetstream").display(),
            self.extra_config,
        );
        std::fs::write(self.config_path(), text)
            .expect("cannot write the nats-server configuration");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (SIGTERM, as an orchestrator would).
    pub async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop(Duration::from_secs(10)).await;
        }
    }

    /// Starts the server again on the same port with the same store; waits
    /// until JetStream answers.
    pub async fn start_again(&mut self) {
        assert!(self.process.is_none(), "nats-server is already running");
        self.write_config();
        let args = [
            "--config".to_string(),
            self.config_path().display().to_string(),
        ];
        let log = self.store.path().join("nats-server.log");
        let mut process = ChildProcess::spawn("nats-server", &tool("nats-server"), &args, log);
        // /healthz answers 200 once the server accepts clients and JetStream
        // is up.
        let health = format!("http://127.0.0.1:{}/healthz", self.monitor_port);
        let http = crate::http_client();
        wait_until("nats-server to become healthy", STARTUP, || {
            process.assert_running();
            let request = http.get(&health).send();
            async move { request.await.ok()?.status().is_success().then_some(()) }
        })
        .await;
        self.process = Some(process);
    }
}

/// `target` as an `include` path in a configuration file in `config_dir`:
/// nats-server resolves every include relative to the including file, even
/// one that starts with `/`.
pub fn include_path(config_dir: &Path, target: &Path) -> String {
    let from = config_dir
        .canonicalize()
        .expect("the configuration directory exists");
    let target = target.canonicalize().expect("the included file exists");
    let mut path = PathBuf::new();
    for _ in from
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
    {
        path.push("..");
    }
    for part in target.components() {
        if let Component::Normal(part) = part {
            path.push(part);
        }
    }
    path.display().to_string()
}
