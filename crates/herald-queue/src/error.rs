use std::fmt;

/// A JetStream operation that failed. Each variant names the operation, so
/// logs and metrics can tell a full stream from a server that is down.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The client is not connected; nothing was sent.
    #[error("NATS is not connected")]
    Disconnected,
    #[error("publishing to {subject} failed: {source}")]
    Publish {
        subject: String,
        source: async_nats::jetstream::context::PublishError,
    },
    /// The server turned this process away (credentials, certificates).
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    #[error("{operation} failed: {message}")]
    Request {
        operation: &'static str,
        message: String,
    },
}

impl QueueError {
    pub fn request(operation: &'static str, err: impl fmt::Display) -> Self {
        QueueError::Request {
            operation,
            message: err.to_string(),
        }
    }

    /// A stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            QueueError::Disconnected => "disconnected",
            QueueError::Publish { .. } => "publish",
            QueueError::Connect(_) => "refused",
            QueueError::Request { operation, .. } => operation,
        }
    }
}
