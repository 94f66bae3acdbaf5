//! `herald receiver`: a demo webhook endpoint. Verifies each request's
//! Standard Webhooks signature, prints what arrived, and answers 200, or a
//! chosen status (`--fail-status 500`) to show retries.

use std::sync::Arc;

use anyhow::Context;
use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, Uri},
    routing::post,
};
use clap::Args;
use herald_core::signing::{self, SigningSecret};

#[derive(Args)]
pub struct ReceiverArgs {
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The endpoint's `whsec_...` signing secret; without it signatures are
    /// not checked.
    #[arg(long, env = "HERALD_RECEIVER_SECRET")]
    secret: Option<String>,
    /// Answer every webhook with this status instead of 200.
    #[arg(long)]
    fail_status: Option<u16>,
}

struct Receiver {
    secret: Option<SigningSecret>,
    fail_status: Option<StatusCode>,
}

pub async fn run(args: ReceiverArgs) -> anyhow::Result<()> {
    let secret = args
        .secret
        .as_deref()
        .map(SigningSecret::parse)
        .transpose()
        .context("--secret")?;
    let fail_status = args
        .fail_status
        .map(StatusCode::from_u16)
        .transpose()
        .context("--fail-status is not an HTTP status")?;
    let state = Arc::new(Receiver {
        secret,
        fail_status,
    });
    let app = Router::new()
        .fallback(post(receive))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    println!(
        "receiver: listening on http://{} ({}, answering {})",
        listener.local_addr()?,
        if state.secret.is_some() {
            "verifying signatures"
        } else {
            "NOT verifying signatures: no --secret"
        },
        state
            .fail_status
            .map_or("200".to_string(), |s| s.as_u16().to_string()),
    );
    let shutdown = crate::shutdown::on_signal()?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let id = header("webhook-id");
    let verdict = match &receiver.secret {
        None => "unchecked".to_string(),
        Some(secret) => {
            let now = herald_core::now_ms() / 1000;
            match signing::verify(
                secret,
                id,
                header("webhook-timestamp"),
                header("webhook-signature"),
                &body,
                now,
            ) {
                Ok(()) => "valid".to_string(),
                Err(e) => format!("INVALID ({e})"),
            }
        }
    };
    let status = if verdict.starts_with("INVALID") {
        StatusCode::UNAUTHORIZED
    } else {
        receiver.fail_status.unwrap_or(StatusCode::OK)
    };
    println!(
        "receiver: POST {uri} webhook-id={id} signature={verdict} -> {}\n  {}",
        status.as_u16(),
        String::from_utf8_lossy(&body)
    );
    status
}
