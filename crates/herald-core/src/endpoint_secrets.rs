//! An endpoint's signing secrets over time and at rest.
//!
//! Over time: when an endpoint's secret changes, the one it replaces keeps
//! signing next to it for an overlap (24 h by default), so a receiver can
//! switch to the new secret whenever it likes within that window; both
//! signatures go in `webhook-signature`. The overlap's end is kept in the
//! record itself, so it survives restarts of whoever writes records.
//!
//! At rest: the whole record (URL, headers, secrets) is stored in
//! `herald-endpoints` sealed with the [`Keyring`], its KV key authenticated
//! with it, so reading the bucket reveals nothing and a record copied under
//! another key does not open.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{
    keyring::{Keyring, OpenError, Sealed},
    names,
    payload::{self, EndpointConfig, PayloadError, PreviousSecret, VERSION},
    signing::SigningSecret,
};

impl EndpointConfig {
    /// The secrets that sign a webhook sent at `now_ms`: the current ones,
    /// newest first, then the replaced ones whose overlap has not ended.
    pub fn signing_secrets(&self, now_ms: u64) -> Vec<&SigningSecret> {
        self.secrets
            .iter()
            .chain(
                self.previous_secrets
                    .iter()
                    .filter(|p| p.until_ms > now_ms)
                    .map(|p| &p.secret),
            )
            .collect()
    }

    /// Takes the rotation state over from `stored`, the record this one
    /// replaces: a secret `stored` signed with that this config no longer
    /// lists keeps signing until `now_ms + overlap`; replaced secrets still
    /// in their overlap keep their end; ended ones are dropped.
    pub fn carry_over_secrets(
        &mut self,
        stored: Option<&EndpointConfig>,
        now_ms: u64,
        overlap: Duration,
    ) {
        let until = now_ms.saturating_add(u64::try_from(overlap.as_millis()).unwrap_or(u64::MAX));
        let replaced = stored.into_iter().flat_map(|s| {
            s.secrets
                .iter()
                .map(move |secret| PreviousSecret {
                    secret: secret.clone(),
                    until_ms: until,
                })
                .chain(s.previous_secrets.iter().cloned())
        });
        let mut previous: Vec<PreviousSecret> = Vec::new();
        for candidate in replaced {
            let still_signing = candidate.until_ms > now_ms;
            let current = self.secrets.contains(&candidate.secret);
            let listed = previous.iter().any(|p| p.secret == candidate.secret);
            if still_signing && !current && !listed {
                previous.push(candidate);
            }
        }
        self.previous_secrets = previous;
    }
}

/// What `herald-endpoints` holds under `<user>.<endpoint>`.
#[derive(Debug, Serialize, Deserialize)]
struct StoredRecord {
    v: u8,
    /// The JSON of the [`EndpointConfig`].
    sealed: Sealed,
}

/// A record read back: the config and the id of the key it was sealed with
/// (a record under another key than the primary one is due for rewriting).
#[derive(Debug, Clone, PartialEq)]
pub struct OpenedRecord {
    pub config: EndpointConfig,
    pub kid: String,
}

/// Why a stored endpoint record could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("not an encrypted endpoint record (written in clear by an older Herald?): {0}")]
    NotSealed(PayloadError),
    #[error("cannot decrypt: {0}")]
    Open(#[from] OpenError),
    #[error("decrypted, but not an endpoint config: {0}")]
    Config(PayloadError),
    #[error("the record is for another endpoint than its key")]
    WrongKey,
}

impl RecordError {
    /// A stable label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            RecordError::NotSealed(_) => "not_sealed",
            RecordError::Open(OpenError::UnknownKey(..)) => "unknown_key",
            RecordError::Open(_) => "not_authentic",
            RecordError::Config(_) => "bad_config",
            RecordError::WrongKey => "wrong_key",
        }
    }
}

/// The bytes to store for `config`, sealed under the primary key.
pub fn seal_record(config: &EndpointConfig, keyring: &Keyring) -> Vec<u8> {
    let key = names::endpoint_key(&config.user, &config.id);
    let plaintext = payload::encode(config);
    payload::encode(&StoredRecord {
        v: VERSION,
        sealed: keyring.seal(&plaintext, &context(&key)),
    })
}

/// Reads what `herald-endpoints` holds under `key`.
pub fn open_record(
    key: &str,
    bytes: &[u8],
    keyring: &Keyring,
) -> Result<OpenedRecord, RecordError> {
    let stored: StoredRecord = payload::decode(bytes).map_err(RecordError::NotSealed)?;
    let plaintext = keyring.open(&stored.sealed, &context(key))?;
    let config: EndpointConfig = payload::decode(&plaintext).map_err(RecordError::Config)?;
    if names::endpoint_key(&config.user, &config.id) != key {
        return Err(RecordError::WrongKey);
    }
    Ok(OpenedRecord {
        config,
        kid: stored.sealed.kid,
    })
}

