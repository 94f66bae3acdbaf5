//! The streams, consumers and buckets of DESIGN.md, created or updated
//! idempotently at start-up by every role.

use std::time::Duration;

use async_nats::jetstream::{
    consumer, kv,
    stream::{self, RetentionPolicy, StorageType},
};
use herald_core::names;
use serde::{Deserialize, Serialize};

use crate::{Broker, QueueError, backoff::Backoff};

/// Sizes and limits of the JetStream objects; from Herald's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologyConfig {
    /// Stream and bucket replicas: 1 on a laptop, 3 in a cluster.
    pub replicas: usize,
    /// `file` (durable) or `memory`.
    pub storage: Storage,
    /// Window in which a repeated `Nats-Msg-Id` is dropped as a duplicate.
    #[serde(with = "herald_core::duration_serde")]
    pub duplicate_window: Duration,
    /// How long a publish keeps trying while NATS fails over (a reconnect
    /// to another server, a stream electing a new leader) before giving up:
    /// a POST then answers 503, a worker takes its message up again later.
    /// Every try carries the same `Nats-Msg-Id`, so it must be shorter than
    /// `duplicate_window`.
    #[serde(with = "herald_core::duration_serde")]
    pub store_timeout: Duration,
    /// How long task history (attempts, mail outcomes) is kept.
    #[serde(with = "herald_core::duration_serde")]
    pub attempts_max_age: Duration,
    /// How long a task's record is kept in `herald-tasks`.
    #[serde(with = "herald_core::duration_serde")]
    pub task_records_max_age: Duration,
    /// Largest message a stream accepts (task inputs are limited below it).
    pub max_message_bytes: i32,
    /// Bytes each work-queue stream may hold before publishes are refused.
    pub max_stream_bytes: i64,
    /// How long a worker may hold a message without acking or reporting
    /// progress before JetStream redelivers it.
    #[serde(with = "herald_core::duration_serde")]
    pub ack_wait: Duration,
    /// Safety net above every retry schedule: deliveries after which
    /// JetStream gives up on a message (Herald turns it into a mail job).
    pub max_deliver: i64,
    /// Messages a consumer may have delivered and not yet acked, across all
    /// replicas of a worker. Messages waiting out a retry delay count.
    pub max_ack_pending: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    File,
    Memory,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        Self {
            replicas: 1,
            storage: Storage::File,
            duplicate_window: Duration::from_secs(120),
            store_timeout: Duration::from_secs(10),
            attempts_max_age: Duration::from_secs(30 * 24 * 3600),
            task_records_max_age: Duration::from_secs(30 * 24 * 3600),
            max_message_bytes: 2 * 1024 * 1024,
            max_stream_bytes: -1,
            ack_wait: Duration::from_secs(60),
            max_deliver: 60,
            max_ack_pending: 50_000,
        }
    }
}

impl TopologyConfig {
    fn storage(&self) -> StorageType {
        match self.storage {
            Storage::File => StorageType::File,
            Storage::Memory => StorageType::Memory,
        }
    }

