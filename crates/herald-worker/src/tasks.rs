//! The task worker: runs the handler for a task's type, then publishes one
//! delivery job per subscribed endpoint and the task's record, and only then
//! acks the task. The replay requests that share its consumer go to
//! [`crate::replays`].
//!
//! Every publish carries a `Nats-Msg-Id`, so a task redelivered after a crash
//! cannot fan out twice within the duplicate window. The record is a KV put
//! sent on the bucket's subject alongside the jobs, so all of a task's
//! writes cost one round trip.
//!
//! Nothing a task produces is retried forever: an input the worker cannot
//! read, a result nesting too deep to be read back, or one too large for
//! the NATS server's `max_payload` makes the task failed, recorded and
//! delivered as `<type>.failed` like any handler error.

use std::{panic::AssertUnwindSafe, time::Duration};

use async_nats::jetstream::{AckKind, Message};
use futures::FutureExt;
use herald_core::{
    json::{self, MAX_RESULT_DEPTH},
    metrics::Metrics,
    names,
    payload::{DeliveryJob, HandlerOutcome, TaskMessage, TaskRecord, VERSION, decode},
};
use herald_queue::{
    Broker,
    consume::{MessageHandler, delivery_count, with_progress},
    endpoints::{EndpointCache, UserEndpoints},
    publish::Outgoing,
    trace_context::{self, KeyValue, SpanKind, TraceSpan},
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tracing::Instrument;

use crate::handlers::{HandlerRegistry, TaskInput};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskWorkerConfig {
    /// Tasks handled at once by one process.
    pub concurrency: usize,
    /// How long the demo `transcode` handler pretends to work.
    #[serde(with = "herald_core::duration_serde")]
    pub transcode_duration: Duration,
}

impl Default for TaskWorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            transcode_duration: Duration::from_secs(1),
        }
    }
}

pub struct TaskWorker {
    broker: Broker,
    endpoints: EndpointCache,
    handlers: HandlerRegistry,
    /// How often to tell JetStream a slow handler is still working.
    progress_interval: Duration,
}

impl TaskWorker {
    pub fn new(
        broker: Broker,
        endpoints: EndpointCache,
        handlers: HandlerRegistry,
        ack_wait: Duration,
    ) -> Self {
        Self {
            broker,
            endpoints,
            handlers,
            progress_interval: ack_wait / 3,
        }
    }

    pub(crate) fn endpoints(&self) -> &EndpointCache {
        &self.endpoints
    }

    /// Runs the handler, catching a panic as a failure so a bad handler
    /// cannot make a task come back forever. The handler gets the client's
    /// bytes; an input that is not readable JSON (the API refuses those, so
    /// only a message written by something else) fails the task, and so
    /// does a result that would make the stored record unreadable.
    async fn run_handler(&self, task: &TaskMessage) -> Result<Box<RawValue>, String> {
        let Some(handler) = self.handlers.get(&task.task_type) else {
            return Err(format!("unknown task type {:?}", task.task_type.as_str()));
        };
        json::check(task.input.get(), MAX_RESULT_DEPTH)
            .map_err(|e| format!("the task's input cannot be read: {e}"))?;
        let run = handler.run(TaskInput {
            id: &task.id,
            user: &task.user,
            task_type: &task.task_type,
            input: &task.input,
        });
        let result = match AssertUnwindSafe(run).catch_unwind().await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("the task handler panicked".to_string()),
        };
        json::check(result.get(), MAX_RESULT_DEPTH)
            .map_err(|e| format!("the handler's result cannot be stored: {e}"))?;
        Ok(result)
    }

    /// Everything a finished task produces: its delivery jobs and record
    /// (also what ends a task that reached max_deliver). A result too large
    /// for the server becomes the task's failure.
    pub(crate) fn outputs(
        &self,
        task: &TaskMessage,
        endpoints: &UserEndpoints,
        outcome: Result<Box<RawValue>, String>,
    ) -> Outputs {
        let outputs = self.outputs_of(task, endpoints, outcome);
        match outputs.largest() {
            Some(largest) if !self.broker.fits(largest) => {
                let error = too_large(largest, self.broker.max_payload());
                tracing::warn!(task = %task.id, %error, "task result too large to deliver");
                self.outputs_of(task, endpoints, Err(error))
            }
            _ => outputs,
        }
    }

    fn outputs_of(
        &self,
        task: &TaskMessage,
        endpoints: &UserEndpoints,
        outcome: Result<Box<RawValue>, String>,
    ) -> Outputs {
        let (handler_outcome, result, error) = match outcome {
            Ok(result) => (HandlerOutcome::Completed, Some(result), None),
            Err(error) => (HandlerOutcome::Failed, None, Some(error)),
        };
        let mut record = TaskRecord {
            v: VERSION,
            id: task.id.clone(),
            user: task.user.clone(),
            task_type: task.task_type.clone(),
            accepted_at_ms: task.accepted_at_ms,
            finished_at_ms: herald_core::now_ms(),
            outcome: handler_outcome,
            result,
            error,
            endpoints: Vec::new(),
            traceparent: herald_queue::trace_context::current_traceparent(),
        };
        // The body comes from the record alone, so a redelivery, which has
        // only the record, sends the same bytes.
        let webhook = record.webhook();
        // The records go with the jobs when this task is what made this
        // process read the user (its two lookups, the miss and the one
        // after the handler): a user met once here is most likely one the
        // webhook worker has not cached either, and its read is saved
        // (it checks that nothing newer exists). A user met often is
        // cached there too; its records would only weigh down every job.
        let carry = endpoints.hits() <= 1;
        record.endpoints = endpoints
            .all()
            .iter()
            .filter(|e| e.wants(&webhook.0))
            .map(|e| e.id.clone())
            .collect();
        let mut outgoing: Vec<Outgoing> = record
            .endpoints
            .iter()
            .map(|endpoint| {
                let job = DeliveryJob {
                    record: carry.then(|| endpoints.carried(endpoint)).flatten(),
                    ..record.delivery_job(endpoint, &webhook, None)
                };
                Outgoing::delivery(&job)
            })
            .collect();
        outgoing.push(Outgoing::task_record(&record));
        Outputs {
            outcome: handler_outcome,
            messages: outgoing,
        }
    }
}

