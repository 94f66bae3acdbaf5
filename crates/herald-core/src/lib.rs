//! Herald's contracts and pure logic, shared by every role.
//!
//! Nothing here does I/O: the names of streams, subjects and buckets, the
//! versioned JSON payloads that travel through them, the retry schedule and
//! Standard Webhooks signing. The API, the workers and the operator agree on
//! these types, so a change here is a change of the wire contract.

pub mod endpoint;
pub mod endpoint_secrets;
pub mod ids;
pub mod keyring;
pub mod metrics;
pub mod names;
pub mod payload;
pub mod schedule;
pub mod signing;
pub mod state;

pub use ids::{EndpointId, InvalidToken, TaskId, TaskType, UserId};

/// Milliseconds since the Unix epoch, the one clock format on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Renders a wire timestamp as RFC 3339 for humans and API clients.
pub fn rfc3339(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
