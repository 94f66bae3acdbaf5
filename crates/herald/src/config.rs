//! Configuration in layers: built-in defaults, then an optional TOML file
//! (`--config` or `HERALD_CONFIG`), then `HERALD_*` environment variables
//! (`HERALD_NATS__URL`, `HERALD_WEBHOOKS__CONCURRENCY`: `__` separates
//! levels), then command-line flags. The result is validated before any
//! role starts; a bad value stops the process with a message naming it.
//! `config.example.toml` documents every key.

use std::{fmt, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use herald_api::ApiConfig;
use herald_core::keyring::Keyring;
use herald_operator::OperatorConfig;
use herald_queue::{TopologyConfig, endpoints::RecordWriter};
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
    pub tracing: TracingConfig,
    pub health: HealthConfig,
    pub operator: OperatorConfig,
    pub secrets: SecretsConfig,
    pub endpoint_cache: EndpointCacheConfig,
}

/// The endpoints each worker keeps in memory: those of the users it looked
/// up most recently, read from `herald-endpoints` on a miss and kept true
/// by a watch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EndpointCacheConfig {
    /// Users whose endpoints a worker keeps (about 1.2 KB per endpoint).
    pub users: usize,
}

impl Default for EndpointCacheConfig {
    fn default() -> Self {
        Self { users: 10_000 }
    }
}

/// The keyring that seals endpoint records (and so signing secrets) in
/// `herald-endpoints`, and the signing-secret rotation overlap.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SecretsConfig {
    /// A file holding the keyring: one `<id>:<base64 32 bytes>` key per
    /// line, the first encrypting (`herald secrets new-key` makes one).
    pub key_file: String,
    /// The keyring itself, keys separated by commas; for
    /// `HERALD_SECRETS__KEY`. Set this or `key_file`, not both.
    pub key: String,
    /// How long a replaced signing secret keeps signing next to the new one.
    #[serde(with = "herald_core::duration_serde")]
    pub rotation_overlap: Duration,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        Self {
            key_file: String::new(),
            key: String::new(),
            rotation_overlap: Duration::from_secs(24 * 3600),
        }
    }
}

impl fmt::Debug for SecretsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretsConfig")
            .field("key_file", &self.key_file)
            .field("key", &if self.key.is_empty() { "" } else { "***" })
            .field("rotation_overlap", &self.rotation_overlap)
            .finish()
    }
}

impl SecretsConfig {
    /// The configured keyring, if any.
    pub fn keyring(&self) -> anyhow::Result<Option<Keyring>> {
        let (text, source) = match (self.key.trim().is_empty(), self.key_file.is_empty()) {
            (true, true) => return Ok(None),
            (false, false) => {
                bail!("invalid configuration: set secrets.key or secrets.key_file, not both")
            }
            (false, true) => (self.key.clone(), "secrets.key".to_string()),
            (true, false) => (
                std::fs::read_to_string(&self.key_file).with_context(|| {
                    format!(
                        "invalid configuration: cannot read secrets.key_file {}",
                        self.key_file
                    )
                })?,
                format!("secrets.key_file {}", self.key_file),
            ),
        };
        Keyring::parse(&text)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("invalid configuration: {source}: {e}"))
    }

    /// The keyring a role that reads or writes endpoint records needs;
    /// without one it refuses to start rather than store or expect
    /// secrets in clear.
    pub fn require_keyring(&self, role: &str) -> anyhow::Result<Arc<Keyring>> {
        self.keyring()?.map(Arc::new).with_context(|| {
            format!(
                "{role} needs the key that encrypts signing secrets in herald-endpoints: \
                 set secrets.key_file (HERALD_SECRETS__KEY_FILE) or HERALD_SECRETS__KEY; \
                 make one with `herald secrets new-key`"
            )
        })
    }

    /// How a role that writes endpoint records writes them.
    pub fn record_writer(&self, role: &str) -> anyhow::Result<RecordWriter> {
        Ok(RecordWriter {
            keyring: self.require_keyring(role)?,
            rotation_overlap: self.rotation_overlap,
        })
    }
}

/// `[nats]`: the server, credentials and TLS; defined next to the code
/// that connects (`herald_queue::connect`).
pub use herald_queue::NatsConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight work may run after SIGTERM/SIGINT.
    #[serde(with = "herald_core::duration_serde")]
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

