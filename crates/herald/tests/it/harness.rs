//! Starting Herald against the testkit's servers.

use std::{process::Stdio, time::Duration};

use herald::{
    config::Config,
    roles::{self, Roles},
};
use herald_core::{payload::EndpointConfig, schedule::RetrySchedule, signing::SigningSecret};
use herald_crd::WebhookEndpointSpec;
use herald_queue::Broker;
use herald_testkit::{Mailpit, NatsServer, wait_until};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const DEADLINE: Duration = Duration::from_secs(30);

/// The keyring that seals endpoint records in tests (`herald secrets
/// new-key --id test`); every role a test starts gets it.
pub const TEST_KEY: &str = "test:HqWjj/vKuy7sEWzqDN5kuOo291IaepnS170DQB/TvRw=";

/// Herald's roles running in this process.
pub struct Herald {
    pub api: String,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    running: Option<JoinHandle<anyhow::Result<()>>>,
}

/// The SSRF guard's allow-list for a child process: receivers live on
/// loopback.
pub const ALLOW_LOOPBACK_ENV: (&str, &str) = (
    "HERALD_WEBHOOKS__SSRF__ALLOW",
    r#"["127.0.0.0/8", "::1/128"]"#,
);

/// A configuration for tests: millisecond retries, local SMTP, and the
/// SSRF guard opened for loopback.
pub fn test_config(nats: &NatsServer, mail: Option<&Mailpit>) -> Config {
    let mut config = Config::default();
    config.nats.url = nats.url();
    config.webhooks.ssrf.allow = herald_worker::ssrf::LOOPBACK.to_vec();
    config.webhooks.retry_schedule = schedule(&[10, 20, 30]);
    config.webhooks.timeout = Duration::from_secs(5);
    config.webhooks.health_flush_interval = Duration::from_millis(100);
    config.mail.retry_schedule = schedule(&[50, 100]);
    config.shutdown.grace = Duration::from_secs(5);
    config.secrets.key = TEST_KEY.into();
    if let Some(mail) = mail {
        config.mail.smtp_port = mail.smtp_port();
    }
    config
}

pub fn schedule(ms: &[u64]) -> RetrySchedule {
    RetrySchedule::new(ms.iter().map(|m| Duration::from_millis(*m)).collect()).unwrap()
}

impl Herald {
    pub async fn start(config: Config, roles: Roles) -> Herald {
        Self::start_with_handlers(
            config,
            roles,
            herald_worker::handlers::HandlerRegistry::with_builtins,
        )
        .await
    }

    /// Like [`Herald::start`], with the task handlers `handlers` makes.
    pub async fn start_with_handlers(
        config: Config,
        roles: Roles,
        handlers: fn(Duration) -> herald_worker::handlers::HandlerRegistry,
    ) -> Herald {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let broker = herald_queue::connect(&config.nats.url, "herald-test")
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let running = tokio::spawn(roles::run_with(
            config,
            roles,
            broker,
            Some(listener),
            handlers,
            shutdown.clone(),
        ));
        let herald = Herald {
            api,
            http: herald_testkit::http_client(),
            shutdown,
            running: Some(running),
        };
        let http = herald.http.clone();
        let ready = format!("{}/readyz", herald.api);
        wait_until("the API to be ready", DEADLINE, || {
            let http = http.clone();
            let ready = ready.clone();
            async move {
                let response = http.get(&ready).send().await.ok()?;
                response.status().is_success().then_some(())
            }
        })
        .await;
        herald
    }

    /// Posts a task; returns the status and the JSON body.
    pub async fn post_task(&self, user: &str, task_type: &str, body: Value) -> (u16, Value) {
        self.post_task_with(user, task_type, body, None).await
    }

    pub async fn post_task_with(
        &self,
        user: &str,
        task_type: &str,
        body: Value,
        idempotency_key: Option<&str>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .post(format!("{}/users/{user}/tasks/{task_type}", self.api))
            .json(&body);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Posts a task that must be accepted; returns its id.
    pub async fn accept(&self, user: &str, task_type: &str, body: Value) -> String {
        let (status, response) = self.post_task(user, task_type, body).await;
        assert_eq!(status, 201, "task not accepted: {response}");
        response["id"].as_str().unwrap().to_string()
    }

    pub async fn get_task(&self, user: &str, id: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}/users/{user}/tasks/{id}", self.api))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Waits until the task reaches `state`; returns the task.
    pub async fn wait_for_state(&self, user: &str, id: &str, state: &str) -> Value {
        self.wait_for_state_in(user, id, &[state]).await
    }

    /// Waits until the task reaches one of `states`; returns the task.
    pub async fn wait_for_state_in(&self, user: &str, id: &str, states: &[&str]) -> Value {
        let what = format!("task {id} to reach a state in {states:?}");
        wait_until(&what, DEADLINE, || async {
            let (status, task) = self.get_task(user, id).await;
            (status == 200 && states.iter().any(|s| task["state"] == *s)).then_some(task)
        })
        .await
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.await.unwrap().unwrap();
        }
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.abort();
        }
    }
}