/// The associated data of a record: its bucket and key.
fn context(key: &str) -> Vec<u8> {
    format!("{}/{key}", names::ENDPOINTS_BUCKET).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::new_key_text;

    const HOUR: Duration = Duration::from_secs(3600);
    const HOUR_MS: u64 = 3_600_000;

    fn config(secrets: &[&SigningSecret]) -> EndpointConfig {
        serde_json::from_value(serde_json::json!({
            "v": VERSION, "user": "1", "id": "default_hook",
            "url": "https://example.com/hook",
            "headers": { "authorization": "Bearer api-token-in-a-header" },
            "secrets": secrets.iter().map(|s| s.expose()).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    /// Writes `wanted` over `stored` as a writer does.
    fn write(stored: &EndpointConfig, wanted: &EndpointConfig, now: u64) -> EndpointConfig {
        let mut next = wanted.clone();
        next.carry_over_secrets(Some(stored), now, HOUR);
        next
    }

    #[test]
    fn a_replaced_secret_signs_until_its_overlap_ends_then_is_dropped() {
        let (a, b, c) = (
            SigningSecret::generate(),
            SigningSecret::generate(),
            SigningSecret::generate(),
        );
        let mut first = config(&[&a]);
        first.carry_over_secrets(None, 0, HOUR);
        assert_eq!(first.signing_secrets(0), [&a]);

        // Rotated at t=1000: both sign, the new one first.
        let rotated = write(&first, &config(&[&b]), 1000);
        assert_eq!(rotated.signing_secrets(1000), [&b, &a]);
        assert_eq!(rotated.previous_secrets[0].until_ms, 1000 + HOUR_MS);
        // A resync with the same secret changes nothing: no rewrite.
        assert_eq!(write(&rotated, &config(&[&b]), 5000), rotated);
        // Past the overlap the old one no longer signs...
        assert_eq!(rotated.signing_secrets(1000 + HOUR_MS), [&b]);
        // ...and the next write drops it.
        let later = write(&rotated, &config(&[&b]), 2000 + HOUR_MS);
        assert!(later.previous_secrets.is_empty());

        // Two quick rotations: both earlier secrets keep their own ends.
        let again = write(&rotated, &config(&[&c]), 2000);
        assert_eq!(again.signing_secrets(2000), [&c, &b, &a]);
        assert_eq!(again.signing_secrets(1000 + HOUR_MS), [&c, &b]);
        // Rotating back to a previous secret: it is current, not previous.
        let back = write(&again, &config(&[&a]), 3000);
        assert_eq!(back.signing_secrets(3000), [&a, &c, &b]);

        // No overlap configured: the replaced secret stops at once.
        let mut abrupt = config(&[&b]);
        abrupt.carry_over_secrets(Some(&first), 1000, Duration::ZERO);
        assert_eq!(abrupt.signing_secrets(1000), [&b]);
    }

    #[test]
    fn records_are_sealed_whole_and_open_only_under_their_key() {
        let secret = SigningSecret::generate();
        let mut stored = config(&[&secret]);
        stored.previous_secrets.push(PreviousSecret {
            secret: SigningSecret::generate(),
            until_ms: 5,
        });
        let k1 = Keyring::parse(&new_key_text("k1").unwrap()).unwrap();
        let bytes = seal_record(&stored, &k1);
        let text = String::from_utf8(bytes.clone()).unwrap();
        for clear in [
            secret.expose(),
            secret.expose()[6..].to_string(),
            "api-token-in-a-header".to_string(),
            "example.com".to_string(),
        ] {
            assert!(!text.contains(&clear), "{clear} in {text}");
        }
        let opened = open_record("1.default_hook", &bytes, &k1).unwrap();
        assert_eq!((opened.config, opened.kid.as_str()), (stored.clone(), "k1"));

        // Copied under another endpoint's key, it does not open.
        let err = open_record("2.default_hook", &bytes, &k1).unwrap_err();
        assert_eq!(err.label(), "not_authentic");
        // A keyring without k1 says which key is missing.
        let k2 = Keyring::parse(&new_key_text("k2").unwrap()).unwrap();
        let err = open_record("1.default_hook", &bytes, &k2).unwrap_err();
        assert_eq!(err.label(), "unknown_key");
        assert!(err.to_string().contains("\"k1\""), "{err}");
        // A record in clear (an older Herald) is not taken for a sealed one.
        let clear = payload::encode(&stored);
        let err = open_record("1.default_hook", &clear, &k1).unwrap_err();
        assert_eq!(err.label(), "not_sealed");
    }
}