    fn work_queue(&self, name: &str, subjects: &str) -> stream::Config {
        stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.to_string()],
            retention: RetentionPolicy::WorkQueue,
            storage: self.storage(),
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            max_message_size: self.max_message_bytes,
            max_bytes: self.max_stream_bytes,
            allow_direct: true,
            ..Default::default()
        }
    }

    fn streams(&self) -> Vec<stream::Config> {
        vec![
            // Replay requests wait beside the tasks: the task worker, which
            // alone builds delivery jobs from task records, carries them out.
            stream::Config {
                subjects: TASKS_CONSUMER_SUBJECTS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                ..self.work_queue(names::TASKS_STREAM, names::TASKS_SUBJECTS)
            },
            // Retries wait in the same stream as message schedules, outside
            // the consumer's filter: a dead endpoint's backlog is stored,
            // not pending, so it cannot fill `max_ack_pending`.
            stream::Config {
                subjects: vec![
                    names::WEBHOOKS_SUBJECTS.to_string(),
                    names::RETRIES_SUBJECTS.to_string(),
                ],
                allow_message_schedules: true,
                ..self.work_queue(names::WEBHOOKS_STREAM, names::WEBHOOKS_SUBJECTS)
            },
            self.work_queue(names::MAIL_STREAM, names::MAIL_SUBJECTS),
            // Created with the others, before any consumer that can reach
            // max_deliver: no advisory is published while nothing stores it.
            stream::Config {
                subjects: ADVISORY_CONSUMERS
                    .iter()
                    .map(|(_, stream, consumer)| {
                        names::max_deliveries_advisory_subject(stream, consumer)
                    })
                    .collect(),
                ..self.work_queue(names::ADVISORIES_STREAM, "")
            },
            stream::Config {
                name: names::ATTEMPTS_STREAM.to_string(),
                subjects: vec![names::ATTEMPTS_SUBJECTS.to_string()],
                retention: RetentionPolicy::Limits,
                storage: self.storage(),
                num_replicas: self.replicas,
                max_age: self.attempts_max_age,
                duplicate_window: self.duplicate_window,
                allow_direct: true,
                ..Default::default()
            },
        ]
    }

    fn consumer(&self, name: &str, subjects: &[&str]) -> consumer::pull::Config {
        // One subject stays `filter_subject`, as consumers were created
        // before replay requests existed; several (the tasks consumer) go
        // in `filter_subjects`, which an update sets in place.
        let (filter_subject, filter_subjects) = match subjects {
            [one] => (one.to_string(), Vec::new()),
            several => (
                String::new(),
                several.iter().map(|s| s.to_string()).collect(),
            ),
        };
        consumer::pull::Config {
            durable_name: Some(name.to_string()),
            filter_subject,
            filter_subjects,
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            max_ack_pending: self.max_ack_pending,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    fn buckets(&self) -> Vec<kv::Config> {
        let bucket = |name: &str, history: i64, max_age: Duration| kv::Config {
            bucket: name.to_string(),
            history,
            max_age,
            storage: self.storage(),
            num_replicas: self.replicas,
            ..Default::default()
        };
        vec![
            bucket(names::ENDPOINTS_BUCKET, 1, Duration::ZERO),
            bucket(names::TASKS_BUCKET, 1, self.task_records_max_age),
            bucket(names::HEALTH_BUCKET, 1, Duration::ZERO),
            // An idle endpoint's entry may expire: a reservation time in the
            // past means the same as none.
            bucket(names::RATE_LIMITS_BUCKET, 1, Duration::from_secs(3600)),
        ]
    }
}

/// What the `tasks` consumer takes (and `HERALD_TASKS` holds): tasks and
/// replay requests.
const TASKS_CONSUMER_SUBJECTS: &[&str] = &[names::TASKS_SUBJECTS, names::REPLAYS_SUBJECTS];

/// The consumer of each work-queue stream and the subjects it takes.
pub const CONSUMERS: [(&str, &str, &[&str]); 3] = [
    (
        names::TASKS_STREAM,
        names::TASKS_CONSUMER,
        TASKS_CONSUMER_SUBJECTS,
    ),
    (
        names::WEBHOOKS_STREAM,
        names::WEBHOOKS_CONSUMER,
        &[names::WEBHOOKS_SUBJECTS],
    ),
    (
        names::MAIL_STREAM,
        names::MAIL_CONSUMER,
        &[names::MAIL_SUBJECTS],
    ),
];

/// The consumers of `HERALD_ADVISORIES`, each taking the MAX_DELIVERIES
/// advisories of one work-queue consumer: (its name, that stream, that
/// consumer).
pub const ADVISORY_CONSUMERS: [(&str, &str, &str); 3] = [
    (
        names::TASKS_MAX_DELIVERIES_CONSUMER,
        names::TASKS_STREAM,
        names::TASKS_CONSUMER,
    ),
    (
        names::WEBHOOKS_MAX_DELIVERIES_CONSUMER,
        names::WEBHOOKS_STREAM,
        names::WEBHOOKS_CONSUMER,
    ),
    (
        names::MAIL_MAX_DELIVERIES_CONSUMER,
        names::MAIL_STREAM,
        names::MAIL_CONSUMER,
    ),
];

impl TopologyConfig {
    /// An advisory consumer never gives up (`max_deliver` -1): an advisory
    /// that cannot be handled yet is retried until it can, and never causes
    /// an advisory of its own.
    fn advisory_consumer(&self, name: &str, subject: String) -> consumer::pull::Config {
        consumer::pull::Config {
            max_deliver: -1,
            ..self.consumer(name, &[&subject])
        }
    }
}

/// Creates or updates every stream, consumer and bucket. Safe to run from
/// any number of processes at once.
pub async fn ensure(broker: &Broker, config: &TopologyConfig) -> Result<(), QueueError> {
    let js = &broker.jetstream;
    for stream in config.streams() {
        js.create_or_update_stream(stream)
            .await
            .map_err(|e| QueueError::request("create stream", e))?;
    }
    for (stream, name, subjects) in CONSUMERS {
        let stream = js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| QueueError::request("get stream", e))?;
        ensure_consumer(&stream, config.consumer(name, subjects)).await?;
    }
    let advisories = js
        .get_stream_no_info(names::ADVISORIES_STREAM)
        .await
        .map_err(|e| QueueError::request("get stream", e))?;
    for (name, stream, consumer) in ADVISORY_CONSUMERS {
        let subject = names::max_deliveries_advisory_subject(stream, consumer);
        ensure_consumer(&advisories, config.advisory_consumer(name, subject)).await?;
    }
    for bucket in config.buckets() {
        js.create_or_update_key_value(bucket)
            .await
            .map_err(|e| QueueError::request("create bucket", e))?;
    }
    Ok(())
}

