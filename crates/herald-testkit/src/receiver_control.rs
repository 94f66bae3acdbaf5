//! The test receiver as a server of its own (`herald-test-receiver`, the
//! receiver pod of the Kubernetes tests), and the client a test uses to
//! read what it recorded and tell it how to answer.
//!
//! The control API lives under `/_receiver/` on the same port as the
//! webhooks, so one Service port reaches both; those requests are not
//! recorded. Everything else is a webhook, recorded and answered as the
//! current [`ReceiverBehaviour`] says, exactly as [`TestReceiver`] does on
//! loopback.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    routing::{get, post, put},
};

use crate::{
    ReceivedWebhook, ReceiverBehaviour, TestReceiver, http_client, receiver::ReceiverState,
    wait_until,
};

/// The prefix of the control API's paths.
pub const CONTROL_PREFIX: &str = "/_receiver";

impl TestReceiver {
    /// A receiver on `address` that also serves the control API, for a
    /// receiver running in its own process or pod.
    pub async fn start_with_control(address: &str, behaviour: ReceiverBehaviour) -> TestReceiver {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .unwrap_or_else(|e| panic!("cannot bind {address}: {e}"));
        let control = Router::new()
            .route("/_receiver/healthz", get(|| async { "ok" }))
            .route("/_receiver/received", get(received))
            .route("/_receiver/behaviour", put(set_behaviour))
            .route("/_receiver/release", post(release));
        TestReceiver::serve(listener, behaviour, control)
    }
}

async fn received(State(state): State<Arc<ReceiverState>>) -> Json<Vec<ReceivedWebhook>> {
    Json(state.received())
}

async fn set_behaviour(
    State(state): State<Arc<ReceiverState>>,
    Json(behaviour): Json<ReceiverBehaviour>,
) -> StatusCode {
    state.set_behaviour(behaviour);
    StatusCode::NO_CONTENT
}

async fn release(State(state): State<Arc<ReceiverState>>) -> StatusCode {
    state.release();
    StatusCode::NO_CONTENT
}

/// A `herald-test-receiver` reached over HTTP at `base` (such as
/// `http://10.88.0.12:8080`): what [`TestReceiver`] offers in-process.
#[derive(Clone)]
pub struct RemoteReceiver {
    base: String,
    client: reqwest::Client,
}

impl RemoteReceiver {
    pub fn new(base: &str) -> RemoteReceiver {
        RemoteReceiver {
            base: base.trim_end_matches('/').to_string(),
            client: http_client(),
        }
    }

    fn control(&self, path: &str) -> String {
        format!("{}{CONTROL_PREFIX}/{path}", self.base)
    }

    /// Whether it answers its health check.
    pub async fn is_up(&self) -> bool {
        matches!(
            self.client.get(self.control("healthz")).send().await,
            Ok(response) if response.status().is_success()
        )
    }

    /// Every webhook so far, in arrival order.
    pub async fn received(&self) -> Vec<ReceivedWebhook> {
        let response = self
            .client
            .get(self.control("received"))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("GET {}: {e}", self.control("received")));
        response
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {}: not a list of webhooks: {e}", self.base))
    }

    /// Answers from now on as `behaviour` says.
    pub async fn set_behaviour(&self, behaviour: &ReceiverBehaviour) {
        self.client
            .put(self.control("behaviour"))
            .json(behaviour)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("PUT {}: {e}", self.control("behaviour")));
    }

    /// Answers the held requests, and later ones, with 200.
    pub async fn release(&self) {
        self.client
            .post(self.control("release"))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("POST {}: {e}", self.control("release")));
    }

    /// Waits until at least `count` webhooks have arrived; returns them all.
    pub async fn wait_for(&self, count: usize, deadline: Duration) -> Vec<ReceivedWebhook> {
        let what = format!("{count} webhooks at {}", self.base);
        wait_until(&what, deadline, || async {
            let received = self.received().await;
            (received.len() >= count).then_some(received)
        })
        .await
    }
}
