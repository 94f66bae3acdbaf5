//! Phase 5, record and settle: the messages that record what happened
//! (the attempt in the task's history, the next attempt as a message
//! schedule, the owner's mail job), the endpoint's health and the metrics;
//! then the delivery message is settled, only after the records are
//! stored ([`settle`]).
//!
//! The next attempt is not a nak with delay: it is published as a JetStream
//! message schedule on `herald.retries.<user>.<endpoint>.<task>` that fires
//! onto the webhook subject when due, and the current message is acked. A
//! dead endpoint's backlog is then stored messages, not pending ones, and
//! cannot fill the consumer's `max_ack_pending` window that every other
//! endpoint shares. The attempt number travels in the job.

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use herald_core::health::Failure;
use herald_core::{
    TaskId,
    metrics::{Metrics, ResponseClassLabel},
    names,
    payload::{AttemptOutcome, DeliveryAttempt, DeliveryJob, MailJob, MailReason, TaskEvent},
    redact::RedactedUrl,
};
use herald_queue::{Broker, publish::Outgoing};

use super::{WebhookWorker, classify::ResponseClass, decide::Decision, request::Response};

/// Why a delivery job is stored again as a message schedule. The reason
/// sets what the job carries and its `Nats-Msg-Id` ([`Again::msg_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Again {
    /// The attempt after the one just made, with this number.
    NextAttempt(u32),
    /// Handed back without a request (the endpoint paused, busy, missing
    /// or waiting for its rate-limit slot; the worker shutting down):
    /// attempt number `attempt` again, and the rate-limit slot it was
    /// deferred to, if that is why.
    HandBack {
        attempt: u32,
        rate_slot_ms: Option<u64>,
    },
}

impl Again {
    fn attempt(self) -> u32 {
        match self {
            Again::NextAttempt(attempt) | Again::HandBack { attempt, .. } => attempt,
        }
    }

    /// The `Nats-Msg-Id` of a job stored again to fire at `at_ms`. The next
    /// attempt has one id, so a worker repeating its work after a lost ack
    /// cannot schedule it twice. A hand-back keeps the attempt number and
    /// may happen many times; its time keeps each one's id apart.
    fn msg_id(self, job: &DeliveryJob, at_ms: u64) -> String {
        let attempt_id = names::attempt_msg_id(
            &job.task,
            &job.endpoint,
            job.redelivery.as_deref(),
            self.attempt(),
        );
        match self {
            Again::NextAttempt(_) => attempt_id,
            Again::HandBack { .. } => format!("{attempt_id}.{at_ms}"),
        }
    }
}

/// `job` again, as a message schedule that fires onto its webhook subject
/// at `at_ms`, carrying what `again` says.
pub(super) fn store_again(job: &DeliveryJob, at_ms: u64, again: Again) -> Outgoing {
    let rate_slot_ms = match again {
        Again::NextAttempt(_) => None,
        Again::HandBack { rate_slot_ms, .. } => rate_slot_ms,
    };
    let next = DeliveryJob {
        attempt: again.attempt(),
        rate_slot_ms,
        // Taken up later than the watch that vouches for a carried record
        // remembers, most often: read from the bucket then.
        record: None,
        ..job.clone()
    };
    Outgoing::delivery_at(&next, at_ms, again.msg_id(job, at_ms))
}

/// One attempt of a delivery, as its records tell it.
pub(super) struct Attempt<'a> {
    pub job: &'a DeliveryJob,
    /// The endpoint's URL; empty when its record is gone.
    pub url: &'a str,
    pub number: u32,
    pub at_ms: u64,
}

