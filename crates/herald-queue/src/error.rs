/// What a failed operation reports as its cause: the client's own error
/// when there is one (so `source()` reaches it), or a sentence when the
/// failure is Herald's own finding (a timeout, an unexpected answer).
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

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
    #[error("{operation} failed: {source}")]
    Request {
        operation: &'static str,
        #[source]
        source: Cause,
    },
}

impl QueueError {
    /// `operation` failed because of `cause`: an error the client returned,
    /// or a message (`&str`, `String`) saying what went wrong.
    pub fn request(operation: &'static str, cause: impl Into<Cause>) -> Self {
        QueueError::Request {
            operation,
            source: cause.into(),
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

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_request_error_keeps_its_cause_and_its_message() {
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed");
        let error = QueueError::request("get stream", io);
        assert_eq!(error.to_string(), "get stream failed: deadline passed");
        assert_eq!(error.label(), "get stream");
        let source = error.source().expect("the cause is kept");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("the cause keeps its type");
        assert_eq!(io.kind(), std::io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_request_error_from_a_message_reads_as_before() {
        let error = QueueError::request("read task history", "timed out");
        assert_eq!(error.to_string(), "read task history failed: timed out");
        assert_eq!(
            error.source().map(|s| s.to_string()).as_deref(),
            Some("timed out")
        );
    }
}
