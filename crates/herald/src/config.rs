//! Configuration in layers: built-in defaults, then an optional TOML file
//! (`--config` or `HERALD_CONFIG`), then `HERALD_*` environment variables
//! (`HERALD_NATS__URL`, `HERALD_WEBHOOKS__CONCURRENCY`: `__` separates
//! levels), then command-line flags. The result is validated before any
//! role starts; a bad value stops the process with a message naming it.
//! `config.example.toml` documents every key.

use std::{path::Path, time::Duration};

use anyhow::{Context, bail};
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use herald_api::ApiConfig;
use herald_operator::OperatorConfig;
use herald_queue::TopologyConfig;
use herald_worker::{mail::MailConfig, tasks::TaskWorkerConfig, webhooks::WebhookWorkerConfig};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub topology: TopologyConfig,
    pub api: ApiConfig,
    pub tasks: TaskWorkerConfig,
    pub webhooks: WebhookWorkerConfig,
    pub mail: MailConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub health: HealthConfig,
    pub operator: OperatorConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight work may run after SIGTERM/SIGINT.
    #[serde(with = "herald_worker::duration_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(25),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Where workers (and the operator) serve `/healthz`, `/readyz` and
    /// `/metrics`, such as `0.0.0.0:8081`; empty: not served. The API serves
    /// them on its own address.
    pub listen: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `herald=debug,info`; `RUST_LOG`
    /// wins when set.
    pub filter: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// Top-level sections; other `HERALD_*` variables (`HERALD_CONFIG`,
/// `HERALD_TOOLS`...) are not configuration keys.
const SECTIONS: [&str; 10] = [
    "nats", "topology", "api", "tasks", "webhooks", "mail", "shutdown", "log", "health", "operator",
];

/// Builds the configuration from every layer. `overrides` are the flags,
/// as a partial config (only the keys given on the command line).
pub fn load(file: Option<&Path>, overrides: serde_json::Value) -> anyhow::Result<Config> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(file) = file {
        if !file.exists() {
            bail!("config file {} does not exist", file.display());
        }
        figment = figment.merge(Toml::file(file));
    }
    let config: Config = figment
        .merge(
            Env::prefixed("HERALD_")
                .filter(|key| {
                    SECTIONS.iter().any(|s| {
                        key.as_str()
                            .to_ascii_lowercase()
                            .starts_with(&format!("{s}__"))
                    })
                })
                .split("__"),
        )
        .merge(Serialized::defaults(overrides))
        .extract()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    config.validate()?;
    Ok(config)
}

impl Config {
    fn validate(&self) -> anyhow::Result<()> {
        if self.nats.url.trim().is_empty() {
            bail!("invalid configuration: nats.url is empty");
        }
        self.api
            .listen
            .parse::<std::net::SocketAddr>()
            .with_context(|| {
                format!(
                    "invalid configuration: api.listen {:?} is not host:port",
                    self.api.listen
                )
            })?;
        if self.api.max_body_bytes == 0
            || self.api.max_body_bytes >= self.topology.max_message_bytes as usize
        {
            bail!(
                "invalid configuration: api.max_body_bytes must be between 1 and topology.max_message_bytes ({})",
                self.topology.max_message_bytes
            );
        }
        if !self.health.listen.is_empty() {
            self.health
                .listen
                .parse::<std::net::SocketAddr>()
                .with_context(|| {
                    format!(
                        "invalid configuration: health.listen {:?} is not host:port",
                        self.health.listen
                    )
                })?;
        }
        for (name, value) in [
            ("tasks.concurrency", self.tasks.concurrency),
            ("webhooks.concurrency", self.webhooks.concurrency),
            ("mail.concurrency", self.mail.concurrency),
            ("topology.replicas", self.topology.replicas),
        ] {
            if value == 0 {
                bail!("invalid configuration: {name} must be at least 1");
            }
        }
        let longest_schedule = self
            .webhooks
            .retry_schedule
            .max_attempts()
            .max(self.mail.retry_schedule.max_attempts());
        if self.topology.max_deliver <= i64::from(longest_schedule) {
            bail!(
                "invalid configuration: topology.max_deliver ({}) must exceed the longest retry schedule ({longest_schedule} attempts)",
                self.topology.max_deliver
            );
        }
        if self.webhooks.timeout >= self.topology.ack_wait * 3 {
            bail!("invalid configuration: webhooks.timeout must be well below topology.ack_wait");
        }
        self.operator
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        self.mail
            .from_mailbox()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flags_override_defaults_and_bad_values_are_named() {
        let config = load(None, json!({ "api": { "listen": "127.0.0.1:1234" } })).unwrap();
        assert_eq!(config.api.listen, "127.0.0.1:1234");
        let err = load(None, json!({ "api": { "listen": "nowhere" } })).unwrap_err();
        assert!(err.to_string().contains("api.listen"), "{err}");
        let err = load(None, json!({ "webhooks": { "retry_schedule": ["soon"] } })).unwrap_err();
        assert!(err.to_string().contains("soon"), "{err}");
        let err = load(None, json!({ "tasks": { "concurrency": 0 } })).unwrap_err();
        assert!(err.to_string().contains("tasks.concurrency"), "{err}");
        let err = load(
            None,
            json!({ "webhooks": { "ssrf": { "allow": ["127.0.0.0/8", "10.0.0.0/33"] } } }),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("webhooks.ssrf.allow") && err.to_string().contains("/33"),
            "{err}"
        );
    }

    #[test]
    fn the_example_file_is_valid_and_complete() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config.example.toml");
        let from_file = load(Some(&file), json!({})).unwrap();
        let defaults = serde_json::to_value(Config::default()).unwrap();
        assert_eq!(
            serde_json::to_value(from_file).unwrap(),
            defaults,
            "config.example.toml drifted from the defaults"
        );
        // Every key is written out in the file, not filled in by a default.
        let file_only: serde_json::Value = Figment::from(Toml::file(&file)).extract().unwrap();
        assert_eq!(
            file_only, defaults,
            "config.example.toml does not list every key"
        );
    }
}
