//! A webhook receiver on loopback that records every request and answers
//! as the test tells it to.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::wait_until;

/// How the receiver answers. In JSON (the control API of
/// `herald-test-receiver`): `"ok"`, `{"status": 500}`,
/// `{"fail_first": {"times": 2, "status": 503}}`, ...
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiverBehaviour {
    /// 200 to everything.
    Ok,
    /// This status to everything.
    Status(u16),
    /// `status` to the first `times` requests for each `webhook-id`, then
    /// 200: an endpoint that recovers.
    FailFirst { times: usize, status: u16 },
    /// 410 Gone: the endpoint asks never to be called again.
    Gone,
    /// Never answers: the request stays open until the client gives up.
    Hang,
    /// Holds every request until [`TestReceiver::release`], then 200: a
    /// delivery kept in flight for as long as a test needs.
    Held,
    /// 307 Temporary Redirect to this URL.
    RedirectTo(String),
    /// `status` with this response body.
    Answer { status: u16, body: String },
    /// `status` with `Retry-After: retry_after` to the first `times`
    /// requests for each `webhook-id`, then 200: an endpoint that throttles.
    Throttle {
        times: usize,
        status: u16,
        retry_after: String,
    },
}

/// One request as it arrived.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReceivedWebhook {
    pub path: String,
    /// Header names in lowercase.
    pub headers: HashMap<String, String>,
    pub body: String,
    pub received_at: SystemTime,
}

pub struct TestReceiver {
    base: String,
    state: Arc<ReceiverState>,
    server: JoinHandle<()>,
}

pub(crate) struct ReceiverState {
    behaviour: Mutex<ReceiverBehaviour>,
    /// Set by [`TestReceiver::release`]; held requests wait for it.
    released: tokio::sync::watch::Sender<bool>,
    received: Mutex<Vec<ReceivedWebhook>>,
    seen_per_webhook_id: Mutex<HashMap<String, usize>>,
}

impl TestReceiver {
    pub async fn start(behaviour: ReceiverBehaviour) -> TestReceiver {
        Self::start_at("127.0.0.1:0", behaviour).await
    }

    /// A receiver on `address`, such as `127.0.0.2:0` (Linux routes all of
    /// 127.0.0.0/8 to loopback): tests of the SSRF allow-list need two
    /// receivers that differ only in their address.
    pub async fn start_at(address: &str, behaviour: ReceiverBehaviour) -> TestReceiver {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .unwrap_or_else(|e| panic!("cannot bind {address}: {e}"));
        Self::serve(listener, behaviour, Router::new())
    }

    /// Serves on `listener`: `routes` first (their own state already
    /// attached), every other request recorded and answered by `behaviour`.
    pub(crate) fn serve(
        listener: tokio::net::TcpListener,
        behaviour: ReceiverBehaviour,
        routes: Router<Arc<ReceiverState>>,
    ) -> TestReceiver {
        let base = format!("http://{}", listener.local_addr().expect("bound address"));
        let state = Arc::new(ReceiverState {
            behaviour: Mutex::new(behaviour),
            released: tokio::sync::watch::Sender::new(false),
            received: Mutex::default(),
            seen_per_webhook_id: Mutex::default(),
        });
        let app = routes.fallback(record).with_state(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("test receiver stopped");
        });
        TestReceiver {
            base,
            state,
            server,
        }
    }

    /// The URL of `path` on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Answers from now on as `behaviour` says: an endpoint that is fixed,
    /// or breaks.
    pub fn set_behaviour(&self, behaviour: ReceiverBehaviour) {
        self.state.set_behaviour(behaviour);
    }

    /// Answers the requests [`ReceiverBehaviour::Held`] holds, and any
    /// later ones, with 200.
    pub fn release(&self) {
        self.state.release();
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<ReceivedWebhook> {
        self.state.received()
    }

    /// Waits until at least `count` requests have arrived; returns them all.
    pub async fn wait_for(&self, count: usize, deadline: Duration) -> Vec<ReceivedWebhook> {
        let what = format!("{count} webhooks at {}", self.base);
        wait_until(&what, deadline, || async {
            let received = self.received();
            (received.len() >= count).then_some(received)
        })
        .await
    }
}

impl ReceiverState {
    pub(crate) fn set_behaviour(&self, behaviour: ReceiverBehaviour) {
        *lock(&self.behaviour) = behaviour;
    }

    pub(crate) fn release(&self) {
        self.released.send_replace(true);
    }

    pub(crate) fn received(&self) -> Vec<ReceivedWebhook> {
        lock(&self.received).clone()
    }
}

impl Drop for TestReceiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn record(
    State(state): State<Arc<ReceiverState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    let webhook_id = headers.get("webhook-id").cloned().unwrap_or_default();
    lock(&state.received).push(ReceivedWebhook {
        path: uri.path().to_string(),
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        received_at: SystemTime::now(),
    });
    let behaviour = lock(&state.behaviour).clone();
    let status = match &behaviour {
        ReceiverBehaviour::Ok => 200,
        ReceiverBehaviour::Status(status) => *status,
        ReceiverBehaviour::Gone => 410,
        ReceiverBehaviour::Hang => std::future::pending().await,
        ReceiverBehaviour::Held => {
            let mut released = state.released.subscribe();
            let _ = released.wait_for(|released| *released).await;
            200
        }
        ReceiverBehaviour::RedirectTo(location) => {
            return (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, location.clone())],
            )
                .into_response();
        }
        ReceiverBehaviour::Answer { status, body } => {
            let status = StatusCode::from_u16(*status).expect("a valid HTTP status");
            return (status, body.clone()).into_response();
        }
        ReceiverBehaviour::Throttle {
            times,
            status,
            retry_after,
        } => {
            let mut seen = lock(&state.seen_per_webhook_id);
            let count = seen.entry(webhook_id).or_default();
            *count += 1;
            if *count <= *times {
                let status = StatusCode::from_u16(*status).expect("a valid HTTP status");
                return (status, [(header::RETRY_AFTER, retry_after.clone())]).into_response();
            }
            200
        }
        ReceiverBehaviour::FailFirst { times, status } => {
            let mut seen = lock(&state.seen_per_webhook_id);
            let count = seen.entry(webhook_id).or_default();
            *count += 1;
            if *count <= *times { *status } else { 200 }
        }
    };
    StatusCode::from_u16(status)
        .expect("a valid HTTP status")
        .into_response()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
