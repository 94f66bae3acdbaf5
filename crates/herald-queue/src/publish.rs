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

/// A message to publish: subject, `Nats-Msg-Id` for de-duplication, payload,
/// and, for a message schedule, when and where it fires.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub subject: String,
    pub msg_id: Option<String>,
    pub payload: Vec<u8>,
    pub schedule: Option<Schedule>,
}

/// A JetStream message schedule (nats-server 2.12+, ADR-51): the stream
/// keeps the message on its own subject and publishes its payload to
/// `target`, in the same stream, at `at_ms`.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub target: String,
    pub at_ms: u64,
}

impl Outgoing {
    pub fn new(subject: String, msg_id: impl Into<Option<String>>, payload: Vec<u8>) -> Self {
        Self {
            subject,
            msg_id: msg_id.into(),
            payload,
            schedule: None,
        }
    }

    /// A message stored on `subject` that fires onto `target` at `at_ms`.
    pub fn scheduled(
        subject: String,
        target: String,
        at_ms: u64,
        msg_id: String,
        payload: Vec<u8>,
    ) -> Self {
        Self {
            schedule: Some(Schedule { target, at_ms }),
            ..Self::new(subject, msg_id, payload)
        }
    }
}

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
        let subject = message.subject;
        self.jetstream
            .publish_with_headers(subject.clone(), headers, message.payload.into())
            .await
            .map_err(|source| QueueError::Publish { subject, source })
    }
}
