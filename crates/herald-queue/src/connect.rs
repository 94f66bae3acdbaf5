//! The NATS connection every role shares.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, jetstream};

use crate::QueueError;

/// A connected client with its JetStream context.
#[derive(Clone)]
pub struct Broker {
    pub client: Client,
    pub jetstream: jetstream::Context,
}

/// How long a JetStream request (publish ack, API call) may take before the
/// caller treats NATS as unavailable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `url`, retrying in the background when the server is not up
/// yet, and reconnecting forever after that. The call returns at once; use
/// [`Broker::is_connected`] to tell whether the server is reachable.
pub async fn connect(url: &str, name: &str) -> Result<Broker, QueueError> {
    let client = ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(REQUEST_TIMEOUT))
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        })
        .connect(url)
        .await
        .map_err(|e| QueueError::request("connect", e))?;
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client.clone());
    Ok(Broker { client, jetstream })
}

impl Broker {
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}
