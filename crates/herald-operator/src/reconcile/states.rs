//! How many endpoints are in each delivery state, as the operator last
//! wrote them into their status: `herald_endpoints{state}`. Only the
//! leader reconciles, so only its figures move; a standby reports what it
//! saw while it led, or nothing (aggregate with `max`).

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
};

use herald_core::metrics::{EndpointStateLabel, metrics};
use herald_crd::EndpointState;

/// `<namespace>/<name>` → the state its status shows.
static STATES: LazyLock<Mutex<HashMap<String, EndpointState>>> = LazyLock::new(Mutex::default);

const ALL: [EndpointState; 4] = [
    EndpointState::Active,
    EndpointState::Failing,
    EndpointState::Disabled,
    EndpointState::Paused,
];

fn label(state: EndpointState) -> &'static str {
    match state {
        EndpointState::Active => "active",
        EndpointState::Failing => "failing",
        EndpointState::Disabled => "disabled",
        EndpointState::Paused => "paused",
    }
}

/// The state the status of `namespace/name` now shows; `None` (no
/// delivery state: the user is not allowed there) counts it nowhere.
pub(super) fn record(namespace: &str, name: &str, state: Option<EndpointState>) {
    let key = format!("{namespace}/{name}");
    let mut states = STATES.lock().unwrap_or_else(|p| p.into_inner());
    match state {
        Some(state) => states.insert(key, state),
        None => states.remove(&key),
    };
    publish(&states);
}

/// The resource is gone.
pub(super) fn forget(namespace: &str, name: &str) {
    record(namespace, name, None);
}

fn publish(states: &HashMap<String, EndpointState>) {
    for state in ALL {
        let count = states.values().filter(|s| **s == state).count();
        metrics()
            .endpoints
            .get_or_create(&EndpointStateLabel {
                state: label(state),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(state: &str) -> String {
        let prefix = format!("herald_endpoints{{state=\"{state}\"}} ");
        herald_core::metrics::render()
            .lines()
            .find_map(|line| line.strip_prefix(&prefix).map(str::to_string))
            .unwrap_or_default()
    }

    #[test]
    fn each_endpoint_counts_once_in_the_state_its_status_shows() {
        record("states-test", "a", Some(EndpointState::Active));
        record("states-test", "b", Some(EndpointState::Active));
        record("states-test", "b", Some(EndpointState::Failing));
        record("states-test", "c", Some(EndpointState::Paused));
        record("states-test", "d", None);
        assert_eq!(shown("active"), "1");
        assert_eq!(shown("failing"), "1");
        assert_eq!(shown("paused"), "1");
        assert_eq!(shown("disabled"), "0");
        forget("states-test", "b");
        record("states-test", "c", None);
        assert_eq!(shown("failing"), "0");
        assert_eq!(shown("paused"), "0");
        assert_eq!(shown("active"), "1");
    }
}
