//! Publishing with the server's acknowledgement.
//!
//! Nothing Herald stores is acknowledged upstream before JetStream has
//! acknowledged it downstream; every publish here waits for its ack.

use async_nats::{
    HeaderMap,
    jetstream::{context::PublishAckFuture, publish::PublishAck},
};
use futures::future::try_join_all;

use crate::{Broker, QueueError};

/// Every message is built by [`herald_core::outgoing`]; this module only
/// sends them.
pub use herald_core::outgoing::{Outgoing, Schedule};

impl Broker {
    /// Publishes one message and waits for JetStream to store it.
    pub async fn publish(&self, message: Outgoing) -> Result<PublishAck, QueueError> {
        let subject = message.subject.clone();
        let ack = self.send(message).await?;
        ack.await
            .map_err(|source| QueueError::Publish { subject, source })
    }

    /// Publishes several messages back to back, then waits for every ack:
    /// one round trip for all of them instead of one each.
    pub async fn publish_all(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<PublishAck>, QueueError> {
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let subject = message.subject.clone();
            pending.push(async move {
                let ack = self.send(message).await?;
                ack.await
                    .map_err(|source| QueueError::Publish { subject, source })
            });
        }
        try_join_all(pending).await
    }

    async fn send(&self, message: Outgoing) -> Result<PublishAckFuture, QueueError> {
        // A disconnected client would buffer the publish and its ack would
        // time out; refuse at once so callers can answer 503 quickly.
        if !self.is_connected() {
            return Err(QueueError::Disconnected);
        }
        let mut headers = HeaderMap::new();
        if let Some(id) = &message.msg_id {
            headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        }
        if let Some(schedule) = &message.schedule {
            let at = format!("@at {}", herald_core::rfc3339(schedule.at_ms));
            headers.insert("Nats-Schedule", at.as_str());
            headers.insert("Nats-Schedule-Target", schedule.target.as_str());
        }
        crate::trace_context::inject_current(&mut headers);
        let subject = message.subject;
        self.jetstream
            .publish_with_headers(subject.clone(), headers, message.payload.into())
            .await
            .map_err(|source| QueueError::Publish { subject, source })
    }
}
