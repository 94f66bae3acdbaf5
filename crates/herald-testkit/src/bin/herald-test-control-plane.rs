//! `herald-test-control-plane`: etcd and kube-apiserver on loopback, the
//! tests' [`ControlPlane`], for a program that is not a Rust test (the
//! operator bench, scripts/bench_operator.py). Once the API server answers
//! it prints one JSON line, `{"kubeconfig": ..., "server": ...}` (the
//! kubeconfig is a cluster admin's), and keeps both servers up until its
//! standard input closes or it gets SIGTERM or SIGINT; then it stops them
//! and removes their files.

use std::io::{Read, Write};

use herald_testkit::ControlPlane;
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main]
async fn main() {
    let plane = ControlPlane::start().await;
    let ready = serde_json::json!({
        "kubeconfig": plane.kubeconfig_path(),
        "server": plane.server_url(),
    });
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{ready}").expect("stdout is open");
    stdout.flush().expect("stdout is open");

    let stdin_closed = tokio::task::spawn_blocking(|| {
        // Whatever arrives is ignored; the end of input is the signal.
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    });
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = stdin_closed => {}
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    drop(plane);
    // The thread still reading stdin would keep the runtime from shutting down.
    std::process::exit(0);
}
