//! `herald-test-receiver [--listen ADDR] [--behaviour JSON]`: the test
//! webhook receiver as a program of its own, for the receiver pod of the
//! Kubernetes tests (image `localhost/herald-test-receiver`, built by
//! scripts/build-images.sh). It records every webhook and answers as told;
//! tests read and steer it through `/_receiver/` (see `RemoteReceiver`).
//!
//! It is a test tool, kept out of the `herald` binary: its control API lets
//! anyone who reaches it read every webhook and change its answers.

use std::process::ExitCode;

use herald_testkit::{ReceiverBehaviour, TestReceiver};
use tokio::signal::unix::{SignalKind, signal};

const USAGE: &str = "usage: herald-test-receiver [--listen 0.0.0.0:8080] [--behaviour '\"ok\"']";

struct Args {
    listen: String,
    behaviour: ReceiverBehaviour,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        listen: "0.0.0.0:8080".to_string(),
        behaviour: ReceiverBehaviour::Ok,
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => parsed.listen = value()?,
            "--behaviour" => {
                let json = value()?;
                parsed.behaviour =
                    serde_json::from_str(&json).map_err(|e| format!("--behaviour {json}: {e}"))?;
            }
            "--help" | "-h" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(parsed)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(terminate) => terminate,
        Err(e) => {
            eprintln!("herald-test-receiver: cannot handle SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    let receiver = TestReceiver::start_with_control(&args.listen, args.behaviour).await;
    println!("herald-test-receiver: listening on {}", receiver.url(""));
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    println!(
        "herald-test-receiver: stopping after {} webhooks",
        receiver.received().len()
    );
    ExitCode::SUCCESS
}
