//! nats-server with JetStream in a temporary store.

use std::time::Duration;

use tempfile::TempDir;

use crate::{free_port, process::ChildProcess, tool, wait_until};

const STARTUP: Duration = Duration::from_secs(30);

/// A nats-server with JetStream on a free loopback port. `stop` and
/// `start_again` keep the port and the store, as a restart would.
pub struct NatsServer {
    port: u16,
    monitor_port: u16,
    store: TempDir,
    process: Option<ChildProcess>,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        let store = tempfile::tempdir().expect("cannot create a temporary directory");
        let mut server = NatsServer {
            port: free_port(),
            monitor_port: free_port(),
            store,
            process: None,
        };
        server.start_again().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
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
        let args = [
            "--jetstream",
            "--addr",
            "127.0.0.1",
            "--port",
            &self.port.to_string(),
            "--http_port",
            &self.monitor_port.to_string(),
            "--store_dir",
            &self.store.path().join("jetstream").display().to_string(),
            "--server_name",
            "herald-test",
        ]
        .map(String::from);
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