impl Attempt<'_> {
    /// The attempt in the task's history.
    pub(super) fn event(
        &self,
        outcome: AttemptOutcome,
        response: Option<&Response>,
        next_delay: Option<Duration>,
    ) -> Outgoing {
        let job = self.job;
        let msg_id = names::attempt_record_msg_id(
            &job.task,
            &job.endpoint,
            job.redelivery.as_deref(),
            self.number,
            self.at_ms,
        );
        Outgoing::task_event_once(
            &job.user,
            &job.task,
            TaskEvent::Delivery(DeliveryAttempt {
                endpoint: job.endpoint.clone(),
                url: shown_url(self.url),
                attempt: self.number,
                at_ms: self.at_ms,
                outcome,
                status: response.and_then(|r| r.status).map(|s| s.as_u16()),
                latency_ms: response.map(|r| r.latency.as_millis() as u64).unwrap_or(0),
                error: response.and_then(|r| r.error.clone()),
                response_body: response.and_then(|r| r.body.clone()),
                next_attempt_in_ms: next_delay.map(|d| d.as_millis() as u64),
                redelivery: job.redelivery.clone(),
            }),
            msg_id,
        )
    }

    /// What records a request that got `response` and led to `decision`:
    /// the attempt, then the next attempt if there is one, then the mail
    /// to `email` if the decision mails the owner.
    pub(super) fn records(
        &self,
        response: &Response,
        decision: &Decision,
        email: Option<&str>,
    ) -> Vec<Outgoing> {
        let mut outgoing = vec![self.event(decision.outcome, Some(response), decision.next_delay)];
        if let Some(delay) = decision.next_delay {
            outgoing.push(store_again(
                self.job,
                self.at_ms + delay.as_millis() as u64,
                Again::NextAttempt(self.number + 1),
            ));
        }
        if let Some(email) = email
            && decision.mails_owner
        {
            outgoing.push(self.mail(email, decision.outcome, response));
        }
        outgoing
    }

    fn mail(&self, email: &str, outcome: AttemptOutcome, response: &Response) -> Outgoing {
        let reason = if outcome == AttemptOutcome::Gone {
            MailReason::EndpointGone
        } else {
            MailReason::AttemptsExhausted
        };
        let mail = MailJob::ending_delivery(
            self.job,
            reason,
            email.to_string(),
            shown_url(self.url),
            self.number,
            response.error.clone().unwrap_or_default(),
            self.at_ms,
        );
        Outgoing::mail(&mail, mail.ending_delivery_msg_id())
    }
}

/// An endpoint URL as records and mails show it: redacted
/// ([`RedactedUrl`]), empty when there is none (endpoint removed).
fn shown_url(url: &str) -> String {
    if url.is_empty() {
        return String::new();
    }
    RedactedUrl::from_text(url).to_string()
}

impl WebhookWorker {
    /// The attempt in its endpoint's health (which disables an endpoint
    /// that keeps failing) and in the metrics.
    pub(super) fn record_health(
        &self,
        job: &DeliveryJob,
        response: &Response,
        decision: &Decision,
        at_ms: u64,
    ) {
        match decision.outcome {
            AttemptOutcome::Delivered => {
                self.health
                    .record_success(&job.user, &job.endpoint, &job.task, at_ms)
            }
            outcome => {
                if outcome == AttemptOutcome::Abandoned {
                    tracing::warn!(endpoint = %job.endpoint, task = %job.task, "delivery failed for good and the endpoint has no email to notify");
                }
                self.health.record_failure(Failure {
                    user: &job.user,
                    endpoint: &job.endpoint,
                    task: &job.task,
                    at_ms,
                    error: response.error.as_deref().unwrap_or("failed"),
                    gone: decision.class == ResponseClass::Gone,
                    owner_notified: decision.mails_owner,
                });
            }
        }
        let metrics = herald_core::metrics::metrics();
        Metrics::count(&metrics.webhook_attempts, decision.outcome.as_str());
        metrics
            .webhook_responses
            .get_or_create(&ResponseClassLabel {
                class: response.class_label(),
            })
            .inc();
        if decision.outcome != AttemptOutcome::Retrying {
            Metrics::count(&metrics.deliveries, decision.outcome.as_str());
        }
        metrics
            .webhook_duration
            .observe(response.latency.as_secs_f64());
    }
}

