//! One shutdown signal for the whole process: SIGTERM, SIGINT or SIGHUP
//! cancels the token every role watches.
//!
//! SIGHUP is a shutdown too, not the default sudden death: it is what a
//! process gets when the terminal running it closes, and `herald dev` must
//! then stop its nats-server child as on Ctrl-C instead of leaving it
//! behind on the port.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM, SIGINT or SIGHUP.
///
/// The task that waits for the signals ends when the token is cancelled,
/// by a signal or by the process itself (an operator that lost its lease),
/// so it never outlives the shutdown it starts.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
            _ = cancel.cancelled() => return,
        };
        tracing::info!(signal = name, "shutting down");
        cancel.cancel();
    });
    Ok(token)
}
