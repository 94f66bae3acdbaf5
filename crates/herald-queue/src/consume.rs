//! The pull-consumer loop every worker runs.
//!
//! A semaphore caps the messages being handled at once, and the loop only
//! asks JetStream for as many messages as it has free slots: each pull
//! request is a bounded batch sized to the free slots, never a standing
//! prefetch. So a message this process holds is a message being worked on;
//! its `ack_wait` clock never runs while it waits in a buffer, and on
//! shutdown there is at most one batch to hand back (nak, once each) before
//! the subscription goes and the server stops sending. In-flight handlers
//! then finish within a grace period. A deleted consumer, an error or a
//! reconnect to the server starts a fresh pull instead of ending the worker.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use async_nats::jetstream::{
    AckKind, Message,
    consumer::{PullConsumer, pull::Batch},
};
use futures::StreamExt;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;

use herald_core::metrics::ConsumerLabels;

use crate::{Broker, TopologyConfig, backoff::Backoff, topology};

/// How long the server keeps an unfilled pull request. Short, because a
/// request made before a server restart is forgotten by the server and the
/// client notices only when this runs out (or on the reconnect check
/// below); an idle consumer costs one small request per period.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How often an open pull checks whether the connection was re-established.
const RECONNECT_CHECK: Duration = Duration::from_millis(250);
/// The most messages one pull request asks for.
const MAX_BATCH: usize = 256;

/// What a worker does with one message. The handler acknowledges it itself
/// (ack, nak with delay, or term), each a deliberate choice at its call site.
#[async_trait::async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    async fn handle(&self, message: Message);

    /// Returns a message received while shutting down, unhandled, so that
    /// another worker gets it now instead of after `ack_wait`. A nak
    /// without delay, unless the handler knows better (a nak makes the
    /// redelivery look like one more delivery).
    async fn hand_back(&self, message: Message) {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
}

/// Which consumer to read and how much to take on.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub stream: &'static str,
    pub consumer: &'static str,
    /// Messages handled at once by this process.
    pub concurrency: usize,
    /// How long in-flight handlers may run after shutdown begins.
    pub grace: Duration,
    /// Whether this process may recreate a missing consumer
    /// (`nats.manage_topology`); otherwise it waits for it to come back.
    pub manage_topology: bool,
}

/// How often a consuming process samples its consumer's backlog for the
/// metrics: one JetStream API request per interval and process.
const BACKLOG_SAMPLE: Duration = Duration::from_secs(10);

/// Consumes until `shutdown` fires, then drains. Meanwhile samples the
/// consumer's backlog into the metrics.
pub async fn run<H: MessageHandler>(
    broker: Broker,
    topology_config: TopologyConfig,
    settings: ConsumerSettings,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let sampling = sample_backlog(
        broker.clone(),
        settings.stream,
        settings.consumer,
        shutdown.clone(),
    );
    tokio::join!(
        consume(broker, topology_config, settings, handler, shutdown),
        sampling
    );
}

/// Sets `herald_consumer_pending_messages` and
/// `herald_consumer_ack_pending_messages` of `consumer` every
/// [`BACKLOG_SAMPLE`] until `shutdown`. A failed sample keeps the last
/// values (NATS down: the backlog is not known to be empty).
async fn sample_backlog(
    broker: Broker,
    stream: &'static str,
    consumer: &'static str,
    shutdown: CancellationToken,
) {
    let labels = ConsumerLabels { stream, consumer };
    let metrics = herald_core::metrics::metrics();
    let mut tick = tokio::time::interval(BACKLOG_SAMPLE);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let info = async {
            broker
                .stream(stream)
                .await?
                .consumer_info(consumer)
                .await
                .map_err(|e| crate::QueueError::request("consumer info", e))
        };
        match info.await {
            Ok(info) => {
                let pending = i64::try_from(info.num_pending).unwrap_or(i64::MAX);
                let ack_pending = i64::try_from(info.num_ack_pending).unwrap_or(i64::MAX);
                metrics.consumer_pending.get_or_create(&labels).set(pending);
                metrics
                    .consumer_ack_pending
                    .get_or_create(&labels)
                    .set(ack_pending);
            }
            Err(e) => tracing::debug!(consumer, error = %e, "cannot sample the backlog"),
        }
    }
}