/// Registers an endpoint for `user` in herald-endpoints (before Herald
/// starts, so the workers' first load has it).
pub async fn add_endpoint(
    nats: &NatsServer,
    user: &str,
    name: &str,
    url: &str,
    email: Option<&str>,
) -> (EndpointConfig, SigningSecret) {
    add_endpoint_spec(
        nats,
        name,
        json!({ "userId": user, "url": url, "email": email }),
    )
    .await
}

/// Like [`add_endpoint`], with any WebhookEndpoint spec.
pub async fn add_endpoint_spec(
    nats: &NatsServer,
    name: &str,
    spec: Value,
) -> (EndpointConfig, SigningSecret) {
    let broker = broker(nats).await;
    let secret = SigningSecret::generate();
    let spec: WebhookEndpointSpec = serde_json::from_value(spec).unwrap();
    let config = spec
        .to_config("default", name, vec![secret.clone()])
        .unwrap();
    herald_queue::topology::ensure(&broker, &Default::default())
        .await
        .unwrap();
    let records = test_config(nats, None)
        .secrets
        .record_writer("a test")
        .unwrap();
    herald_queue::endpoints::put_if_changed(&broker, &records, &config)
        .await
        .unwrap();
    (config, secret)
}

/// The durable consumer `consumer` of `stream`, as a test taking or
/// counting its messages sees it.
pub async fn durable_consumer(
    broker: &Broker,
    stream: &str,
    consumer: &str,
) -> async_nats::jetstream::consumer::PullConsumer {
    broker
        .jetstream_for_tests()
        .get_stream(stream)
        .await
        .unwrap()
        .get_consumer(consumer)
        .await
        .unwrap()
}

pub async fn broker(nats: &NatsServer) -> Broker {
    let broker = herald_queue::connect(&nats.url(), "herald-test-setup")
        .await
        .unwrap();
    wait_until("NATS to connect", DEADLINE, || async {
        broker.is_connected().then_some(())
    })
    .await;
    broker
}

/// `herald worker tasks,webhooks` as a child process (killed if dropped),
/// configured through `HERALD_*` variables as a Deployment would be; the
/// SSRF guard allows loopback unless `env` says otherwise.
pub fn worker_process(nats: &NatsServer, env: &[(&str, &str)]) -> tokio::process::Child {
    worker_command(nats, "tasks,webhooks", env)
        .spawn()
        .expect("start herald worker")
}

/// `herald worker <kinds>` as [`worker_process`] starts it, to be spawned
/// by the caller (who may redirect its log, stderr, or change its filter).
pub fn worker_command(
    nats: &NatsServer,
    kinds: &str,
    env: &[(&str, &str)],
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    command
        .args(["worker", kinds, "--nats-url", &nats.url()])
        .env("HERALD_SECRETS__KEY", TEST_KEY)
        .env(ALLOW_LOOPBACK_ENV.0, ALLOW_LOOPBACK_ENV.1)
        .env("HERALD_LOG__FILTER", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Waits until the delivery of `task` to `endpoint` waits in
/// `HERALD_WEBHOOKS` as a message schedule (a retry or a deferral).
pub async fn wait_for_scheduled_delivery(
    nats: &NatsServer,
    user: &str,
    endpoint: &str,
    task: &str,
) {
    let broker = broker(nats).await;
    let stream = broker
        .jetstream_for_tests()
        .get_stream(herald_core::names::WEBHOOKS_STREAM)
        .await
        .unwrap();
    let subject = herald_core::names::retry_subject(
        &user.parse().unwrap(),
        &endpoint.parse().unwrap(),
        &task.parse().unwrap(),
        None,
    );
    wait_until(&format!("a schedule on {subject}"), DEADLINE, || {
        let stream = stream.clone();
        let subject = subject.clone();
        async move {
            stream
                .get_last_raw_message_by_subject(&subject)
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
}
