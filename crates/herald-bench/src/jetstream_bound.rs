//! The baseline: the bare two-hop JetStream pipeline Herald's path is built
//! on, with Herald's durability and nothing else.
//!
//! ```text
//! producer --publish, ack awaited--> A --stage: publish to B, await its ack,
//!                                         then ack the A message--> B --final: ack
//! ```
//!
//! Every publish carries a `Nats-Msg-Id` and its ack is awaited before the
//! message that caused it is acked, as Herald does; streams are file-backed
//! work queues with one explicit-ack pull consumer each. Three connections
//! (producer, stage, final consumer), as Herald's roles have one each; one
//! process, so the figure is JetStream's and this process's, no HTTP.

use std::time::{Duration, Instant};

use async_nats::{
    HeaderMap,
    jetstream::{
        self, Context,
        consumer::{AckPolicy, pull},
        stream::{self, RetentionPolicy, StorageType},
    },
};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream as futures_stream};
use serde::Serialize;

const STREAM_A: &str = "HERALD_BENCH_A";
const STREAM_B: &str = "HERALD_BENCH_B";
const SUBJECT_A: &str = "herald-bench.a";
const SUBJECT_B: &str = "herald-bench.b";
/// The consumers let this many messages wait for their ack, far more than
/// are ever in flight, so the limit never throttles the run.
const MAX_ACK_PENDING: i64 = 20_000;

#[derive(Debug, Clone)]
pub struct Bound {
    pub url: String,
    pub messages: u64,
    /// Producer: publishes whose ack is outstanding at once.
    pub window: usize,
    /// Stage: A messages being passed on at once.
    pub inflight: usize,
    pub payload_bytes: usize,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct BoundResult {
    pub messages: u64,
    /// From the first publish to the last ack at B.
    pub seconds: f64,
    pub msgs_per_s: f64,
    /// From the first to the last producer ack.
    pub publish_s: f64,
    pub missing: u64,
    pub duplicates: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("jetstream-bound: {step}: {source}")]
pub struct BoundError {
    step: &'static str,
    source: Box<dyn std::error::Error + Send + Sync>,
}

fn at<E: std::error::Error + Send + Sync + 'static>(
    step: &'static str,
) -> impl Fn(E) -> BoundError {
    move |source| BoundError {
        step,
        source: Box::new(source),
    }
}

pub async fn run(bound: &Bound) -> Result<BoundResult, BoundError> {
    let connect = || async_nats::connect(bound.url.as_str());
    let producer = jetstream::new(connect().await.map_err(at("connect"))?);
    let stage = jetstream::new(connect().await.map_err(at("connect"))?);
    let last = jetstream::new(connect().await.map_err(at("connect"))?);
    fresh_stream(&producer, STREAM_A, SUBJECT_A).await?;
    fresh_stream(&producer, STREAM_B, SUBJECT_B).await?;
    let stage_consumer = consumer(&stage, STREAM_A).await?;
    let last_consumer = consumer(&last, STREAM_B).await?;

    let started = Instant::now();
    let stage_task = tokio::spawn(pass_on(stage, stage_consumer, bound.inflight));
    let end_task = tokio::spawn(receive(last_consumer, bound.messages));
    let payload = filler(bound.payload_bytes);
    let published = futures_stream::iter(0..bound.messages)
        .map(|seq| {
            let (producer, payload) = (&producer, payload.clone());
            async move {
                let ack = producer
                    .publish_with_headers(SUBJECT_A, msg_id("a", seq), with_seq(seq, &payload))
                    .await
                    .map_err(at("publish to A"))?;
                ack.await.map_err(at("ack of the publish to A"))
            }
        })
        .buffer_unordered(bound.window.max(1))
        .try_for_each(|_| async { Ok(()) });
    let outcome = tokio::time::timeout(bound.timeout, async {
        published.await?;
        let publish_s = started.elapsed().as_secs_f64();
        let received = end_task.await.map_err(at("final consumer"))??;
        Ok::<_, BoundError>((publish_s, received))
    })
    .await;
    stage_task.abort();
    let result = match outcome {
        Ok(Ok((publish_s, (finished, seen)))) => {
            let seconds = finished.saturating_duration_since(started).as_secs_f64();
            BoundResult {
                messages: bound.messages,
                seconds,
                msgs_per_s: bound.messages as f64 / seconds,
                publish_s,
                missing: bound.messages - seen.distinct,
                duplicates: seen.duplicates,
            }
        }
        Ok(Err(e)) => return Err(e),
        Err(elapsed) => return Err(at("waiting for every message at B")(elapsed)),
    };
    for name in [STREAM_A, STREAM_B] {
        let _ = producer.delete_stream(name).await;
    }
    Ok(result)
}

