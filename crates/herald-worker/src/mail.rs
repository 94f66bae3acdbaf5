//! The mail worker: tells an endpoint's owner that it keeps failing.
//!
//! SMTP failures are retried with the mail schedule (nak with delay); a
//! permanent SMTP refusal or the last attempt records the mail as failed in
//! the task's history, so nothing disappears silently.

use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use herald_core::{
    metrics::{Metrics, metrics},
    payload::{MailJob, MailOutcome, MailReason, TaskEvent, decode},
    redact::RedactedUrl,
    schedule::RetrySchedule,
};
use herald_queue::{
    Broker,
    consume::{MessageHandler, delivery_count},
    publish::Outgoing,
    trace_context::{self, KeyValue, SpanKind, Status, TraceSpan},
};
use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message as Email, Tokio1Executor,
    message::{Mailbox, header::ContentType},
    transport::smtp::{PoolConfig, authentication::Credentials},
};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpSecurity {
    /// Plain SMTP; for a local mail sink only.
    None,
    /// Upgrade with STARTTLS (port 587).
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// `Debug` is written by hand: it shows whether a password is set, never
/// the password.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailConfig {
    pub smtp_host: String,
    pub smtp_port: u16,
    pub security: SmtpSecurity,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Sender address, e.g. `Herald <herald@example.com>`.
    pub from: String,
    /// Pooled SMTP connections per process.
    pub pool_size: u32,
    #[serde(with = "herald_core::duration_serde")]
    pub timeout: Duration,
    /// Delays between send attempts of one mail.
    pub retry_schedule: RetrySchedule,
    /// Mails sent at once by one process.
    pub concurrency: usize,
}

