//! Task handlers: what a task of each type does.
//!
//! Implement [`TaskHandler`] and [`HandlerRegistry::register`] it to add a
//! task type. A handler returns the JSON result delivered in the webhook, or
//! an error, which marks the task failed and is delivered as
//! `<type>.failed`; a failed task is never retried.

use std::{collections::HashMap, sync::Arc, time::Duration};

use herald_core::{TaskId, TaskType, UserId};
use serde_json::{Value, json};

/// What a handler sees of a task.
#[derive(Debug)]
pub struct TaskInput<'a> {
    pub id: &'a TaskId,
    pub user: &'a UserId,
    pub task_type: &'a TaskType,
    /// The JSON body the client posted.
    pub input: &'a Value,
}

/// A handler failure; its message is recorded and sent in the webhook.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

#[async_trait::async_trait]
pub trait TaskHandler: Send + Sync + 'static {
    async fn run(&self, task: TaskInput<'_>) -> Result<Value, HandlerError>;
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

/// Returns its input.
pub struct Echo;

#[async_trait::async_trait]
impl TaskHandler for Echo {
    async fn run(&self, task: TaskInput<'_>) -> Result<Value, HandlerError> {
        Ok(json!({ "echo": task.input }))
    }
}

/// Pretends to transcode a file, as the BullMQ webhooks tutorial does.
pub struct Transcode {
    pub duration: Duration,
}

#[async_trait::async_trait]
impl TaskHandler for Transcode {
    async fn run(&self, task: TaskInput<'_>) -> Result<Value, HandlerError> {
        tokio::time::sleep(self.duration).await;
        Ok(json!({
            "result": format!("Transcoded file with ID {}", task.id),
            "input": task.input,
            "took_ms": self.duration.as_millis() as u64,
        }))
    }
}

/// Always fails; shows what a failed task looks like.
pub struct AlwaysFails;

#[async_trait::async_trait]
impl TaskHandler for AlwaysFails {
    async fn run(&self, _task: TaskInput<'_>) -> Result<Value, HandlerError> {
        Err(HandlerError("this task type always fails".into()))
    }
}
