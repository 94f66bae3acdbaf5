//! What the status says: the state from the health the webhook workers
//! record, the `Ready` and `Healthy` conditions, and an Event when either
//! changes.

use herald_core::{payload::EndpointHealth, redact::RedactedUrl};
use herald_crd::{EndpointState, WebhookEndpoint, WebhookEndpointStatus};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Resource,
    runtime::events::{Event, EventType},
};

use super::{Context, Problem};

/// `Ready` (the record was written, or `problem` says why not) and
/// `Healthy` (from `new`'s delivery state), each keeping `old`'s
/// transition time where it did not change.
pub(super) fn conditions(
    old: &WebhookEndpointStatus,
    new: &WebhookEndpointStatus,
    problem: Option<&Problem>,
) -> Vec<Condition> {
    let ready = match problem {
        None => condition(
            old,
            "Ready",
            true,
            "Synced",
            "the endpoint is in herald-endpoints",
        ),
        Some(problem) => condition(old, "Ready", false, problem.reason, &problem.message),
    };
    let healthy = match new.state {
        Some(EndpointState::Failing) => condition(
            old,
            "Healthy",
            false,
            "DeliveriesFailing",
            &format!(
                "{} consecutive failed attempts",
                new.consecutive_failures.unwrap_or(0)
            ),
        ),
        Some(EndpointState::Disabled) => {
            condition(old, "Healthy", false, "Disabled", "deliveries are disabled")
        }
        _ => condition(
            old,
            "Healthy",
            true,
            "Delivering",
            "no failed attempts since the last success",
        ),
    };
    vec![ready, healthy]
}

/// State, last delivery, failing since and failures, from the record the
/// webhook workers keep.
pub(super) fn reflect_health(
    status: &mut WebhookEndpointStatus,
    paused: bool,
    health: Option<&EndpointHealth>,
) {
    let failures = health.map_or(0, |h| h.consecutive_failures);
    status.state = Some(if paused {
        EndpointState::Paused
    } else if health.is_some_and(|h| h.disabled) {
        EndpointState::Disabled
    } else if failures > 0 {
        EndpointState::Failing
    } else {
        EndpointState::Active
    });
    status.consecutive_failures = Some(failures);
    status.last_delivery = health
        .and_then(|h| h.last_success_ms)
        .map(herald_core::rfc3339);
    status.failing_since = health
        .filter(|_| failures > 0)
        .and_then(|h| h.failing_since_ms)
        .map(herald_core::rfc3339);
}

/// A condition, keeping its transition time when its status is unchanged
/// (so an unchanged status patches nothing).
fn condition(
    old: &WebhookEndpointStatus,
    kind: &str,
    ok: bool,
    reason: &str,
    message: &str,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = old
        .conditions
        .iter()
        .find(|c| c.type_ == kind && c.status == status)
        .map_or_else(
            || Time(Timestamp::now()),
            |c| c.last_transition_time.clone(),
        );
    Condition {
        type_: kind.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time,
        observed_generation: None,
    }
}

/// Events when readiness or the delivery state changes.
pub(super) async fn publish_transitions(
    endpoint: &WebhookEndpoint,
    old: &WebhookEndpointStatus,
    new: &WebhookEndpointStatus,
    problem: Option<&Problem>,
    ctx: &Context,
) {
    let was = |kind: &str| {
        old.conditions
            .iter()
            .find(|c| c.type_ == kind)
            .map(|c| (c.status.clone(), c.reason.clone()))
    };
    let mut events = Vec::new();
    match problem {
        Some(problem) if was("Ready") != Some(("False".into(), problem.reason.into())) => {
            events.push(Event {
                type_: EventType::Warning,
                reason: problem.reason.into(),
                note: Some(problem.message.clone()),
                action: "Reconcile".into(),
                secondary: None,
            });
        }
        None if was("Ready").is_none_or(|(status, _)| status != "True") => {
            events.push(Event {
                type_: EventType::Normal,
                reason: "Synced".into(),
                note: Some(format!(
                    "delivering to {}",
                    RedactedUrl::from_text(&endpoint.spec.url)
                )),
                action: "Reconcile".into(),
                secondary: None,
            });
        }
        _ => {}
    }
    if old.state.is_some() && new.state != old.state {
        let (type_, reason) = match new.state {
            Some(EndpointState::Failing) => (EventType::Warning, "Failing"),
            Some(EndpointState::Disabled) => (EventType::Warning, "Disabled"),
            Some(EndpointState::Paused) => (EventType::Normal, "Paused"),
            _ => (EventType::Normal, "Recovered"),
        };
        events.push(Event {
            type_,
            reason: reason.into(),
            note: Some(format!(
                "state {:?} -> {:?}",
                old.state.unwrap_or(EndpointState::Active),
                new.state.unwrap_or(EndpointState::Active)
            )),
            action: "Deliver".into(),
            secondary: None,
        });
    }
    for event in events {
        if let Err(e) = ctx
            .recorder
            .publish(&event, &endpoint.object_ref(&()))
            .await
        {
            tracing::warn!(error = %e, "could not publish an event");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(failures: u64) -> EndpointHealth {
        EndpointHealth {
            v: 1,
            consecutive_failures: failures,
            failing_since_ms: (failures > 0).then_some(1_000),
            last_success_ms: Some(500),
            last_failure_ms: None,
            last_error: None,
            ..Default::default()
        }
    }

    #[test]
    fn health_becomes_state() {
        let mut status = WebhookEndpointStatus::default();
        reflect_health(&mut status, false, None);
        assert_eq!(status.state, Some(EndpointState::Active));
        assert_eq!(status.last_delivery, None);

        reflect_health(&mut status, false, Some(&health(3)));
        assert_eq!(status.state, Some(EndpointState::Failing));
        assert_eq!(status.consecutive_failures, Some(3));
        assert_eq!(
            status.failing_since.as_deref(),
            Some("1970-01-01T00:00:01Z")
        );

        reflect_health(&mut status, false, Some(&health(0)));
        assert_eq!(status.state, Some(EndpointState::Active));
        assert_eq!(status.failing_since, None);
        assert!(status.last_delivery.is_some());

        reflect_health(&mut status, true, Some(&health(3)));
        assert_eq!(status.state, Some(EndpointState::Paused));
    }

    #[test]
    fn an_unchanged_condition_keeps_its_transition_time() {
        let first = condition(
            &WebhookEndpointStatus::default(),
            "Ready",
            true,
            "Synced",
            "",
        );
        let old = WebhookEndpointStatus {
            conditions: vec![first.clone()],
            ..Default::default()
        };
        let again = condition(&old, "Ready", true, "Synced", "");
        assert_eq!(again, first);
        let flipped = condition(&old, "Ready", false, "SecretNotFound", "x");
        assert_eq!(flipped.status, "False");
    }
}
