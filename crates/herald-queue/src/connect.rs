//! The NATS connection every role shares: the server URL, how the process
//! authenticates (a `.creds` file, an NKey seed, a user and password, or a
//! token, each read from a file) and TLS (a CA, a client certificate for
//! mutual TLS).
//!
//! A wrong credential, an untrusted certificate or a missing file stops the
//! process at start with a message naming the setting: a role that cannot
//! ever be let in must not sit there looking healthy. A server that is not
//! up yet is not an error: the client keeps trying in the background.

mod link;
mod settings;

use std::{sync::Arc, time::Duration};

use async_nats::{Client, jetstream};
use link::Link;
use serde::{Deserialize, Serialize};
use settings::Settings;

use crate::{QueueError, buckets::Buckets};

/// `[nats]` in Herald's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated.
    pub url: String,
    /// A `.creds` file (user JWT and NKey seed), for servers with
    /// decentralized (operator/account) auth.
    pub credentials_file: String,
    /// A file holding an NKey user seed (`SU...`).
    pub nkey_seed_file: String,
    /// A user name; its password comes from `password_file`.
    pub user: String,
    /// The file holding `user`'s password.
    pub password_file: String,
    /// A file holding an authentication token.
    pub token_file: String,
    /// Whether this process creates and updates the streams, consumers and
    /// buckets at start-up (its credentials need the rights); `false`: it
    /// waits until they exist.
    pub manage_topology: bool,
    pub tls: NatsTlsConfig,
}

/// `[nats.tls]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsTlsConfig {
    /// PEM file of the CA(s) that sign the server's certificate; empty: the
    /// system's roots.
    pub ca_file: String,
    /// PEM client certificate (chain) for mutual TLS; needs `key_file`.
    pub cert_file: String,
    /// PEM private key of `cert_file`.
    pub key_file: String,
    /// Refuse to talk to a server that does not offer TLS (implied by a
    /// `tls://` URL or by any other TLS setting).
    pub required: bool,
    /// TLS handshake before the server's INFO, for servers configured with
    /// `handshake_first`.
    pub first: bool,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            credentials_file: String::new(),
            nkey_seed_file: String::new(),
            user: String::new(),
            password_file: String::new(),
            token_file: String::new(),
            manage_topology: true,
            tls: NatsTlsConfig::default(),
        }
    }
}

impl NatsConfig {
    /// A configuration with only a URL: no auth, no TLS (`herald dev`,
    /// tests).
    pub fn url(url: &str) -> Self {
        Self {
            url: url.to_string(),
            ..Self::default()
        }
    }
}

/// Why a role could not connect; every message names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A setting is inconsistent, or its file is missing or unreadable.
    #[error("invalid configuration: {setting}: {message}")]
    Setting {
        setting: &'static str,
        message: String,
    },
    /// The server was reached and turned this process away: credentials or
    /// certificates it will never accept.
    #[error("NATS refused the connection: {message}")]
    Refused { message: String },
}

/// A connected client with its JetStream context. Its fields are this
/// crate's: roles go through its methods, so what Herald does with NATS
/// is all in this crate.
#[derive(Clone)]
pub struct Broker {
    pub(crate) client: Client,
    pub(crate) jetstream: jetstream::Context,
    pub(crate) buckets: Arc<Buckets>,
    settings: Arc<Settings>,
    /// `topology.store_timeout`: how long a publish that can be sent again
    /// safely keeps trying through a failover.
    pub(crate) store_timeout: Duration,
    pub(crate) link: Arc<Link>,
}

/// How long a JetStream request (publish ack, API call) may take before the
/// caller treats NATS as unavailable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects to `url` with no credentials and no TLS (`herald dev`, tests).
/// See [`connect_with`].
pub async fn connect(url: &str, name: &str) -> Result<Broker, ConnectError> {
    connect_with(&NatsConfig::url(url), name).await
}

/// Connects as `config` says. Settings are checked and secret files read
/// first; then one attempt: a server that refuses the credentials or the
/// certificates ends the start with [`ConnectError::Refused`]. A server that
/// cannot be reached yet does not: the call returns at once and the client
/// keeps trying in the background (and reconnects forever after), and
/// [`Broker::refused`] tells the start-up loops when it is finally reached
/// and refuses. Use [`Broker::is_connected`] for readiness.
pub async fn connect_with(config: &NatsConfig, name: &str) -> Result<Broker, ConnectError> {
    let settings = Arc::new(Settings::read(config, name)?);
    if settings.try_once().await?.is_none() {
        tracing::warn!(url = %settings.url, "NATS not reachable yet; retrying in the background");
    }
    // The role's own client, with reconnects; the probe connection above
    // (if any) is dropped.
    let link = Arc::new(Link::default());
    let client = settings
        .options(Some(link.clone()))
        .connect(settings.servers.as_slice())
        .await
        .map_err(|e| ConnectError::Setting {
            setting: "nats.url",
            message: e.to_string(),
        })?;
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .build(client.clone());
    Ok(Broker {
        client,
        jetstream,
        buckets: Arc::default(),
        settings,
        store_timeout: crate::TopologyConfig::default().store_timeout,
        link,
    })
}

impl Broker {
    /// This broker with `topology.store_timeout` set: see
    /// [`Broker::publish_stored`].
    pub fn storing_within(self, store_timeout: Duration) -> Broker {
        Broker {
            store_timeout,
            ..self
        }
    }

    /// Sends what the client has buffered and waits for the server to have
    /// it (core NATS); JetStream publishes wait for their acks anyway.
    pub async fn flush(&self) -> Result<(), QueueError> {
        self.client
            .flush()
            .await
            .map_err(|e| QueueError::request("flush", e))
    }

    /// The raw JetStream context, for tests that look at or break what
    /// Herald stored (feature `test-util`; no role turns it on).
    #[cfg(feature = "test-util")]
    pub fn jetstream_for_tests(&self) -> &jetstream::Context {
        &self.jetstream
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// While the client is not connected: whether the server can be reached
    /// and refuses this process (one extra connection attempt). Start-up
    /// loops call it between tries, so a role started before NATS still
    /// stops with a clear message once NATS turns it away.
    pub async fn refused(&self) -> Option<ConnectError> {
        if self.is_connected() {
            return None;
        }
        self.settings.try_once().await.err()
    }
}
