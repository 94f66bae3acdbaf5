//! The webhook receiver of a load run: answers 200 to everything and
//! records, for each request, when it arrived, its `webhook-id` and the
//! task it is about. It checks no signature: the run measures Herald, and
//! every microsecond spent here is one the workers do not get on a small
//! machine.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap};
use serde::Deserialize;
use tokio::{net::TcpSocket, sync::oneshot, task::JoinHandle};

/// One webhook as it arrived.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub at: Instant,
    /// Wall clock of the arrival, to compare with the payload's timestamp.
    pub wall: SystemTime,
    pub webhook_id: Option<String>,
    /// `data.task_id` of the body; `None` when the body is not a Herald
    /// webhook (counted as unreadable).
    pub task_id: Option<String>,
    /// The payload's `timestamp`: when the task's handler finished.
    pub finished: Option<SystemTime>,
}

/// The part of a Herald webhook body the run reads.
#[derive(Deserialize)]
struct Body {
    timestamp: Option<String>,
    data: Option<Data>,
}

#[derive(Deserialize)]
struct Data {
    task_id: String,
}

pub struct Receiver {
    addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    addr: SocketAddr,
    source: std::io::Error,
}

/// How many connections may wait to be accepted. Herald's workers open
/// many connections at once when a run starts; with the kernel's usual
/// 128, lost SYNs come back a second later and read as a second of
/// latency. The kernel caps it at `net.core.somaxconn`.
const ACCEPT_BACKLOG: u32 = 4096;

impl Receiver {
    /// Listens on `addr` (port 0: any free port).
    pub async fn bind(addr: SocketAddr) -> Result<Receiver, ListenError> {
        let listen = || -> std::io::Result<tokio::net::TcpListener> {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            // Successive runs of `make bench` listen on the same port while
            // the last run's connections are in TIME_WAIT.
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(ACCEPT_BACKLOG)
        };
        let listener = listen().map_err(|source| ListenError { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ListenError { addr, source })?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let router = Router::new()
            .fallback(record)
            .with_state(Arc::clone(&arrivals));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                eprintln!("herald-bench: receiver stopped: {e}");
            }
        });
        Ok(Receiver {
            addr,
            arrivals,
            stop: Some(stop),
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A copy of every arrival so far.
    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.arrivals).clone()
    }

    /// Calls `f` with the arrivals so far, without copying them.
    pub fn inspect<T>(&self, f: impl FnOnce(&[Arrival]) -> T) -> T {
        f(&lock(&self.arrivals))
    }

    /// Stops listening; open connections are closed once idle.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Workers keep connections alive; do not wait for them to close.
        self.server.abort();
        let _ = (&mut self.server).await;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock(arrivals: &Mutex<Vec<Arrival>>) -> std::sync::MutexGuard<'_, Vec<Arrival>> {
    // A panic while pushing cannot leave the Vec half-written.
    arrivals
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

async fn record(State(arrivals): State<Arc<Mutex<Vec<Arrival>>>>, headers: HeaderMap, body: Bytes) {
    let at = Instant::now();
    let wall = SystemTime::now();
    let webhook_id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (task_id, finished) = match serde_json::from_slice::<Body>(&body) {
        Ok(body) => (
            body.data.map(|d| d.task_id),
            body.timestamp.as_deref().and_then(parse_rfc3339),
        ),
        Err(_) => (None, None),
    };
    lock(&arrivals).push(Arrival {
        at,
        wall,
        webhook_id,
        task_id,
        finished,
    });
}

fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}
