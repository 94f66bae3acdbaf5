//! Messages still in a stream, addressed by their sequence: how the
//! max-deliver safety net reads the job an advisory names and removes it
//! once its end is recorded (`herald_worker::max_deliveries`).

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use bytes::Bytes;

use crate::{Broker, QueueError};

/// A stored message's subject and payload.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub subject: String,
    pub payload: Bytes,
}

impl Broker {
    /// The message at `sequence` of `stream`; `None` when it is gone.
    pub async fn stored_message(
        &self,
        stream: &str,
        sequence: u64,
    ) -> Result<Option<StoredMessage>, QueueError> {
        match self.stream(stream).await?.direct_get(sequence).await {
            Ok(message) => Ok(Some(StoredMessage {
                subject: message.subject.to_string(),
                payload: message.payload,
            })),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(QueueError::request("read stored message", e)),
        }
    }

    /// Deletes the message at `sequence` of `stream`. `Ok` also when it
    /// was gone already (another try of the same work deleted it).
    pub async fn delete_stored(&self, stream: &str, sequence: u64) -> Result<(), QueueError> {
        let handle = self.stream(stream).await?;
        if let Err(e) = handle.delete_message(sequence).await {
            let gone = matches!(
                handle.direct_get(sequence).await,
                Err(ref missing) if missing.kind() == DirectGetErrorKind::NotFound
            );
            if !gone {
                return Err(QueueError::request("delete stored message", e));
            }
        }
        Ok(())
    }

    /// A handle on `name`, without fetching its info.
    pub(crate) async fn stream(&self, name: &str) -> Result<Stream<()>, QueueError> {
        if !self.is_connected() {
            return Err(QueueError::Disconnected);
        }
        self.jetstream
            .get_stream_no_info(name)
            .await
            .map_err(|e| QueueError::request("get stream", e))
    }
}
