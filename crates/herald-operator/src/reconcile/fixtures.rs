//! A scripted API server for the reconciler's tests (no cluster), the way
//! kube-rs controller-rs tests its reconciler: the reconciler's client talks
//! to a [`tower_test`] mock, and the test takes each request it makes in
//! turn, checks it and answers it.

use std::sync::Arc;

use http::{Method, Request, Response};
use kube::{
    Client,
    client::Body,
    runtime::events::{Recorder, Reporter},
};
use serde_json::{Value, json};

use super::{Context, FINALIZER, MANAGER};
use crate::OperatorConfig;
use herald_crd::WebhookEndpoint;
use herald_queue::endpoints::RecordWriter;

/// The API server's side of the reconciler's client.
pub(super) struct ApiServer(tower_test::mock::Handle<Request<Body>, Response<Body>>);

/// A reconciler context whose client talks to the returned [`ApiServer`]
/// and whose NATS connection goes nowhere, the namespace `default` granted
/// every user.
pub(super) async fn scripted() -> (Arc<Context>, ApiServer) {
    let (service, server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    (context(client).await, ApiServer(server))
}

/// `default/orders` for user 7, generation 3, finalizer in place, its
/// secret in the Secret named `secret`.
pub(super) fn endpoint(secret: &str) -> WebhookEndpoint {
    let mut endpoint = WebhookEndpoint::new(
        "orders",
        serde_json::from_value(json!({
            "userId": "7",
            "url": "https://example.com/hooks",
            "secretRef": { "name": secret },
        }))
        .unwrap(),
    );
    endpoint.metadata.namespace = Some("default".into());
    endpoint.metadata.uid = Some("5c1b2e5e-0000-4000-8000-000000000001".into());
    endpoint.metadata.generation = Some(3);
    endpoint.metadata.finalizers = Some(vec![FINALIZER.into()]);
    endpoint
}

async fn context(client: Client) -> Arc<Context> {
    // Nothing listens on port 9: a NATS call would fail the test.
    let broker = herald_queue::connect("nats://127.0.0.1:9", "scripted")
        .await
        .unwrap();
    Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: None,
            },
        ),
        client,
        broker,
        records: RecordWriter {
            keyring: Arc::new(
                herald_core::keyring::Keyring::parse(
                    &herald_core::keyring::new_key_text("test").unwrap(),
                )
                .unwrap(),
            ),
            rotation_overlap: std::time::Duration::from_secs(60),
        },
        config: OperatorConfig {
            tenancy: crate::TenancyConfig {
                namespaces: [("default".to_string(), vec!["*".to_string()])].into(),
                ..Default::default()
            },
            ..Default::default()
        },
    })
}

impl ApiServer {
    /// Takes the next request, checks its method and path, answers it with
    /// `status` and `answer`; returns the request's body.
    pub(super) async fn expect(
        &mut self,
        method: Method,
        path: &str,
        status: u16,
        answer: Value,
    ) -> Value {
        let (request, respond) = self
            .0
            .next_request()
            .await
            .unwrap_or_else(|| panic!("no {method} {path}"));
        assert_eq!(request.method(), method);
        assert_eq!(request.uri().path(), path);
        let body = request.into_body().collect_bytes().await.unwrap();
        respond.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                .unwrap(),
        );
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    }

    /// The requests every problem ends with: a Warning Event, then the
    /// status patch, answered with `answer`. Returns both bodies.
    pub(super) async fn expect_event_then_status(
        &mut self,
        answer: &WebhookEndpoint,
    ) -> (Value, Value) {
        self.expect_event_then_status_answered(200, serde_json::to_value(answer).unwrap())
            .await
    }

    /// [`Self::expect_event_then_status`] with the patch answered with
    /// `status` and `answer` (a failure, say).
    pub(super) async fn expect_event_then_status_answered(
        &mut self,
        status: u16,
        answer: Value,
    ) -> (Value, Value) {
        let event = self
            .expect(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/default/events",
                201,
                json!({}),
            )
            .await;
        let patch = self
            .expect(
                Method::PATCH,
                "/apis/herald.dev/v1alpha1/namespaces/default/webhookendpoints/orders/status",
                status,
                answer,
            )
            .await;
        (event, patch)
    }
}

/// The `Status` an API server answers a failed request with.
pub(super) fn failure(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": reason, "code": code, "message": message,
    })
}