async fn fresh_stream(js: &Context, name: &str, subject: &str) -> Result<(), BoundError> {
    // A stream left by an interrupted run would hold its messages.
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: vec![subject.to_string()],
        storage: StorageType::File,
        retention: RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .map_err(at("create stream"))?;
    Ok(())
}

async fn consumer(
    js: &Context,
    stream: &str,
) -> Result<jetstream::consumer::PullConsumer, BoundError> {
    js.get_stream(stream)
        .await
        .map_err(at("get stream"))?
        .create_consumer(pull::Config {
            durable_name: Some("bench".to_string()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: MAX_ACK_PENDING,
            ..Default::default()
        })
        .await
        .map_err(at("create consumer"))
}

/// The stage: each A message is published to B, and acked once B has
/// acknowledged it.
async fn pass_on(
    js: Context,
    consumer: jetstream::consumer::PullConsumer,
    inflight: usize,
) -> Result<(), BoundError> {
    let messages = consumer.messages().await.map_err(at("consume A"))?;
    messages
        .map_err(at("consume A"))
        .map_ok(|message| {
            let js = &js;
            async move {
                let seq = seq_of(&message.payload);
                let ack = js
                    .publish_with_headers(SUBJECT_B, msg_id("b", seq), message.payload.clone())
                    .await
                    .map_err(at("publish to B"))?;
                ack.await.map_err(at("ack of the publish to B"))?;
                message.ack().await.map_err(|source| BoundError {
                    step: "ack A",
                    source: source.to_string().into(),
                })
            }
        })
        .try_buffer_unordered(inflight.max(1))
        .try_for_each(|_| async { Ok(()) })
        .await
}

struct Seen {
    distinct: u64,
    duplicates: u64,
}

/// The final consumer: acks every B message until each sequence number has
/// arrived; returns when the last one was acked.
async fn receive(
    consumer: jetstream::consumer::PullConsumer,
    messages: u64,
) -> Result<(Instant, Seen), BoundError> {
    let mut arrived = vec![false; messages as usize];
    let mut seen = Seen {
        distinct: 0,
        duplicates: 0,
    };
    let mut stream = consumer.messages().await.map_err(at("consume B"))?;
    while seen.distinct < messages {
        let Some(message) = stream.next().await else {
            break;
        };
        let message = message.map_err(at("consume B"))?;
        message.ack().await.map_err(|source| BoundError {
            step: "ack B",
            source: source.to_string().into(),
        })?;
        match arrived.get_mut(seq_of(&message.payload) as usize) {
            Some(slot) if *slot => seen.duplicates += 1,
            Some(slot) => {
                *slot = true;
                seen.distinct += 1;
            }
            None => seen.duplicates += 1,
        }
    }
    Ok((Instant::now(), seen))
}

fn msg_id(hop: &str, seq: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{hop}-{seq}").as_str(),
    );
    headers
}

fn filler(bytes: usize) -> Bytes {
    Bytes::from(vec![b'x'; bytes.max(8)])
}

/// The payload with its first eight bytes the sequence number.
fn with_seq(seq: u64, filler: &Bytes) -> Bytes {
    let mut payload = filler.to_vec();
    payload[..8].copy_from_slice(&seq.to_be_bytes());
    payload.into()
}

fn seq_of(payload: &[u8]) -> u64 {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(u64::MAX)
}
