//! Whether the client's connection was lost a moment ago (a failover a
//! publish can wait out) or has been down for long (an outage to answer
//! at once).

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// The state of the role's connection, kept by the client's event callback.
#[derive(Debug, Default)]
pub(crate) struct Link {
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone, Copy)]
enum State {
    /// Not connected yet since the role started: NATS is not there, and
    /// nothing says it is about to be.
    #[default]
    NeverConnected,
    Connected,
    LostAt(Instant),
}

impl Link {
    pub(crate) fn connected(&self) {
        *self.lock() = State::Connected;
    }

    pub(crate) fn lost(&self) {
        *self.lock() = State::LostAt(Instant::now());
    }

    /// Whether a publish that found the client disconnected should wait
    /// for the reconnect: the connection was up less than `within` ago.
    /// (Connected here means the event of the loss has not arrived yet.)
    pub(crate) fn lost_within(&self, within: Duration) -> bool {
        match *self.lock() {
            State::NeverConnected => false,
            State::Connected => true,
            State::LostAt(at) => at.elapsed() < within,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value: a panic while it was held left a
        // whole one.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_connection_lost_a_moment_ago_is_worth_waiting_for() {
        let link = Link::default();
        assert!(
            !link.lost_within(Duration::from_secs(10)),
            "never connected"
        );
        link.connected();
        link.lost();
        assert!(link.lost_within(Duration::from_secs(10)));
        assert!(
            !link.lost_within(Duration::ZERO),
            "lost longer ago than that"
        );
        link.connected();
        assert!(link.lost_within(Duration::from_secs(10)));
    }
}