impl std::fmt::Debug for MailConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailConfig")
            .field("smtp_host", &self.smtp_host)
            .field("smtp_port", &self.smtp_port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("from", &self.from)
            .field("pool_size", &self.pool_size)
            .field("timeout", &self.timeout)
            .field("retry_schedule", &self.retry_schedule)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

impl Default for MailConfig {
    fn default() -> Self {
        Self {
            smtp_host: "127.0.0.1".into(),
            smtp_port: 1025,
            security: SmtpSecurity::None,
            username: None,
            password: None,
            from: "Herald <herald@localhost>".into(),
            pool_size: 4,
            timeout: Duration::from_secs(30),
            retry_schedule: RetrySchedule::new(
                [10, 60, 300, 1800, 3600]
                    .into_iter()
                    .map(Duration::from_secs)
                    .collect(),
            )
            .expect("the default mail schedule is short"),
            concurrency: 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MailSetupError {
    #[error("mail.from {0:?} is not a mailbox: {1}")]
    From(String, String),
    #[error("SMTP relay {0:?}: {1}")]
    Relay(String, String),
}

impl MailConfig {
    pub fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, MailSetupError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let relay_error = |e: lettre::transport::smtp::Error| {
            MailSetupError::Relay(self.smtp_host.clone(), e.to_string())
        };
        let mut builder = match self.security {
            SmtpSecurity::None => {
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&self.smtp_host)
            }
            SmtpSecurity::Starttls => {
                AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&self.smtp_host)
                    .map_err(relay_error)?
            }
            SmtpSecurity::Tls => {
                AsyncSmtpTransport::<Tokio1Executor>::relay(&self.smtp_host).map_err(relay_error)?
            }
        }
        .port(self.smtp_port)
        .timeout(Some(self.timeout))
        .pool_config(PoolConfig::new().max_size(self.pool_size));
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(builder.build())
    }

    pub fn from_mailbox(&self) -> Result<Mailbox, MailSetupError> {
        self.from
            .parse()
            .map_err(|e: lettre::address::AddressError| {
                MailSetupError::From(self.from.clone(), e.to_string())
            })
    }
}

pub struct MailWorker {
    broker: Broker,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    schedule: RetrySchedule,
}

impl MailWorker {
    pub fn new(broker: Broker, config: &MailConfig) -> Result<Self, MailSetupError> {
        Ok(Self {
            broker,
            transport: config.transport()?,
            from: config.from_mailbox()?,
            schedule: config.retry_schedule.clone(),
        })
    }

    async fn send(&self, job: &MailJob) -> Result<(), SendFailure> {
        let to: Mailbox = job
            .to
            .parse()
            .map_err(|e| SendFailure::Permanent(format!("bad recipient {:?}: {e}", job.to)))?;
        let email = Email::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject(job))
            .header(ContentType::TEXT_PLAIN)
            .body(body(job))
            .map_err(|e| SendFailure::Permanent(e.to_string()))?;
        match self.transport.send(email).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(SendFailure::Permanent(e.to_string())),
            Err(e) => Err(SendFailure::Transient(e.to_string())),
        }
    }

    async fn record(
        &self,
        message: &Message,
        job: &MailJob,
        attempt: u32,
        error: Option<String>,
        ack: AckKind,
    ) {
        let event = Outgoing::task_event(
            &job.user,
            &job.task,
            TaskEvent::Mail(MailOutcome {
                endpoint: job.endpoint.clone(),
                reason: Some(job.reason),
                to: job.to.clone(),
                attempt,
                at_ms: herald_core::now_ms(),
                sent: error.is_none(),
                error,
                redelivery: job.redelivery.clone(),
            }),
        );
        match self.broker.publish(event).await {
            Ok(_) => {
                let _ = message.ack_with(ack).await;
            }
            Err(e) => {
                tracing::warn!(task = %job.task, error = %e, "could not record the mail outcome; retrying");
                // Nak with a short delay; the outcome must be recorded.
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }
}

enum SendFailure {
    Transient(String),
    Permanent(String),
}

/// The endpoint's URL as a mail shows it: redacted, since mails are read
/// and forwarded by more people than the owner. Workers queue jobs with it
/// redacted already; a job queued by an older version is redacted here.
fn shown_url(job: &MailJob) -> RedactedUrl {
    RedactedUrl::from_text_or_redacted(&job.url)
}

fn subject(job: &MailJob) -> String {
    let url = shown_url(job);
    match job.reason {
        MailReason::AttemptsExhausted => format!("Webhook deliveries to {url} are failing"),
        MailReason::EndpointGone => format!("Webhook endpoint {url} answered 410 Gone"),
        MailReason::EndpointDisabled => format!("Webhook endpoint {url} is disabled"),
        MailReason::EndpointRecovered => format!("Webhook endpoint {url} has recovered"),
    }
}

fn body(job: &MailJob) -> String {
    let what = match job.reason {
        MailReason::AttemptsExhausted => format!(
            "Herald could not deliver a webhook to your endpoint after {} attempts.",
            job.attempts
        ),
        MailReason::EndpointGone => {
            "Your endpoint answered 410 Gone, so Herald stopped retrying this webhook and \
             disabled the endpoint."
                .to_string()
        }
        MailReason::EndpointDisabled => format!(
            "Your endpoint kept failing, so Herald disabled it. New webhooks for it are kept, \
             not sent; once it works again, enable it with \
             POST /users/{}/endpoints/{}/enable, which also re-sends what was kept.",
            job.user, job.endpoint
        ),
        MailReason::EndpointRecovered => {
            "Your endpoint accepted a webhook again after failing; deliveries continue normally."
                .to_string()
        }
    };
    format!(
        "Hello,\n\n\
         {what}\n\n\
         Endpoint URL: {url}\n\
         Endpoint:     {endpoint}\n\
         Task id:      {task}\n\
         Attempts:     {attempts}\n\
         Last error:   {error}\n\
         Failed at:    {at}\n\n\
         What to do:\n\
         - Check that the endpoint is up and answers 2xx to a POST within its timeout.\n\
         - Check that it does not redirect (Herald does not follow redirects).\n\
         - Then look at the task's attempts with GET /users/{user}/tasks/{task}.\n\n\
         -- Herald\n",
        url = shown_url(job),
        endpoint = job.endpoint,
        task = job.task,
        attempts = job.attempts,
        error = if job.last_error.is_empty() {
            "(none)"
        } else {
            &job.last_error
        },
        at = herald_core::rfc3339(job.failed_at_ms),
        user = job.user,
    )
}

#[async_trait::async_trait]
impl MessageHandler for MailWorker {
    async fn handle(&self, message: Message) {
        let job: MailJob = match decode(&message.payload) {
            Ok(job) => job,
            Err(e) => {
                tracing::error!(subject = %message.subject, error = %e, "terminating unreadable mail job");
                // Term: it will never parse; retrying is pointless.
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let trace = TraceSpan::for_message(
            || format!("mail {}", job.reason.as_str()),
            SpanKind::Client,
            message.headers.as_ref(),
            || {
                vec![
                    KeyValue::new("herald.task", job.task.to_string()),
                    KeyValue::new("herald.endpoint", job.endpoint.to_string()),
                    KeyValue::new("herald.mail_reason", job.reason.as_str()),
                    KeyValue::new("herald.attempt", i64::from(delivery_count(&message))),
                ]
            },
        );
        let span = tracing::info_span!("mail", task = %job.task, endpoint = %job.endpoint);
        trace
            .run(self.send_mail(message, job))
            .instrument(span)
            .await
    }
}

impl MailWorker {
    /// [`MessageHandler::handle`], in the mail's span.
    async fn send_mail(&self, message: Message, job: MailJob) {
        let attempt = delivery_count(&message);
        let sent = self.send(&job).await;
        let outcome = match &sent {
            Ok(()) => "sent",
            Err(SendFailure::Transient(_)) if self.schedule.delay_after(attempt).is_some() => {
                "retrying"
            }
            Err(_) => "failed",
        };
        trace_context::with_current(|span| {
            span.set_attribute(KeyValue::new("herald.outcome", outcome));
            if outcome != "sent" {
                span.set_status(Status::error(""));
            }
        });
        match sent {
            Ok(()) => {
                Metrics::count(&metrics().mails, "sent");
                tracing::info!(task = %job.task, to = %job.to, "failure mail sent");
                // Ack once the outcome is recorded.
                self.record(&message, &job, attempt, None, AckKind::Ack)
                    .await;
            }
            Err(SendFailure::Transient(error)) if self.schedule.delay_after(attempt).is_some() => {
                Metrics::count(&metrics().mails, "retrying");
                let delay = self.schedule.delay_after(attempt);
                tracing::warn!(task = %job.task, %error, ?delay, "mail not sent; retrying");
                // Nak with the mail schedule's delay.
                let _ = message.ack_with(AckKind::Nak(delay)).await;
            }
            Err(SendFailure::Transient(error) | SendFailure::Permanent(error)) => {
                Metrics::count(&metrics().mails, "failed");
                tracing::error!(task = %job.task, to = %job.to, %error, "mail failed for good");
                // Term: recorded as failed; no further attempts.
                self.record(&message, &job, attempt, Some(error), AckKind::Term)
                    .await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{EndpointId, TaskId, UserId};

    /// The mail that ends a delivery to `url` after eight failed attempts.
    fn exhausted_job(url: &str) -> MailJob {
        MailJob {
            v: 1,
            task: TaskId::new("t-1").unwrap(),
            user: UserId::new("7").unwrap(),
            endpoint: EndpointId::new("default_hooks").unwrap(),
            url: url.into(),
            to: "ops@example.com".into(),
            reason: MailReason::AttemptsExhausted,
            attempts: 8,
            last_error: "HTTP 500".into(),
            failed_at_ms: 0,
            redelivery: None,
        }
    }

    #[test]
    fn the_mail_names_everything_the_owner_needs() {
        let job = exhausted_job("https://example.com/hooks");
        let text = body(&job);
        for needle in [
            "https://example.com/…#",
            "t-1",
            "8 attempts",
            "HTTP 500",
            "What to do",
        ] {
            assert!(text.contains(needle), "mail body lacks {needle:?}:\n{text}");
        }
        assert!(subject(&job).contains("https://example.com/…#"));
    }

    #[test]
    fn a_url_secret_reaches_neither_subject_nor_body() {
        let job = exhausted_job("https://u:pw@hooks.slack.com/services/T0/B0/SECRET?token=SECRET");
        for text in [subject(&job), body(&job)] {
            assert!(text.contains("https://hooks.slack.com/…#"), "{text}");
            for secret in ["SECRET", "services", "pw@"] {
                assert!(!text.contains(secret), "{secret} in {text}");
            }
        }
    }

    #[test]
    fn debug_never_shows_the_smtp_password() {
        let config = MailConfig {
            username: Some("herald".into()),
            password: Some("hunter2-SMTP".into()),
            ..Default::default()
        };
        for text in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(!text.contains("hunter2-SMTP"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
            assert!(text.contains("herald"), "{text}");
        }
    }
}