/// Where traces go (OpenTelemetry over OTLP). Every key left empty falls
/// back to the standard `OTEL_*` variable; with no endpoint in either,
/// nothing is traced and nothing is exported.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's base URL, such as `http://otel-collector:4318`
    /// (`/v1/traces` is added for HTTP). Empty: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// or `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: String,
    /// `grpc` or `http/protobuf`. Empty: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf`.
    pub protocol: String,
    /// The `service.name` of the spans. Empty: `OTEL_SERVICE_NAME`, else `herald`.
    pub service_name: String,
    /// The share of new traces kept, 0 to 1, honouring a caller's decision
    /// for traces it started. Unset: `OTEL_TRACES_SAMPLER`, else all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_ratio: Option<f64>,
}

/// The top-level sections, `Config`'s own field names: only
/// `HERALD_<SECTION>__...` variables are configuration keys; other
/// `HERALD_*` variables (`HERALD_CONFIG`, `HERALD_TOOLS`...) are not.
fn sections() -> Vec<String> {
    match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(fields)) => fields.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

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
    let sections = sections();
    let config: Config = figment
        .merge(
            Env::prefixed("HERALD_")
                .filter(move |key| {
                    let key = key.as_str().to_ascii_lowercase();
                    sections.iter().any(|s| key.starts_with(&format!("{s}__")))
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
        if self.endpoint_cache.users == 0 {
            bail!("invalid configuration: endpoint_cache.users must be at least 1");
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
        let max_depth = herald_core::json::MAX_INPUT_DEPTH;
        if !(1..=max_depth).contains(&self.api.max_json_depth) {
            bail!(
                "invalid configuration: api.max_json_depth must be between 1 and {max_depth} \
                 (stored payloads nest the input a few levels deeper, and must stay within \
                 serde_json's limit of {})",
                herald_core::json::SERDE_DEPTH_LIMIT
            );
        }
        if self.topology.store_timeout >= self.topology.duplicate_window {
            bail!(
                "invalid configuration: topology.store_timeout must be shorter than topology.duplicate_window \
                 (a task sent again after the window could be stored twice)"
            );
        }
        if self.api.max_connections == 0 {
            bail!("invalid configuration: api.max_connections must be at least 1");
        }
        for (name, value) in [
            ("api.header_read_timeout", self.api.header_read_timeout),
            ("api.body_read_timeout", self.api.body_read_timeout),
            ("topology.store_timeout", self.topology.store_timeout),
        ] {
            if value.is_zero() {
                bail!("invalid configuration: {name} must be longer than 0s");
            }
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
            (
                "operator.concurrency",
                usize::from(self.operator.concurrency),
            ),
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
        // A malformed keyring stops every role at once, not only those
        // that read endpoints.
        self.secrets.keyring()?;
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
    fn a_keyring_comes_from_the_environment_or_a_file_and_is_checked() {
        let key = herald_core::keyring::new_key_text("k1").unwrap();
        let config = load(None, json!({ "secrets": { "key": key } })).unwrap();
        assert_eq!(config.secrets.require_keyring("x").unwrap().ids(), ["k1"]);
        assert!(!format!("{config:?}").contains(&key));

        let file = tempfile::NamedTempFile::new().unwrap();
        let k2 = herald_core::keyring::new_key_text("k2").unwrap();
        std::fs::write(file.path(), format!("{k2}\n{key}\n")).unwrap();
        let path = file.path().display().to_string();
        let config = load(None, json!({ "secrets": { "key_file": path } })).unwrap();
        assert_eq!(
            config.secrets.keyring().unwrap().unwrap().ids(),
            ["k2", "k1"]
        );

        let err = load(None, json!({ "secrets": { "key": "k1:short" } })).unwrap_err();
        assert!(err.to_string().contains("secrets.key"), "{err}");
        let err = load(None, json!({ "secrets": { "key": key, "key_file": path } })).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let err = Config::default()
            .secrets
            .require_keyring("herald operator")
            .unwrap_err();
        assert!(
            err.to_string().contains("herald operator")
                && err.to_string().contains("HERALD_SECRETS__KEY_FILE"),
            "{err}"
        );
    }

    #[test]
    fn the_example_file_is_valid_and_complete() {
        let file = Path::new(
            &std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests"),
        )
        .join("../../config.example.toml");
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
