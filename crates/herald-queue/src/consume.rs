//! The pull-consumer loop every worker runs.
//!
//! A semaphore caps the messages being handled at once; a new message is
//! taken only when a slot is free. On shutdown the loop stops taking
//! messages, hands back (naks) what the client had buffered, and waits for
//! in-flight handlers within a grace period. A missing heartbeat, a deleted
//! consumer or a server restart recreates the subscription instead of ending
//! the worker.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    AckKind, Message,
    consumer::{PullConsumer, pull::MessagesErrorKind},
};
use futures::StreamExt;
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{Broker, TopologyConfig, topology};

/// What a worker does with one message. The handler acknowledges it itself
/// (ack, nak with delay, or term), each a deliberate choice at its call site.
#[async_trait::async_trait]
pub trait MessageHandler: Send + Sync + 'static {
    async fn handle(&self, message: Message);
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
}

/// Consumes until `shutdown` fires, then drains.
pub async fn run<H: MessageHandler>(
    broker: Broker,
    topology_config: TopologyConfig,
    settings: ConsumerSettings,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
    let mut in_flight = JoinSet::new();
    let mut retry_delay = Duration::from_millis(100);
    let consumer_name = settings.consumer;

    'subscribe: while !shutdown.is_cancelled() {
        let consumer = match pull_consumer(&broker, &settings).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(consumer = consumer_name, error = %e, "consumer unavailable; recreating topology");
                let _ = topology::ensure(&broker, &topology_config).await;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(retry_delay) => {}
                }
                retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(settings.concurrency.clamp(1, 1000))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(consumer = consumer_name, error = %e, "cannot subscribe");
                tokio::time::sleep(retry_delay).await;
                continue;
            }
        };
        retry_delay = Duration::from_millis(100);

        loop {
            // Reap finished handlers so the set does not grow.
            while in_flight.try_join_next().is_some() {}
            let slot = tokio::select! {
                _ = shutdown.cancelled() => {
                    hand_back_buffered(&mut messages).await;
                    break 'subscribe;
                }
                slot = slots.clone().acquire_owned() => slot.expect("semaphore is never closed"),
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => {
                    hand_back_buffered(&mut messages).await;
                    break 'subscribe;
                }
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    let handler = handler.clone();
                    in_flight.spawn(async move {
                        handler.handle(message).await;
                        drop(slot);
                    });
                }
                Some(Err(e)) => {
                    let resubscribe = matches!(
                        e.kind(),
                        MessagesErrorKind::MissingHeartbeat
                            | MessagesErrorKind::ConsumerDeleted
                            | MessagesErrorKind::NoResponders
                    );
                    tracing::warn!(consumer = consumer_name, error = %e, resubscribe, "pull consumer error");
                    if resubscribe {
                        continue 'subscribe;
                    }
                }
                None => continue 'subscribe,
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

async fn pull_consumer(
    broker: &Broker,
    settings: &ConsumerSettings,
) -> Result<PullConsumer, crate::QueueError> {
    let stream = broker
        .jetstream
        .get_stream_no_info(settings.stream)
        .await
        .map_err(|e| crate::QueueError::request("get stream", e))?;
    stream
        .get_consumer(settings.consumer)
        .await
        .map_err(|e| crate::QueueError::request("get consumer", e))
}

/// Naks the messages the client fetched but no handler took, so another
/// worker gets them now instead of after `ack_wait`.
async fn hand_back_buffered(messages: &mut async_nats::jetstream::consumer::pull::Stream) {
    let mut handed_back = 0;
    while let Ok(Some(Ok(message))) =
        tokio::time::timeout(Duration::from_millis(20), messages.next()).await
    {
        // Nak without delay: shutting down is no reason to postpone the work.
        let _ = message.ack_with(AckKind::Nak(None)).await;
        handed_back += 1;
    }
    if handed_back > 0 {
        tracing::info!(handed_back, "returned buffered messages");
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
