//! The reconciler against a scripted API server (no cluster): each request
//! it makes is checked and answered in turn ([`super::fixtures`]).

use std::sync::Arc;

use herald_core::metrics::{FailedStep, metrics, render};
use http::Method;
use kube::runtime::controller::Action;
use serde_json::json;

use super::{
    fixtures::{endpoint, failure, scripted},
    reconcile,
};

#[tokio::test]
async fn a_missing_secret_is_ready_false_with_an_event_and_no_error() {
    let (ctx, mut server) = scripted().await;
    let api_server = tokio::spawn(async move {
        let not_found = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "secrets \"later\" not found",
        });
        server
            .expect(
                Method::GET,
                "/api/v1/namespaces/default/secrets/later",
                404,
                not_found,
            )
            .await;
        let (event, patch) = server.expect_event_then_status(&endpoint("later")).await;
        assert_eq!(event["reason"], "SecretNotFound");
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["regarding"]["name"], "orders");
        let ready = &patch["status"]["conditions"][0];
        assert_eq!(ready["type"], "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "SecretNotFound");
        assert_eq!(patch["status"]["observedGeneration"], 3);
        // No state while nothing is delivered to.
        assert!(patch["status"].get("state").is_none(), "{patch}");
    });
    let action = reconcile(Arc::new(endpoint("later")), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::requeue(ctx.config.health_resync));
    api_server.await.unwrap();
}

#[tokio::test]
async fn a_secret_that_is_not_whsec_is_reported_as_invalid() {
    let (ctx, mut server) = scripted().await;
    let api_server = tokio::spawn(async move {
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": { "name": "plain", "namespace": "default" },
            "data": { "secret": "aHVudGVyMg==" },
        });
        server
            .expect(
                Method::GET,
                "/api/v1/namespaces/default/secrets/plain",
                200,
                secret,
            )
            .await;
        let (event, patch) = server.expect_event_then_status(&endpoint("plain")).await;
        assert_eq!(event["reason"], "InvalidSecret");
        // The message says where to look, and never shows the value.
        let note = event["note"].as_str().unwrap();
        assert!(
            note.contains("plain") && !note.contains("hunter2"),
            "{note}"
        );
        assert_eq!(patch["status"]["conditions"][0]["reason"], "InvalidSecret");
    });
    reconcile(Arc::new(endpoint("plain")), ctx).await.unwrap();
    api_server.await.unwrap();
}

fn failures(label: &'static str) -> u64 {
    metrics()
        .operator_reconcile_failures
        .get_or_create(&FailedStep { error: label })
        .get()
}

#[tokio::test]
async fn a_failing_reconcile_is_an_error_counted_under_the_step_that_failed() {
    let (ctx, mut server) = scripted().await;
    let reconciles = metrics().operator_reconciles.get();
    let (secret_read, status_patch) = (failures("secret_read"), failures("status_patch"));
    let timed_out = failure(500, "InternalError", "etcdserver: request timed out");
    let api_server = tokio::spawn(async move {
        // The Secret cannot be read: nothing else is tried.
        server
            .expect(
                Method::GET,
                "/api/v1/namespaces/default/secrets/flaky",
                500,
                timed_out.clone(),
            )
            .await;
        // Next time it is missing, and the status cannot be written.
        server
            .expect(
                Method::GET,
                "/api/v1/namespaces/default/secrets/flaky",
                404,
                failure(404, "NotFound", "secrets \"flaky\" not found"),
            )
            .await;
        server
            .expect_event_then_status_answered(500, timed_out)
            .await;
    });
    let error = reconcile(Arc::new(endpoint("flaky")), ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(error.metric_label(), "secret_read");
    assert!(error.to_string().contains("Secret flaky"), "{error}");
    let error = reconcile(Arc::new(endpoint("flaky")), ctx.clone())
        .await
        .unwrap_err();
    assert_eq!(error.metric_label(), "status_patch");
    api_server.await.unwrap();

    assert_eq!(failures("secret_read"), secret_read + 1);
    assert_eq!(failures("status_patch"), status_patch + 1);
    // Other tests reconcile in this process at the same time.
    assert!(metrics().operator_reconciles.get() >= reconciles + 2);
    let text = render();
    assert!(
        text.contains("herald_operator_reconcile_failures_total{error=\"secret_read\"}"),
        "{text}"
    );
    assert!(text.contains("herald_operator_reconciles_total"), "{text}");
    // And the controller retries it after the backoff.
    let action = super::error_policy(Arc::new(endpoint("flaky")), &error, ctx.clone());
    assert_eq!(action, Action::requeue(ctx.config.error_backoff));
}
