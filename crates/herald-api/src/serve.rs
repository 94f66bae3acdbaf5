//! The accept loop: hyper's HTTP/1 server with the limits `axum::serve`
//! does not offer.
//!
//! - `api.header_read_timeout`: a client that has not sent a whole request
//!   head by then is disconnected (hyper's own timer).
//! - `api.body_read_timeout`: enforced where bodies are read (408).
//! - `api.max_connections`: connections beyond it are still accepted, but
//!   served as *overflow*: one request each, a short header timeout, and
//!   only the probes (`/healthz`, `/readyz`) answered; anything else gets
//!   503 `overloaded` with `Retry-After`. So a flood of slow clients costs
//!   the server a bounded number of slots and never starves the probes.
//!
//! On shutdown the listener closes and every connection finishes its
//! request in progress (hyper's graceful shutdown); [`run`] returns once
//! every connection's task has ended.

use std::{sync::Arc, time::Duration};

use axum::{
    Router,
    extract::Request,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{ApiConfig, ApiError};

/// How long an overflow connection may take to send its request head.
const OVERFLOW_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// Pause after a failed accept (out of file descriptors, typically), so
/// the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

pub(crate) async fn run(
    listener: TcpListener,
    app: Router,
    config: &ApiConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let overflow = app.clone().layer(middleware::from_fn(probes_only));
    let graceful = GracefulShutdown::new();
    // Every connection's task, waited for at the end.
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let slot = slots.clone().try_acquire_owned().ok();
        let mut builder = http1::Builder::new();
        builder.timer(TokioTimer::new());
        let service = match slot {
            Some(_) => {
                builder.header_read_timeout(config.header_read_timeout);
                app.clone()
            }
            None => {
                tracing::debug!("connection limit reached; serving probes only");
                builder
                    .header_read_timeout(OVERFLOW_HEADER_TIMEOUT.min(config.header_read_timeout))
                    .keep_alive(false);
                overflow.clone()
            }
        };
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        connections.spawn(async move {
            // Held for the connection's life.
            let _slot = slot;
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    connections.close();
    connections.wait().await;
    Ok(())
}

/// What an overflow connection is served: the probes, nothing else.
async fn probes_only(request: Request, next: Next) -> Response {
    match request.uri().path() {
        "/healthz" | "/readyz" => next.run(request).await,
        _ => ApiError::Overloaded.into_response(),
    }
}
