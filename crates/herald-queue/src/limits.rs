//! How large a message the NATS server accepts.
//!
//! The server announces its `max_payload` (headers plus payload, 1 MiB by
//! default) in every INFO, at connect and after each reconnect; async-nats
//! keeps the latest. Every size Herald accepts is derived from it, never
//! from configuration alone, so what the API accepts can be stored and
//! delivered by the same server.

use crate::{Broker, QueueError};

/// Room kept in every message for its headers (`Nats-Msg-Id`, schedule
/// headers) and the protocol's own framing.
pub const HEADER_RESERVE: usize = 1024;

impl Broker {
    /// The largest message the connected server accepts, from its latest
    /// INFO; `None` before the first connection.
    pub fn max_payload(&self) -> Option<usize> {
        let max = self.client.server_info().max_payload;
        (max > 0).then_some(max)
    }

    /// Whether a payload of `len` bytes, with its headers, can be published
    /// to this server (true while the limit is unknown: the publish itself
    /// then answers).
    pub fn fits(&self, len: usize) -> bool {
        self.max_payload()
            .is_none_or(|max| len.saturating_add(HEADER_RESERVE) <= max)
    }
}

impl QueueError {
    /// The message can never be stored as it is: larger than the server's
    /// `max_payload` or the stream's largest message. Retrying is pointless.
    pub fn is_too_large(&self) -> bool {
        use async_nats::jetstream::context::PublishErrorKind;
        match self {
            QueueError::Publish { source, .. } => {
                source.kind() == PublishErrorKind::MaxPayloadExceeded
                    || source.to_string().contains("message size exceeds maximum")
            }
            _ => false,
        }
    }
}
