//! Publishing with the server's acknowledgement.
//!
//! Nothing Herald stores is acknowledged upstream before JetStream has
//! acknowledged it downstream; every publish here waits for its ack.

use std::time::Duration;

use async_nats::{
    HeaderMap,
    jetstream::{
        context::{PublishAckFuture, PublishError, PublishErrorKind},
        publish::PublishAck,
    },
};
use bytes::Bytes;
use futures::future::try_join_all;
use tokio::time::Instant;

use crate::{Broker, QueueError};

/// How long one try of [`Broker::publish_stored`] waits for its ack.
/// A healthy cluster answers in milliseconds; a client whose server died
/// waits out this, not the client's whole request timeout.
const ACK_WAIT_PER_TRY: Duration = Duration::from_secs(2);
/// The pause between tries: the client reconnecting, a stream electing a
/// new leader.
const BETWEEN_TRIES: Duration = Duration::from_millis(100);

/// Every message is built by [`herald_core::outgoing`]; this module only
/// sends them.
pub use herald_core::outgoing::{Outgoing, Schedule};

impl Broker {
    /// Publishes one message and waits for JetStream to store it.
    pub async fn publish(&self, message: Outgoing) -> Result<PublishAck, QueueError> {
        let subject = message.subject.clone();
        let ack = self.send(Frame::of(message)).await?;
        ack.await
            .map_err(|source| QueueError::Publish { subject, source })
    }

    /// Publishes a message that is safe to store twice and waits for
    /// JetStream to store it, trying again until it does or
    /// `topology.store_timeout` runs out. While NATS fails over (the client
    /// reconnects to another server, a stream elects a new leader) a
    /// publish can go unanswered, or its ack can be lost after the message
    /// was stored. Sending it again is safe for a message with a
    /// `Nats-Msg-Id`: the stream drops the repeat inside its duplicate
    /// window (longer than the store timeout) and acknowledges it as a
    /// duplicate. It is also safe for a KV put of the same value. So an
    /// error from here means the message was not stored, or that NATS
    /// stopped answering for the whole store timeout.
    pub async fn publish_stored(&self, message: Outgoing) -> Result<PublishAck, QueueError> {
        let mut acks = self.publish_all_stored(vec![message]).await?;
        Ok(acks.remove(0))
    }

    /// [`Self::publish_stored`] for several messages: sent back to back,
    /// and those not acknowledged sent again, until all are stored.
    pub async fn publish_all_stored(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<PublishAck>, QueueError> {
        let deadline = Instant::now() + self.store_timeout;
        let frames: Vec<Frame> = messages.into_iter().map(Frame::of).collect();
        let mut acks: Vec<Option<PublishAck>> = vec![None; frames.len()];
        loop {
            let unstored = acks.iter().enumerate().filter(|(_, ack)| ack.is_none());
            let tries = unstored.map(|(index, _)| {
                let frame = frames[index].clone();
                async move { (index, self.try_publish(frame, deadline).await) }
            });
            let mut last_error = None;
            for (index, result) in futures::future::join_all(tries).await {
                match result {
                    Ok(ack) => acks[index] = Some(ack),
                    Err(error) if self.worth_another_try(&error) => last_error = Some(error),
                    Err(error) => return Err(error),
                }
            }
            let Some(error) = last_error else {
                return Ok(acks.into_iter().flatten().collect());
            };
            if Instant::now() + BETWEEN_TRIES >= deadline {
                return Err(error);
            }
            tracing::debug!(error = %error, "publish not acknowledged; trying again");
            tokio::time::sleep(BETWEEN_TRIES).await;
        }
    }

    async fn try_publish(&self, frame: Frame, deadline: Instant) -> Result<PublishAck, QueueError> {
        let subject = frame.subject.clone();
        let ack = self.send(frame).await?;
        let wait = ACK_WAIT_PER_TRY.min(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, ack).await {
            Ok(ack) => ack.map_err(|source| QueueError::Publish { subject, source }),
            Err(_) => Err(QueueError::Publish {
                subject,
                source: PublishError::new(PublishErrorKind::TimedOut),
            }),
        }
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
                let ack = self.send(Frame::of(message)).await?;
                ack.await
                    .map_err(|source| QueueError::Publish { subject, source })
            });
        }
        try_join_all(pending).await
    }

    async fn send(&self, frame: Frame) -> Result<PublishAckFuture, QueueError> {
        // A disconnected client would buffer the publish and its ack would
        // time out; refuse at once so callers can answer 503 quickly.
        if !self.is_connected() {
            return Err(QueueError::Disconnected);
        }
        let Frame {
            subject,
            headers,
            payload,
        } = frame;
        self.jetstream
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|source| QueueError::Publish { subject, source })
    }
}

/// A message as it is sent: built once, and cheap to send again (the
/// payload is shared, not copied).
#[derive(Clone)]
struct Frame {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

impl Frame {
    /// The headers of `message`, and the current trace context.
    fn of(message: Outgoing) -> Frame {
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
        Frame {
            subject: message.subject,
            headers,
            payload: message.payload.into(),
        }
    }
}

impl Broker {
    /// Whether a failed publish may succeed if sent again soon: no answer,
    /// or no stream leader answering (JetStream's "no responders", which
    /// the client reports as no stream found), or a connection lost a
    /// moment ago, are what a failover looks like. A refusal (too large,
    /// stream full) is an answer and stays one, and a client that has not
    /// been connected for the whole store timeout is in an outage, not a
    /// failover: the caller hears at once.
    fn worth_another_try(&self, error: &QueueError) -> bool {
        match error {
            QueueError::Disconnected => self.link.lost_within(self.store_timeout),
            QueueError::Publish { source, .. } => matches!(
                source.kind(),
                PublishErrorKind::TimedOut
                    | PublishErrorKind::BrokenPipe
                    | PublishErrorKind::StreamNotFound
            ),
            _ => false,
        }
    }
}
