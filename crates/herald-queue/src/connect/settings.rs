//! What a role connects with: the `[nats]` settings checked and their
//! secret files read at start, the options of each connection attempt, and
//! what to tell the operator when the server turns the process away.

use std::{path::PathBuf, sync::Arc, time::Duration};

use async_nats::{Client, ConnectErrorKind, ConnectOptions, ServerAddr};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{ConnectError, Link, NatsConfig, NatsTlsConfig, REQUEST_TIMEOUT};

fn setting(setting: &'static str, message: impl Into<String>) -> ConnectError {
    ConnectError::Setting {
        setting,
        message: message.into(),
    }
}

/// How the process proves who it is; the secret is read once, at start.
enum Credentials {
    None,
    Creds(String),
    NKey(String),
    UserPassword(String, String),
    Token(String),
}

impl Credentials {
    /// The setting(s) an operator fixes when the server refuses them.
    fn settings(&self) -> &'static str {
        match self {
            Credentials::None => {
                "no credentials are configured (set nats.credentials_file, nats.nkey_seed_file, \
                 nats.user and nats.password_file, or nats.token_file)"
            }
            Credentials::Creds(_) => "nats.credentials_file",
            Credentials::NKey(_) => "nats.nkey_seed_file",
            Credentials::UserPassword(..) => "nats.user and nats.password_file",
            Credentials::Token(_) => "nats.token_file",
        }
    }
}

/// Everything needed to open a connection, checked and read from files.
pub(super) struct Settings {
    /// `nats.url` as given, for logs.
    pub(super) url: String,
    /// The servers it lists: the client tries them in turn and reconnects
    /// to whichever answers (a cluster's seed list).
    pub(super) servers: Vec<ServerAddr>,
    name: String,
    credentials: Credentials,
    tls: NatsTlsConfig,
}

