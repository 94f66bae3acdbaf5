//! Starting roles: the API and the three workers, alone or together.

use std::{collections::BTreeSet, sync::Arc};

use anyhow::Context;
use clap::ValueEnum;
use herald_api::AppState;
use herald_core::names;
use herald_queue::{
    Broker,
    consume::{self, ConsumerSettings},
    endpoints::EndpointCache,
    topology,
};
use herald_worker::{
    handlers::HandlerRegistry,
    mail::MailWorker,
    max_deliveries::{Abandoned, MaxDeliveries},
    tasks::TaskWorker,
    webhooks::WebhookWorker,
    webhooks::health::HealthTracker,
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config,
    probes::{self, Readiness},
};

/// A worker role, as `herald worker <kinds>` names it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum WorkerKind {
    Tasks,
    Webhooks,
    Mail,
}

/// Which roles a process runs.
#[derive(Debug, Clone, Default)]
pub struct Roles {
    pub api: bool,
    pub workers: BTreeSet<WorkerKind>,
}

impl Roles {
    pub fn api_only() -> Self {
        Self {
            api: true,
            workers: BTreeSet::new(),
        }
    }

    pub fn workers(workers: BTreeSet<WorkerKind>) -> Self {
        Self {
            api: false,
            workers,
        }
    }

    pub fn all() -> Self {
        Self {
            api: true,
            workers: [WorkerKind::Tasks, WorkerKind::Webhooks, WorkerKind::Mail].into(),
        }
    }
}

/// Connects to NATS, binds the API address, and runs `roles` until
/// `shutdown` fires.
pub async fn run(config: Config, roles: Roles, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = if roles.api {
        Some(
            TcpListener::bind(&config.api.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.api.listen))?,
        )
    } else {
        None
    };
    let broker = herald_queue::connect_with(&config.nats, "herald")
        .await?
        .storing_within(config.topology.store_timeout);
    run_with(
        config,
        roles,
        broker,
        listener,
        HandlerRegistry::with_builtins,
        shutdown,
    )
    .await
}

/// Runs `roles` on an existing connection and listener. `handlers` builds
/// the task handler registry from the configured transcode duration, so
/// embedders can add their own task types.
///
/// Every task it starts is owned: the roles in a `JoinSet` whose first
/// failure is the process's failure, their helpers (the endpoint watch,
/// the health flusher) in a `TaskTracker`. It returns once all have ended.
pub async fn run_with(
    config: Config,
    roles: Roles,
    broker: Broker,
    listener: Option<TcpListener>,
    handlers: impl FnOnce(std::time::Duration) -> HandlerRegistry,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let needs_endpoints =
        roles.workers.contains(&WorkerKind::Tasks) || roles.workers.contains(&WorkerKind::Webhooks);
    // Checked before anything starts: without the key the workers could
    // not read a single endpoint.
    let keyring = if needs_endpoints {
        Some(
            config
                .secrets
                .require_keyring("the task and webhook workers")?,
        )
    } else {
        None
    };
    let mut tasks = Owned::default();

    // The API starts at once and answers 503 until the topology exists.
    let api_state = match listener {
        Some(listener) => {
            // A bad tokens file stops the process here, before it serves.
            let state = AppState::new(broker.clone(), config.api.clone())
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
            let serving = state.clone();
            let stop = shutdown.clone();
            tasks.roles.spawn(async move {
                herald_api::serve(listener, serving, stop)
                    .await
                    .context("API server failed")
            });
            Some(state)
        }
        None => None,
    };

    // Probes for roles without the API, ready once the workers consume.
    let readiness = Readiness::default();
    probes::start(
        &config.health.listen,
        &broker,
        &readiness,
        &shutdown,
        &mut tasks.roles,
    )
    .await?;

    let mail_worker = if roles.workers.contains(&WorkerKind::Mail) {
        Some(Arc::new(MailWorker::new(broker.clone(), &config.mail)?))
    } else {
        None
    };

    match topology::prepare(
        &broker,
        &config.topology,
        config.nats.manage_topology,
        &shutdown,
    )
    .await
    {
        Ok(()) => {}
        // Turned away by NATS: stop with the reason, do not sit there.
        Err(refused @ herald_queue::QueueError::Connect(_)) => {
            shutdown.cancel();
            let _ = tasks.wait().await;
            return Err(refused.into());
        }
        Err(_) => return tasks.wait().await, // shut down before NATS was ever reachable
    }
    if let Some(state) = &api_state {
        state.set_topology_ready();
    }

    let cache = match keyring {
        Some(keyring) => {
            let cache = EndpointCache::start(
                &tasks.helpers,
                broker.clone(),
                keyring,
                config.endpoint_cache.users,
                shutdown.clone(),
            );
            tokio::select! {
                _ = shutdown.cancelled() => return tasks.wait().await,
                _ = cache.wait_watching() => {}
            }
            Some(cache)
        }
        None => None,
    };

    let mut workers = Workers {
        broker: &broker,
        config: &config,
        shutdown: &shutdown,
        running: &mut tasks.roles,
    };
    if let Some(cache) = cache {
        let ack_wait = config.topology.ack_wait;
        if roles.workers.contains(&WorkerKind::Tasks) {
            let worker = Arc::new(TaskWorker::new(
                broker.clone(),
                cache.clone(),
                handlers(config.tasks.transcode_duration),
                ack_wait,
            ));
            let abandoned = Abandoned::tasks(broker.clone(), cache.clone(), ack_wait);
            workers.start(
                WorkerKind::Tasks,
                worker,
                abandoned,
                CancellationToken::new(),
            );
        }
        if roles.workers.contains(&WorkerKind::Webhooks) {
            // Health is flushed a last time after the drain, so the
            // outcomes of the deliveries finished during it are kept.
            let drained = CancellationToken::new();
            let health = HealthTracker::start_on(
                &tasks.helpers,
                broker.clone(),
                cache.clone(),
                config.webhooks.health_flush_interval,
                config.webhooks.disable_after,
                drained.clone(),
            );
            let worker = Arc::new(WebhookWorker::new(
                broker.clone(),
                cache.clone(),
                health,
                config.webhooks.clone(),
                ack_wait,
            ));
            let abandoned = Abandoned::Webhooks(cache.clone());
            workers.start(WorkerKind::Webhooks, worker, abandoned, drained);
        }
    }
    if let Some(worker) = mail_worker {
        workers.start(
            WorkerKind::Mail,
            worker,
            Abandoned::Mail,
            CancellationToken::new(),
        );
    }
    readiness.set_ready();
    tracing::info!(api = roles.api, workers = ?roles.workers, "herald running");
    let result = tasks.wait().await;
    // Acks and naks are buffered by the client: send them before exiting.
    let _ = broker.flush().await;
    result
}