async fn consume<H: MessageHandler>(
    broker: Broker,
    topology_config: TopologyConfig,
    settings: ConsumerSettings,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut in_flight = JoinSet::new();
    let mut backoff = Backoff::new();
    let consumer_name = settings.consumer;

    'subscribe: while !shutdown.is_cancelled() {
        let consumer = match pull_consumer(&broker, &settings).await {
            Ok(c) => c,
            Err(Lookup::NoAnswer) => {
                // A failover: the consumer's leader died and its peers are
                // electing another. Nothing to recreate; ask again soon.
                tracing::warn!(
                    consumer = consumer_name,
                    "consumer not answering (a leader election?); asking again"
                );
                if !backoff.wait(&shutdown).await {
                    break;
                }
                continue;
            }
            Err(Lookup::Failed(e)) => {
                if settings.manage_topology {
                    tracing::warn!(consumer = consumer_name, error = %e, "consumer unavailable; recreating topology");
                    let _ = topology::ensure(&broker, &topology_config).await;
                } else {
                    tracing::warn!(consumer = consumer_name, error = %e, "consumer unavailable; waiting for it");
                }
                if !backoff.wait(&shutdown).await {
                    break;
                }
                continue;
            }
        };

        loop {
            // Reap finished handlers so the set does not grow.
            while in_flight.try_join_next().is_some() {}
            let mut permits = tokio::select! {
                _ = shutdown.cancelled() => break 'subscribe,
                permits = free_slots(&slots) => permits,
            };
            let connects = broker.client.statistics().connects.load(Ordering::Relaxed);
            let mut batch = match consumer
                .batch()
                .max_messages(permits.len())
                .expires(PULL_EXPIRES)
                .messages()
                .await
            {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(consumer = consumer_name, error = %e, "cannot pull");
                    if !backoff.wait(&shutdown).await {
                        break 'subscribe;
                    }
                    continue 'subscribe;
                }
            };
            backoff.reset();
            let mut reconnect_check = tokio::time::interval(RECONNECT_CHECK);

            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => {
                        hand_back(batch, handler.as_ref(), consumer_name).await;
                        break 'subscribe;
                    }
                    _ = reconnect_check.tick() => {
                        let now = broker.client.statistics().connects.load(Ordering::Relaxed);
                        if now != connects {
                            // The server forgot this pull when the
                            // connection dropped: ask again.
                            break;
                        }
                        continue;
                    }
                    next = batch.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        let slot = permits
                            .pop()
                            .expect("a pull never returns more messages than it asked for");
                        let handler = handler.clone();
                        in_flight.spawn(async move {
                            handler.handle(message).await;
                            drop(slot);
                        });
                    }
                    Some(Err(e)) => {
                        // A status from the server (consumer deleted, leader
                        // change...): look the consumer up again.
                        tracing::warn!(consumer = consumer_name, error = %e, "pull ended with an error");
                        continue 'subscribe;
                    }
                    // Filled or expired; unused slots go back with `permits`.
                    None => break,
                }
            }
        }
    }

    tracing::info!(
        consumer = consumer_name,
        in_flight = in_flight.len(),
        "draining"
    );
    let drained = tokio::time::timeout(settings.grace, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            consumer = consumer_name,
            abandoned = in_flight.len(),
            "grace period over; unfinished messages will be redelivered after ack_wait"
        );
        in_flight.shutdown().await;
    }
}

/// Waits for one free slot, then takes every other slot free right now
/// (up to a batch): the size of the next pull.
async fn free_slots(slots: &Arc<Semaphore>) -> Vec<OwnedSemaphorePermit> {
    let first = slots
        .clone()
        .acquire_owned()
        .await
        .expect("semaphore is never closed");
    let mut permits = vec![first];
    while permits.len() < MAX_BATCH {
        match slots.clone().try_acquire_owned() {
            Ok(permit) => permits.push(permit),
            Err(_) => break,
        }
    }
    permits
}

/// Why a consumer could not be looked up.
enum Lookup {
    /// Nobody answered within [`LOOKUP_WAIT`]: while a consumer's peers
    /// elect a new leader, its requests go unanswered for a few seconds.
    NoAnswer,
    /// An answer that was not the consumer: it or its stream is missing,
    /// or the request failed.
    Failed(crate::QueueError),
}

/// How long a consumer lookup waits for its answer. A live consumer
/// answers in milliseconds; this is what one try costs during a leader
/// election, so it is well below the client's request timeout (which
/// would otherwise end the wait as an error to recreate topology for).
const LOOKUP_WAIT: Duration = Duration::from_secs(1);

async fn pull_consumer(
    broker: &Broker,
    settings: &ConsumerSettings,
) -> Result<PullConsumer, Lookup> {
    let stream = broker
        .jetstream
        .get_stream_no_info(settings.stream)
        .await
        .map_err(|e| Lookup::Failed(crate::QueueError::request("get stream", e)))?;
    match tokio::time::timeout(LOOKUP_WAIT, stream.get_consumer(settings.consumer)).await {
        Ok(Ok(consumer)) => Ok(consumer),
        Ok(Err(e)) => Err(Lookup::Failed(crate::QueueError::request(
            "get consumer",
            e,
        ))),
        Err(_) => Err(Lookup::NoAnswer),
    }
}

/// Hands back what the open pull delivers in the next moments, so another worker
/// gets it now instead of after `ack_wait`, then drops the pull: the server
/// checks for a subscriber before sending, so nothing more arrives. The pull
/// is bounded by the free slots, so this hands back at most one batch.
async fn hand_back<H: MessageHandler>(mut batch: Batch, handler: &H, consumer: &str) {
    let mut handed_back = 0;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(20), batch.next()).await
    {
        // At once: shutting down is no reason to postpone the work.
        handler.hand_back(message).await;
        handed_back += 1;
    }
    if handed_back > 0 {
        tracing::info!(consumer, handed_back, "returned messages to the stream");
    }
}

/// Runs `work` while telling JetStream every `interval` that `message` is
/// still being worked on, so a slow handler does not cause a redelivery.
pub async fn with_progress<F: std::future::Future>(
    message: &Message,
    interval: Duration,
    work: F,
) -> F::Output {
    tokio::pin!(work);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = ticker.tick() => {
                // In progress: extends the ack deadline by another ack_wait.
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// The delivery count of a message (1 on the first delivery).
pub fn delivery_count(message: &Message) -> u32 {
    message
        .info()
        .map(|info| u32::try_from(info.delivered).unwrap_or(u32::MAX))
        .unwrap_or(1)
}