/// `nats.url`: one server URL, or several separated by commas (spaces
/// around them allowed), each `nats://`, `tls://` or a bare `host:port`.
fn parse_servers(text: &str) -> Result<Vec<ServerAddr>, ConnectError> {
    let servers = text
        .split(',')
        .map(str::trim)
        .filter(|server| !server.is_empty())
        .map(|server| {
            server.parse::<ServerAddr>().map_err(|e| {
                setting(
                    "nats.url",
                    format!("{server:?} is not a server address: {e}"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(setting("nats.url", "is empty"));
    }
    Ok(servers)
}

fn read_secret(name: &'static str, path: &str) -> Result<String, ConnectError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| setting(name, format!("cannot read {path}: {e}")))?;
    let text = text.trim().to_string();
    if text.is_empty() {
        return Err(setting(name, format!("{path} is empty")));
    }
    Ok(text)
}

fn check_certificates(name: &'static str, path: &str) -> Result<(), ConnectError> {
    let found = CertificateDer::pem_file_iter(path)
        .map_err(|e| setting(name, format!("cannot read {path}: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setting(name, format!("{path} is not PEM: {e}")))?;
    if found.is_empty() {
        return Err(setting(name, format!("{path} holds no PEM certificate")));
    }
    Ok(())
}

impl Settings {
    pub(super) fn read(config: &NatsConfig, name: &str) -> Result<Settings, ConnectError> {
        let servers = parse_servers(&config.url)?;
        let given = [
            !config.credentials_file.is_empty(),
            !config.nkey_seed_file.is_empty(),
            !config.user.is_empty() || !config.password_file.is_empty(),
            !config.token_file.is_empty(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(setting(
                "nats",
                "set one of credentials_file, nkey_seed_file, user (with password_file) or \
                 token_file, not several",
            ));
        }
        let credentials = if !config.credentials_file.is_empty() {
            let text = read_secret("nats.credentials_file", &config.credentials_file)?;
            // Parsed now, so a broken file is named here rather than failing
            // every connection attempt.
            ConnectOptions::with_credentials(&text).map_err(|e| {
                setting(
                    "nats.credentials_file",
                    format!("{} is not a NATS .creds file: {e}", config.credentials_file),
                )
            })?;
            Credentials::Creds(text)
        } else if !config.nkey_seed_file.is_empty() {
            let seed = read_secret("nats.nkey_seed_file", &config.nkey_seed_file)?;
            nkeys::KeyPair::from_seed(&seed).map_err(|e| {
                setting(
                    "nats.nkey_seed_file",
                    format!("{} is not an NKey seed: {e}", config.nkey_seed_file),
                )
            })?;
            Credentials::NKey(seed)
        } else if !config.user.is_empty() || !config.password_file.is_empty() {
            if config.user.is_empty() {
                return Err(setting(
                    "nats.user",
                    "is empty but nats.password_file is set",
                ));
            }
            if config.password_file.is_empty() {
                return Err(setting(
                    "nats.password_file",
                    "is empty but nats.user is set (passwords come from a file)",
                ));
            }
            let password = read_secret("nats.password_file", &config.password_file)?;
            Credentials::UserPassword(config.user.clone(), password)
        } else if !config.token_file.is_empty() {
            Credentials::Token(read_secret("nats.token_file", &config.token_file)?)
        } else {
            Credentials::None
        };

        let tls = &config.tls;
        if tls.cert_file.is_empty() != tls.key_file.is_empty() {
            return Err(setting(
                "nats.tls.cert_file",
                "a client certificate needs both nats.tls.cert_file and nats.tls.key_file",
            ));
        }
        if !tls.ca_file.is_empty() {
            check_certificates("nats.tls.ca_file", &tls.ca_file)?;
        }
        if !tls.cert_file.is_empty() {
            check_certificates("nats.tls.cert_file", &tls.cert_file)?;
            PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|e| {
                setting(
                    "nats.tls.key_file",
                    format!("cannot read a PEM private key from {}: {e}", tls.key_file),
                )
            })?;
        }
        Ok(Settings {
            url: config.url.clone(),
            servers,
            name: name.to_string(),
            credentials,
            tls: tls.clone(),
        })
    }

    fn uses_tls(&self) -> bool {
        let tls = &self.tls;
        tls.required || tls.first || !tls.ca_file.is_empty() || !tls.cert_file.is_empty()
    }

    /// The options of one client; `retry` keeps trying while the server is
    /// not up (the role's long-lived client), otherwise one attempt.
    pub(super) fn options(&self, retry: Option<Arc<Link>>) -> ConnectOptions {
        let mut options = match &self.credentials {
            Credentials::None => ConnectOptions::new(),
            Credentials::Creds(text) => {
                ConnectOptions::with_credentials(text).expect("parsed when the settings were read")
            }
            Credentials::NKey(seed) => ConnectOptions::with_nkey(seed.clone()),
            Credentials::UserPassword(user, password) => {
                ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            Credentials::Token(token) => ConnectOptions::with_token(token.clone()),
        };
        let tls = &self.tls;
        if !tls.ca_file.is_empty() {
            options = options.add_root_certificates(PathBuf::from(&tls.ca_file));
        }
        if !tls.cert_file.is_empty() {
            options = options.add_client_certificate(
                PathBuf::from(&tls.cert_file),
                PathBuf::from(&tls.key_file),
            );
        }
        if self.uses_tls() {
            options = options.require_tls(true);
        }
        if tls.first {
            options = options.tls_first();
        }
        options = options
            .name(&self.name)
            .connection_timeout(Duration::from_secs(2))
            .request_timeout(Some(REQUEST_TIMEOUT));
        if let Some(link) = retry {
            let settings = self.credentials.settings();
            options = options
                .retry_on_initial_connect()
                .max_reconnects(None)
                .event_callback(move |event| {
                    let link = link.clone();
                    async move {
                    match event {
                        async_nats::Event::Connected => {
                            link.connected();
                            tracing::info!("connected to NATS")
                        }
                        async_nats::Event::Disconnected => {
                            link.lost();
                            tracing::warn!("disconnected from NATS")
                        }
                        // A reconnect turned away: revoked credentials, a
                        // rotated CA. The role stays up, not ready, and says
                        // what to look at.
                        async_nats::Event::ClientError(async_nats::ClientError::Other(e))
                            if is_auth_refusal(&e) =>
                        {
                            tracing::error!(error = %e, check = settings, "NATS refuses this process")
                        }
                        async_nats::Event::ServerError(e) => {
                            tracing::error!(error = %e, "NATS server error")
                        }
                        other => tracing::debug!(event = %other, "NATS event"),
                    }
                    }
                });
        }
        options
    }

    /// What to tell the operator when the server turned the process away.
    fn refusal(&self, error: &async_nats::ConnectError) -> Option<ConnectError> {
        let text = error.to_string();
        let message = match error.kind() {
            ConnectErrorKind::AuthorizationViolation => format!(
                "it does not accept this process's credentials ({text}): check {}",
                self.credentials.settings()
            ),
            ConnectErrorKind::Authentication => format!(
                "cannot sign the server's challenge ({text}): check {}",
                self.credentials.settings()
            ),
            // Handshake failures surface as I/O errors carrying rustls's
            // reason; a refused TCP connection does not mention certificates.
            ConnectErrorKind::Tls | ConnectErrorKind::Io if is_tls_failure(&text) => {
                self.tls_refusal(&text)
            }
            _ => return None,
        };
        Some(ConnectError::Refused { message })
    }

    fn tls_refusal(&self, text: &str) -> String {
        let tls = &self.tls;
        let server_side = text.contains("alert") || text.contains("CertificateRequired");
        if server_side {
            if tls.cert_file.is_empty() {
                format!(
                    "TLS failed ({text}): the server wants a client certificate: set \
                     nats.tls.cert_file and nats.tls.key_file"
                )
            } else {
                format!(
                    "TLS failed ({text}): the server does not trust the client certificate in \
                     nats.tls.cert_file ({})",
                    tls.cert_file
                )
            }
        } else if tls.ca_file.is_empty() {
            format!(
                "TLS failed ({text}): the server's certificate is not signed by a system root: \
                 set nats.tls.ca_file to the CA that signed it"
            )
        } else {
            format!(
                "TLS failed ({text}): check nats.tls.ca_file ({}): it must hold the CA that \
                 signed the server's certificate, for the host in nats.url",
                tls.ca_file
            )
        }
    }

    /// One connection attempt: the server's answer, or `Ok(None)` when it
    /// could not be reached at all.
    pub(super) async fn try_once(&self) -> Result<Option<Client>, ConnectError> {
        match self.options(None).connect(self.servers.as_slice()).await {
            Ok(client) => Ok(Some(client)),
            Err(e) => match self.refusal(&e) {
                Some(refused) => Err(refused),
                None => {
                    tracing::debug!(error = %e, "NATS not reachable");
                    Ok(None)
                }
            },
        }
    }
}

fn is_auth_refusal(event: &str) -> bool {
    event.contains("authorization violation") || event.contains("failed signing nonce")
}

fn is_tls_failure(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "alert"]
        .iter()
        .any(|word| text.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(change: impl FnOnce(&mut NatsConfig)) -> NatsConfig {
        let mut config = NatsConfig::default();
        change(&mut config);
        config
    }

    fn error_of(config: &NatsConfig) -> String {
        match Settings::read(config, "test") {
            Ok(_) => panic!("accepted {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_url_may_list_several_servers() {
        let servers =
            parse_servers("nats://10.0.0.1:4222, tls://nats-1.nats:4222,nats-2:4223").unwrap();
        assert_eq!(servers.len(), 3);
        assert!(servers[1].tls_required());
        assert_eq!(servers[2].port(), 4223);
        for (bad, named) in [
            ("", "is empty"),
            (" , ", "is empty"),
            ("nats://a:4222,nats://b:port", "\"nats://b:port\""),
        ] {
            let error = parse_servers(bad).unwrap_err().to_string();
            assert!(
                error.contains("nats.url") && error.contains(named),
                "{bad:?}: {error}"
            );
        }
    }

    #[test]
    fn every_bad_setting_is_named() {
        let missing = "/nonexistent/herald-test";
        for (config, named) in [
            (
                config(|c| c.credentials_file = missing.into()),
                "nats.credentials_file",
            ),
            (
                config(|c| c.nkey_seed_file = missing.into()),
                "nats.nkey_seed_file",
            ),
            (config(|c| c.token_file = missing.into()), "nats.token_file"),
            (
                config(|c| {
                    c.user = "api".into();
                    c.password_file = missing.into();
                }),
                "nats.password_file",
            ),
            (config(|c| c.user = "api".into()), "nats.password_file"),
            (config(|c| c.password_file = missing.into()), "nats.user"),
            (
                config(|c| c.tls.ca_file = missing.into()),
                "nats.tls.ca_file",
            ),
            (
                config(|c| c.tls.cert_file = missing.into()),
                "nats.tls.cert_file",
            ),
            (
                config(|c| {
                    c.token_file = missing.into();
                    c.nkey_seed_file = missing.into();
                }),
                "not several",
            ),
        ] {
            let error = error_of(&config);
            assert!(error.contains(named), "{named} not in {error:?}");
        }
    }

    #[test]
    fn files_that_do_not_hold_what_they_should_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "not a key\n").unwrap();
        let junk = junk.display().to_string();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let empty = empty.display().to_string();
        for (config, named) in [
            (
                config(|c| c.nkey_seed_file = junk.clone()),
                "nats.nkey_seed_file",
            ),
            (
                config(|c| c.credentials_file = junk.clone()),
                "nats.credentials_file",
            ),
            (config(|c| c.token_file = empty.clone()), "nats.token_file"),
            (config(|c| c.tls.ca_file = junk.clone()), "nats.tls.ca_file"),
        ] {
            let error = error_of(&config);
            assert!(error.contains(named), "{named} not in {error:?}");
        }
    }
}