/// Stores `records` (publish, through a NATS failover: the request was
/// made, and a job taken up again would make it twice), then settles
/// `message` with `ack`. If storing fails, the job is retried shortly
/// instead, so no outcome is lost.
pub(super) async fn settle(
    broker: &Broker,
    message: &Message,
    task: &TaskId,
    records: Vec<Outgoing>,
    ack: AckKind,
) {
    match broker.publish_all_stored(records).await {
        Ok(_) => {
            if let Err(e) = message.ack_with(ack).await {
                tracing::warn!(task = %task, error = %e, "ack failed; the job will be redelivered");
            }
        }
        Err(e) => {
            tracing::warn!(task = %task, error = %e, "could not record the attempt; retrying the job");
            // Nak with a short delay: NATS is struggling, so do not spin.
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use herald_core::payload::{TaskEventMessage, decode};
    use reqwest::StatusCode;

    use super::*;
    use crate::webhooks::tests::job;

    fn an_attempt<'a>(job: &'a DeliveryJob, url: &'a str, number: u32, at_ms: u64) -> Attempt<'a> {
        Attempt {
            job,
            url,
            number,
            at_ms,
        }
    }

    fn stored_job(outgoing: &Outgoing) -> DeliveryJob {
        decode(&outgoing.payload).unwrap()
    }

    fn attempt_of(outgoing: &Outgoing) -> DeliveryAttempt {
        match decode::<TaskEventMessage>(&outgoing.payload).unwrap().event {
            TaskEvent::Delivery(attempt) => attempt,
            other => panic!("not a delivery attempt: {other:?}"),
        }
    }

    fn failed(status: u16) -> Response {
        Response {
            status: Some(StatusCode::from_u16(status).unwrap()),
            no_response: None,
            retry_after: None,
            body: Some("down for maintenance".to_string()),
            error: Some(format!("HTTP {status}")),
            latency: Duration::from_millis(42),
        }
    }

    fn decision(outcome: AttemptOutcome, next_delay: Option<u64>, mails_owner: bool) -> Decision {
        Decision {
            class: ResponseClass::Retry {
                honour_retry_after: false,
            },
            outcome,
            next_delay: next_delay.map(Duration::from_secs),
            mails_owner,
        }
    }

    /// The msg-id rule: a worker that repeats its work (a lost ack) stores
    /// the next attempt under the same id whenever it does, so JetStream
    /// drops the copy; hand-backs, which repeat on purpose, each get their
    /// own.
    #[test]
    fn a_next_attempt_has_one_id_and_each_hand_back_its_own() {
        let job = job();
        let next = |at| store_again(&job, at, Again::NextAttempt(3)).msg_id.unwrap();
        assert_eq!(next(1_000), next(2_000));
        assert_eq!(next(1_000), format!("{}.{}.a3", job.task, job.endpoint));

        let back = |at| {
            store_again(
                &job,
                at,
                Again::HandBack {
                    attempt: 3,
                    rate_slot_ms: None,
                },
            )
            .msg_id
            .unwrap()
        };
        assert_ne!(back(1_000), back(2_000));
        assert_eq!(
            back(1_000),
            format!("{}.{}.a3.1000", job.task, job.endpoint)
        );
        // Neither collides with the other kind for the same number.
        assert_ne!(back(1_000), next(1_000));

        // A redelivery round keeps its ids apart from the original's.
        let round = DeliveryJob {
            redelivery: Some("r1".to_string()),
            ..job.clone()
        };
        let in_round = store_again(&round, 1_000, Again::NextAttempt(3));
        assert_eq!(
            in_round.msg_id.unwrap(),
            format!("{}.{}.r1.a3", job.task, job.endpoint)
        );
        assert_eq!(
            in_round.subject,
            format!(
                "herald.retries.{}.{}.{}.r1",
                job.user, job.endpoint, job.task
            )
        );
    }

    #[test]
    fn a_stored_job_fires_onto_its_webhook_subject_carrying_its_number() {
        let job = DeliveryJob {
            attempt: 2,
            rate_slot_ms: Some(500),
            endpoint_missing_since_ms: Some(77),
            ..job()
        };
        let next = store_again(&job, 9_000, Again::NextAttempt(3));
        let schedule = next.schedule.as_ref().unwrap();
        assert_eq!(
            schedule.target,
            format!("herald.webhooks.{}.{}", job.user, job.endpoint)
        );
        assert_eq!(schedule.at_ms, 9_000);
        assert_eq!(
            next.subject,
            format!("herald.retries.{}.{}.{}", job.user, job.endpoint, job.task)
        );
        let stored = stored_job(&next);
        assert_eq!(stored.attempt, 3);
        // A slot belongs to the attempt it was reserved for.
        assert_eq!(stored.rate_slot_ms, None);
        assert_eq!(stored.endpoint_missing_since_ms, Some(77));
        assert_eq!(stored.body, job.body);

        let back = store_again(
            &job,
            9_000,
            Again::HandBack {
                attempt: 2,
                rate_slot_ms: Some(9_000),
            },
        );
        let stored = stored_job(&back);
        assert_eq!(stored.attempt, 2);
        assert_eq!(stored.rate_slot_ms, Some(9_000));
    }

    #[test]
    fn an_attempt_record_is_stored_once_however_often_it_is_sent() {
        let job = job();
        let record = |number, at_ms| {
            an_attempt(&job, "https://hooks.example.com/in", number, at_ms)
                .event(AttemptOutcome::Delivered, None, None)
                .msg_id
                .expect("an attempt record carries a Nats-Msg-Id")
        };
        assert_eq!(record(1, 5_000), record(1, 5_000), "sent again: one record");
        assert_ne!(
            record(1, 5_000),
            record(1, 6_000),
            "the same attempt made again after a lost ack is a second try, recorded as such"
        );
        assert_ne!(record(1, 5_000), record(2, 5_000));
    }

    #[test]
    fn a_retry_records_the_attempt_and_schedules_the_next() {
        let job = job();
        let attempt = an_attempt(
            &job,
            "https://user:pw@hooks.example.com/in?token=s3cret",
            2,
            1_000_000,
        );
        let records = attempt.records(
            &failed(503),
            &decision(AttemptOutcome::Retrying, Some(60), false),
            Some("owner@example.com"),
        );
        assert_eq!(records.len(), 2, "{records:?}");
        let recorded = attempt_of(&records[0]);
        assert_eq!(recorded.outcome, AttemptOutcome::Retrying);
        assert_eq!(recorded.attempt, 2);
        assert_eq!(recorded.at_ms, 1_000_000);
        assert_eq!(recorded.status, Some(503));
        assert_eq!(recorded.latency_ms, 42);
        assert_eq!(recorded.error.as_deref(), Some("HTTP 503"));
        assert_eq!(
            recorded.response_body.as_deref(),
            Some("down for maintenance")
        );
        assert_eq!(recorded.next_attempt_in_ms, Some(60_000));
        // The URL is shown redacted: no password, no query.
        assert!(!recorded.url.contains("pw"), "{}", recorded.url);
        assert!(!recorded.url.contains("s3cret"), "{}", recorded.url);
        assert_eq!(
            records[0].subject,
            format!("herald.attempts.{}.{}", job.user, job.task)
        );

        let next = &records[1];
        assert_eq!(next.schedule.as_ref().unwrap().at_ms, 1_060_000);
        assert_eq!(stored_job(next).attempt, 3);
    }

    #[test]
    fn an_end_that_mails_stores_the_mail_with_the_attempt() {
        let job = job();
        let attempt = an_attempt(&job, "https://hooks.example.com/in?token=s3cret", 8, 5_000);
        for (outcome, reason) in [
            (AttemptOutcome::Exhausted, MailReason::AttemptsExhausted),
            (AttemptOutcome::Gone, MailReason::EndpointGone),
        ] {
            let records = attempt.records(
                &failed(410),
                &decision(outcome, None, true),
                Some("owner@example.com"),
            );
            assert_eq!(records.len(), 2, "{records:?}");
            assert_eq!(attempt_of(&records[0]).outcome, outcome);
            let mail: MailJob = decode(&records[1].payload).unwrap();
            assert_eq!(mail.reason, reason);
            assert_eq!(mail.to, "owner@example.com");
            assert_eq!(mail.attempts, 8);
            assert_eq!(mail.last_error, "HTTP 410");
            assert_eq!(mail.failed_at_ms, 5_000);
            assert!(!mail.url.contains("s3cret"), "{}", mail.url);
            assert_eq!(
                records[1].msg_id.as_deref(),
                Some(format!("{}.{}.mail", job.task, job.endpoint).as_str())
            );
            assert_eq!(records[1].subject, format!("herald.mail.{}", job.user));
        }
    }

    /// Delivered, or an end that mails nobody: the attempt alone.
    #[test]
    fn an_end_without_a_mail_is_the_attempt_alone() {
        let job = job();
        let attempt = an_attempt(&job, "https://hooks.example.com/in", 1, 5_000);
        for (outcome, email) in [
            (AttemptOutcome::Delivered, Some("owner@example.com")),
            (AttemptOutcome::Abandoned, None),
        ] {
            let records = attempt.records(&failed(500), &decision(outcome, None, false), email);
            assert_eq!(records.len(), 1, "{outcome:?}");
            assert_eq!(attempt_of(&records[0]).outcome, outcome);
        }
    }

    /// A record for an endpoint that is gone shows no URL at all, rather
    /// than "<unparseable url>".
    #[test]
    fn a_removed_endpoint_s_record_shows_no_url() {
        let job = job();
        let removed =
            an_attempt(&job, "", 1, 5_000).event(AttemptOutcome::EndpointRemoved, None, None);
        let recorded = attempt_of(&removed);
        assert_eq!(recorded.url, "");
        assert_eq!(recorded.outcome, AttemptOutcome::EndpointRemoved);
        assert_eq!(recorded.status, None);
        assert_eq!(recorded.latency_ms, 0);
    }
}
