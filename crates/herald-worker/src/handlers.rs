//! Task handlers: what a task of each type does.
//!
//! Implement [`TaskHandler`] and [`HandlerRegistry::register`] it to add a
//! task type. A handler returns the JSON result delivered in the webhook, or
//! an error, which marks the task failed and is delivered as
//! `<type>.failed`; a failed task is never retried.
//!
//! Input and result are raw JSON: a handler sees exactly the bytes the
//! client posted (checked by the API, see `herald_core::json`), and what it
//! returns is delivered as it is, so an echo keeps the client's key order
//! and number spelling. [`result`] turns any serializable value into one.

use std::{collections::HashMap, sync::Arc, time::Duration};

use herald_core::{TaskId, TaskType, UserId};
use serde::Serialize;
use serde_json::value::RawValue;

/// What a handler sees of a task.
#[derive(Debug)]
pub struct TaskInput<'a> {
    pub id: &'a TaskId,
    pub user: &'a UserId,
    pub task_type: &'a TaskType,
    /// The JSON body the client posted, byte for byte.
    pub input: &'a RawValue,
}

impl TaskInput<'_> {
    /// The input parsed, for handlers that look inside it.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_str(self.input.get())
            .map_err(|e| HandlerError(format!("unexpected input: {e}")))
    }
}

/// A handler's result from any serializable value; a [`RawValue`] inside
/// it is written as it is.
pub fn result(value: &impl Serialize) -> Result<Box<RawValue>, HandlerError> {
    serde_json::value::to_raw_value(value)
        .map_err(|e| HandlerError(format!("the result cannot be written as JSON: {e}")))
}

/// A handler failure; its message is recorded and sent in the webhook.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

#[async_trait::async_trait]
pub trait TaskHandler: Send + Sync + 'static {
    async fn run(&self, task: TaskInput<'_>) -> Result<Box<RawValue>, HandlerError>;
}

/// Handlers by task type.
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    handlers: HashMap<String, Arc<dyn TaskHandler>>,
}

impl HandlerRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// The demo handlers: `echo`, `transcode` (simulated work lasting
    /// `transcode_duration`) and `fail` (always fails).
    pub fn with_builtins(transcode_duration: Duration) -> Self {
        let mut registry = Self::new();
        registry.register("echo", Echo);
        registry.register(
            "transcode",
            Transcode {
                duration: transcode_duration,
            },
        );
        registry.register("fail", AlwaysFails);
        registry
    }

    pub fn register(&mut self, task_type: &str, handler: impl TaskHandler) {
        self.handlers
            .insert(task_type.to_string(), Arc::new(handler));
    }

    pub fn get(&self, task_type: &TaskType) -> Option<Arc<dyn TaskHandler>> {
        self.handlers.get(task_type.as_str()).cloned()
    }
}

/// Returns its input: `{"echo": <the input, byte for byte>}`.
pub struct Echo;

#[derive(Serialize)]
struct Echoed<'a> {
    echo: &'a RawValue,
}

#[async_trait::async_trait]
impl TaskHandler for Echo {
    async fn run(&self, task: TaskInput<'_>) -> Result<Box<RawValue>, HandlerError> {
        result(&Echoed { echo: task.input })
    }
}

/// Returns its input `copies` times over (`{"copies": [<input>, ...]}`):
/// a result far larger than the task, for showing what happens to one too
/// large to deliver. Not a built-in; register it where that is wanted.
pub struct Amplify {
    pub copies: usize,
}

#[derive(Serialize)]
struct Amplified<'a> {
    copies: Vec<&'a RawValue>,
}

#[async_trait::async_trait]
impl TaskHandler for Amplify {
    async fn run(&self, task: TaskInput<'_>) -> Result<Box<RawValue>, HandlerError> {
        result(&Amplified {
            copies: vec![task.input; self.copies],
        })
    }
}

/// Pretends to transcode a file, as the BullMQ webhooks tutorial does.
pub struct Transcode {
    pub duration: Duration,
}

#[derive(Serialize)]
struct Transcoded<'a> {
    result: String,
    input: &'a RawValue,
    took_ms: u64,
}

#[async_trait::async_trait]
impl TaskHandler for Transcode {
    async fn run(&self, task: TaskInput<'_>) -> Result<Box<RawValue>, HandlerError> {
        tokio::time::sleep(self.duration).await;
        result(&Transcoded {
            result: format!("Transcoded file with ID {}", task.id),
            input: task.input,
            took_ms: self.duration.as_millis() as u64,
        })
    }
}

/// Always fails; shows what a failed task looks like.
pub struct AlwaysFails;

#[async_trait::async_trait]
impl TaskHandler for AlwaysFails {
    async fn run(&self, _task: TaskInput<'_>) -> Result<Box<RawValue>, HandlerError> {
        Err(HandlerError("this task type always fails".into()))
    }
}