#[async_trait::async_trait]
impl MessageHandler for TaskWorker {
    async fn handle(&self, message: Message) {
        if names::is_replay_subject(&message.subject) {
            let trace = TraceSpan::for_message(
                || "replay",
                SpanKind::Consumer,
                message.headers.as_ref(),
                Vec::new,
            );
            let replay = crate::replays::handle(&self.broker, &self.endpoints, message);
            return trace
                .run(replay)
                .instrument(tracing::info_span!("replay"))
                .await;
        }
        let task: TaskMessage = match decode(&message.payload) {
            Ok(task) => task,
            Err(e) => {
                tracing::error!(subject = %message.subject, error = %e, "terminating unreadable task");
                // Term: an unreadable task will never parse; retrying is pointless.
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        };
        let trace = TraceSpan::for_message(
            || format!("task {}", task.task_type),
            SpanKind::Consumer,
            message.headers.as_ref(),
            || {
                vec![
                    KeyValue::new("herald.task", task.id.to_string()),
                    KeyValue::new("herald.task_type", task.task_type.to_string()),
                    KeyValue::new("herald.user", task.user.to_string()),
                    KeyValue::new("herald.delivery_count", i64::from(delivery_count(&message))),
                ]
            },
        );
        let span = tracing::info_span!("task", task = %task.id, task_type = %task.task_type);
        trace
            .run(self.run_task(message, task))
            .instrument(span)
            .await
    }
}

impl TaskWorker {
    /// [`MessageHandler::handle`] for a task, in the task's span.
    async fn run_task(&self, message: Message, task: TaskMessage) {
        let endpoints = match self.endpoints.user(&task.user).await {
            Ok(endpoints) => endpoints,
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "cannot read the user's endpoints; retrying the task shortly");
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                return;
            }
        };
        if let Some((key, why)) = endpoints.unreadable_without_earlier_version() {
            // Fanning out now would silently skip an endpoint this process
            // cannot open and has no earlier version of (a keyring missing
            // its key): wait for a fixed keyring.
            tracing::error!(task = %task.id, endpoint = %key, reason = %why, "an endpoint of the user is unreadable; retrying the task later");
            let _ = message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(60))))
                .await;
            return;
        }
        let outcome =
            with_progress(&message, self.progress_interval, self.run_handler(&task)).await;
        if let Err(error) = &outcome {
            tracing::info!(task = %task.id, %error, "task failed");
        }
        // Fanned out to the endpoints as they are now, after the handler;
        // the earlier view if they cannot be read again (a publish would
        // then fail too, and the task come back).
        let endpoints = self.endpoints.user(&task.user).await.unwrap_or(endpoints);
        let mut outputs = self.outputs(&task, &endpoints, outcome);
        let mut published = self
            .broker
            .publish_all_stored(outputs.messages.clone())
            .await;
        if let Err(e) = &published
            && e.is_too_large()
            && outputs.outcome == HandlerOutcome::Completed
        {
            // Larger than the stream takes (the server's max_payload was
            // checked already): the same as a result too large to send.
            let largest = outputs.largest().unwrap_or(0);
            let error = format!("{}: {e}", too_large(largest, self.broker.max_payload()));
            tracing::warn!(task = %task.id, %error, "task result too large to store");
            outputs = self.outputs_of(&task, &endpoints, Err(error));
            published = self
                .broker
                .publish_all_stored(outputs.messages.clone())
                .await;
        }
        match published {
            // Ack: the jobs and the record are stored.
            Ok(_) => {
                trace_context::with_current(|span| {
                    span.set_attribute(KeyValue::new(
                        "herald.outcome",
                        outputs.outcome.event_suffix(),
                    ));
                });
                Metrics::count(
                    &herald_core::metrics::metrics().tasks_handled,
                    outputs.outcome.event_suffix(),
                );
                if let Err(e) = message.ack().await {
                    tracing::warn!(task = %task.id, error = %e, "ack failed; the task will be redelivered and deduplicated");
                }
            }
            Err(e) => {
                tracing::warn!(task = %task.id, error = %e, "could not store task outputs; retrying");
                // Nak with a delay: NATS is struggling, so do not spin.
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
            }
        }
    }
}

/// A finished task's delivery jobs and record, and how it ended.
pub(crate) struct Outputs {
    outcome: HandlerOutcome,
    pub(crate) messages: Vec<Outgoing>,
}

impl Outputs {
    fn largest(&self) -> Option<usize> {
        self.messages.iter().map(|o| o.payload.len()).max()
    }
}

/// The failure recorded for a task whose outputs the server cannot take.
fn too_large(largest: usize, max_payload: Option<usize>) -> String {
    match max_payload {
        Some(max) => format!(
            "the handler's result is too large to deliver: its message is {largest} bytes, \
             the NATS server accepts at most {max} (max_payload)"
        ),
        None => {
            format!("the handler's result is too large to deliver: its message is {largest} bytes")
        }
    }
}
