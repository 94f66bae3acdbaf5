//! Starting roles: the API and the three workers, alone or together.

use std::{collections::BTreeSet, sync::Arc};

use anyhow::Context;
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
    webhooks,
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{
    cli::WorkerKind,
    config::Config,
    probes::{self, Readiness},
};

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
    let broker = herald_queue::connect_with(&config.nats, "herald").await?;
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
    let mut running = JoinSet::new();

    // The API starts at once and answers 503 until the topology exists.
    let api_state = match listener {
        Some(listener) => {
            // A bad tokens file stops the process here, before it serves.
            let state = AppState::new(broker.clone(), config.api.clone())
                .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
            let serving = state.clone();
            let stop = shutdown.clone();
            running.spawn(async move {
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
        &mut running,
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
            let _ = drain(running).await;
            return Err(refused.into());
        }
        Err(_) => return drain(running).await, // shut down before NATS was ever reachable
    }
    if let Some(state) = &api_state {
        state.set_topology_ready();
    }

    if let Some(keyring) = keyring {
        let cache = EndpointCache::start(broker.clone(), keyring, shutdown.clone());
        tokio::select! {
            _ = shutdown.cancelled() => return drain(running).await,
            _ = cache.wait_loaded() => {}
        }
        let ack_wait = config.topology.ack_wait;
        let grace = config.shutdown.grace;
        if roles.workers.contains(&WorkerKind::Tasks) {
            let worker = Arc::new(TaskWorker::new(
                broker.clone(),
                cache.clone(),
                handlers(config.tasks.transcode_duration),
                ack_wait,
            ));
            let settings = ConsumerSettings {
                stream: names::TASKS_STREAM,
                consumer: names::TASKS_CONSUMER,
                concurrency: config.tasks.concurrency,
                grace,
                manage_topology: config.nats.manage_topology,
            };
            running.spawn(consume_until(
                broker.clone(),
                config.clone(),
                settings,
                worker,
                shutdown.clone(),
            ));
            let abandoned = Abandoned::tasks(broker.clone(), cache.clone(), ack_wait);
            spawn_max_deliveries(&broker, &config, abandoned, &shutdown, &mut running);
        }
        if roles.workers.contains(&WorkerKind::Webhooks) {
            let worker = webhooks::start(
                broker.clone(),
                cache.clone(),
                config.webhooks.clone(),
                ack_wait,
                shutdown.clone(),
            );
            let settings = ConsumerSettings {
                stream: names::WEBHOOKS_STREAM,
                consumer: names::WEBHOOKS_CONSUMER,
                concurrency: config.webhooks.concurrency,
                grace,
                manage_topology: config.nats.manage_topology,
            };
            running.spawn(consume_until(
                broker.clone(),
                config.clone(),
                settings,
                worker,
                shutdown.clone(),
            ));
            let abandoned = Abandoned::Webhooks(cache.clone());
            spawn_max_deliveries(&broker, &config, abandoned, &shutdown, &mut running);
        }
    }
    if let Some(worker) = mail_worker {
        let settings = ConsumerSettings {
            stream: names::MAIL_STREAM,
            consumer: names::MAIL_CONSUMER,
            concurrency: config.mail.concurrency,
            grace: config.shutdown.grace,
            manage_topology: config.nats.manage_topology,
        };
        running.spawn(consume_until(
            broker.clone(),
            config.clone(),
            settings,
            worker,
            shutdown.clone(),
        ));
        spawn_max_deliveries(&broker, &config, Abandoned::Mail, &shutdown, &mut running);
    }
    readiness.set_ready();
    tracing::info!(api = roles.api, workers = ?roles.workers, "herald running");
    let result = drain(running).await;
    // Acks and naks are buffered by the client: send them before exiting.
    let _ = broker.client.flush().await;
    result
}

/// Each worker kind also ends its own stream's jobs that reached
/// max_deliver, from the advisories `HERALD_ADVISORIES` kept for it.
fn spawn_max_deliveries(
    broker: &Broker,
    config: &Config,
    abandoned: Abandoned,
    shutdown: &CancellationToken,
    running: &mut JoinSet<anyhow::Result<()>>,
) {
    let handler = MaxDeliveries::new(broker.clone(), abandoned);
    let settings = handler.settings(config.shutdown.grace, config.nats.manage_topology);
    running.spawn(consume_until(
        broker.clone(),
        config.clone(),
        settings,
        Arc::new(handler),
        shutdown.clone(),
    ));
}

async fn consume_until<H: consume::MessageHandler>(
    broker: Broker,
    config: Config,
    settings: ConsumerSettings,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    consume::run(broker, config.topology, settings, handler, shutdown).await;
    Ok(())
}

/// Waits for every role; the first failure is the process's failure.
async fn drain(mut running: JoinSet<anyhow::Result<()>>) -> anyhow::Result<()> {
    let mut first_error = None;
    while let Some(result) = running.join_next().await {
        let result = result.context("a role panicked").and_then(|r| r);
        if let Err(e) = result {
            tracing::error!(error = %e, "role failed");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}
