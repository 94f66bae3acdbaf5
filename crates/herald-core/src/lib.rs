//! Herald's contracts and pure logic, shared by every role.
//!
//! Nothing here does I/O: the names of streams, subjects and buckets, the
//! versioned JSON payloads that travel through them, the retry schedule and
//! Standard Webhooks signing. The API, the workers and the operator agree on
//! these types, so a change here is a change of the wire contract.

pub mod duration_serde;
pub mod endpoint_secrets;
pub mod health;
pub mod ids;
pub mod json;
pub mod keyring;
pub mod metrics;
pub mod names;
pub mod outgoing;
pub mod payload;
pub mod redact;
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

/// Reads an RFC 3339 time as a wire timestamp. A time before 1970 is 1970
/// (the wire has nothing earlier), and a leap second (`:60`) is read as the
/// second before it.
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    use time::{OffsetDateTime, format_description::well_known::Rfc3339};
    let at = OffsetDateTime::parse(text, &Rfc3339).or_else(|e| {
        // `time` takes `:60` only where a leap second really was.
        let leap = text.get(17..19) == Some("60");
        match text.get(..17).zip(text.get(19..)) {
            Some((head, tail)) if leap => {
                OffsetDateTime::parse(&format!("{head}59{tail}"), &Rfc3339)
            }
            _ => Err(e),
        }
    });
    let nanos = at.ok()?.unix_timestamp_nanos();
    Some(u64::try_from(nanos.max(0) / 1_000_000).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_round_trips_and_refuses_garbage() {
        assert_eq!(
            super::rfc3339(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            super::parse_rfc3339("2023-11-14T22:13:20.123Z"),
            Some(1_700_000_000_123)
        );
        assert_eq!(
            super::parse_rfc3339("2023-11-14T23:13:20+01:00"),
            Some(1_700_000_000_000)
        );
        assert_eq!(super::parse_rfc3339("0327-04-15T02:06:15Z"), Some(0));
        assert_eq!(
            super::parse_rfc3339("2023-11-14t22:13:20.123z"),
            Some(1_700_000_000_123)
        );
        assert_eq!(
            super::parse_rfc3339("2023-11-14T22:13:60Z"),
            Some(1_700_000_039_000)
        );
        for bad in ["", "yesterday", "2023-11-14", "2023-11-14T22:13:20"] {
            assert_eq!(super::parse_rfc3339(bad), None, "{bad}");
        }
    }
}