/// Where each worker kind reads its jobs, and how many it takes on.
fn consumer_settings(kind: WorkerKind, config: &Config) -> ConsumerSettings {
    let (stream, consumer, concurrency) = match kind {
        WorkerKind::Tasks => (
            names::TASKS_STREAM,
            names::TASKS_CONSUMER,
            config.tasks.concurrency,
        ),
        WorkerKind::Webhooks => (
            names::WEBHOOKS_STREAM,
            names::WEBHOOKS_CONSUMER,
            config.webhooks.concurrency,
        ),
        WorkerKind::Mail => (
            names::MAIL_STREAM,
            names::MAIL_CONSUMER,
            config.mail.concurrency,
        ),
    };
    ConsumerSettings {
        stream,
        consumer,
        concurrency,
        grace: config.shutdown.grace,
        manage_topology: config.nats.manage_topology,
    }
}

/// Starts worker kinds on one connection and configuration, as `running`
/// roles.
struct Workers<'a> {
    broker: &'a Broker,
    config: &'a Config,
    shutdown: &'a CancellationToken,
    running: &'a mut JoinSet<anyhow::Result<()>>,
}

impl Workers<'_> {
    /// Consumes `kind`'s stream with `handler`, and ends the stream's jobs
    /// that reached max_deliver (from the advisories `HERALD_ADVISORIES`
    /// keeps for it) as `abandoned` says. `drained` is cancelled once
    /// `handler`'s consumer has drained, also if it panicked: nothing
    /// handles a message after that.
    fn start<H: consume::MessageHandler>(
        &mut self,
        kind: WorkerKind,
        handler: Arc<H>,
        abandoned: Abandoned,
        drained: CancellationToken,
    ) {
        let consumer = self.consume(consumer_settings(kind, self.config), handler, drained);
        self.running.spawn(consumer);
        let max_deliveries = MaxDeliveries::new(self.broker.clone(), abandoned);
        let settings =
            max_deliveries.settings(self.config.shutdown.grace, self.config.nats.manage_topology);
        let consumer = self.consume(settings, Arc::new(max_deliveries), CancellationToken::new());
        self.running.spawn(consumer);
    }

    /// The consumer loop until shutdown, and its drain.
    fn consume<H: consume::MessageHandler>(
        &self,
        settings: ConsumerSettings,
        handler: Arc<H>,
        drained: CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'static {
        let broker = self.broker.clone();
        let topology = self.config.topology.clone();
        let shutdown = self.shutdown.clone();
        async move {
            let _drained = drained.drop_guard();
            consume::run(broker, topology, settings, handler, shutdown).await;
            Ok(())
        }
    }
}

/// Every task a process's roles started.
#[derive(Default)]
struct Owned {
    /// The roles: the API, the probes, each consumer.
    roles: JoinSet<anyhow::Result<()>>,
    /// What the roles need beside them: the endpoint watch, the health
    /// flusher. Each ends on its own stop token.
    helpers: TaskTracker,
}

impl Owned {
    /// Waits for every role, then for every helper; the first failure of a
    /// role is the process's failure.
    async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while let Some(result) = self.roles.join_next().await {
            let result = result.context("a role panicked").and_then(|r| r);
            if let Err(e) = result {
                tracing::error!(error = %e, "role failed");
                first_error.get_or_insert(e);
            }
        }
        self.helpers.close();
        self.helpers.wait().await;
        first_error.map_or(Ok(()), Err)
    }
}