async fn ensure_consumer(
    stream: &stream::Stream<()>,
    wanted: consumer::pull::Config,
) -> Result<(), QueueError> {
    match stream.update_consumer(wanted.clone()).await {
        Ok(_) => Ok(()),
        Err(_) => stream
            .create_consumer(wanted)
            .await
            .map(|_| ())
            .map_err(|e| QueueError::request("create consumer", e)),
    }
}

/// Whether the streams exist; what `/readyz` asks.
pub async fn streams_exist(broker: &Broker) -> bool {
    for name in [
        names::TASKS_STREAM,
        names::WEBHOOKS_STREAM,
        names::MAIL_STREAM,
        names::ATTEMPTS_STREAM,
        names::ADVISORIES_STREAM,
    ] {
        if broker.jetstream.get_stream(name).await.is_err() {
            return false;
        }
    }
    true
}

/// Whether every stream and bucket exists: what a role that does not
/// manage the topology waits for.
pub async fn present(broker: &Broker) -> bool {
    if !streams_exist(broker).await {
        return false;
    }
    for bucket in [
        names::ENDPOINTS_BUCKET,
        names::TASKS_BUCKET,
        names::HEALTH_BUCKET,
        names::RATE_LIMITS_BUCKET,
    ] {
        if broker.jetstream.get_key_value(bucket).await.is_err() {
            return false;
        }
    }
    true
}

/// Makes sure the topology exists before a role starts: creates or updates
/// it when `manage` (`nats.manage_topology`), otherwise waits until a role
/// that may create it has (least-privilege credentials have no right to
/// create streams). Waits between tries, so a role can start before NATS
/// does; returns early if `shutdown` fires, and with
/// [`QueueError::Connect`] if the server turns this process away.
pub async fn prepare(
    broker: &Broker,
    config: &TopologyConfig,
    manage: bool,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<(), QueueError> {
    let mut backoff = Backoff::new();
    loop {
        if manage {
            match ensure(broker, config).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff.delay(), "JetStream topology not ready")
                }
            }
        } else if present(broker).await {
            return Ok(());
        } else {
            tracing::info!(
                retry_in = ?backoff.delay(),
                "waiting for the JetStream topology (nats.manage_topology is false: another role creates it)"
            );
        }
        if let Some(refused) = broker.refused().await {
            return Err(refused.into());
        }
        if !backoff.wait(shutdown).await {
            return Err(QueueError::Disconnected);
        }
    }
}
