//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>).
//!
//! The signed content is `"{webhook-id}.{webhook-timestamp}.{body}"`, the
//! MAC is HMAC-SHA256 keyed with the base64-decoded part of a `whsec_`
//! secret, and the header value is `v1,<base64 MAC>`; while a secret rotates
//! one signature per secret is sent, separated by spaces.

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

const PREFIX: &str = "whsec_";
/// Key sizes the Standard Webhooks spec recommends (24 to 64 bytes).
const KEY_LEN: std::ops::RangeInclusive<usize> = 24..=64;
/// How far a timestamp may be from now before a verifier rejects it.
pub const DEFAULT_TOLERANCE_SECS: u64 = 5 * 60;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a signing secret starts with \"whsec_\" followed by base64")]
    Format,
    #[error("a signing secret holds 24 to 64 bytes (this one holds {0})")]
    Length(usize),
}

/// A `whsec_...` signing secret. `Debug` never prints the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SigningSecret {
    key: Vec<u8>,
}

impl SigningSecret {
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(SecretError::Format)?;
        let key = BASE64.decode(encoded).map_err(|_| SecretError::Format)?;
        if !KEY_LEN.contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(Self { key })
    }

    /// A new random 32-byte secret.
    pub fn generate() -> Self {
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Self { key }
    }

    /// The `whsec_...` text of this secret.
    pub fn expose(&self) -> String {
        format!("{PREFIX}{}", BASE64.encode(&self.key))
    }

    /// `v1,<base64 HMAC-SHA256 of "id.timestamp.body">`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mac = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", BASE64.encode(mac))
    }

    fn mac(&self, id: &str, timestamp: u64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// Checks one `v1,<base64>` signature in constant time.
    fn verifies(&self, id: &str, timestamp: u64, body: &[u8], signature: &str) -> bool {
        let Some(encoded) = signature.strip_prefix("v1,") else {
            return false;
        };
        let Ok(given) = BASE64.decode(encoded) else {
            return false;
        };
        self.mac(id, timestamp, body).verify_slice(&given).is_ok()
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(whsec_***)")
    }
}

impl TryFrom<String> for SigningSecret {
    type Error = SecretError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<SigningSecret> for String {
    fn from(secret: SigningSecret) -> String {
        secret.expose()
    }
}

/// The `webhook-signature` header value: one signature per secret.
pub fn signature_header<'a>(
    secrets: impl IntoIterator<Item = &'a SigningSecret>,
    id: &str,
    timestamp: u64,
    body: &[u8],
) -> String {
    secrets
        .into_iter()
        .map(|s| s.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("webhook-timestamp is not a number of seconds")]
    BadTimestamp,
    #[error("webhook-timestamp is more than {DEFAULT_TOLERANCE_SECS}s away from now")]
    StaleTimestamp,
    #[error("no signature in webhook-signature matches the secret")]
    NoMatch,
}

/// Verifies a received webhook as a Standard Webhooks receiver would:
/// timestamp within tolerance, and at least one `v1` signature matching.
pub fn verify(
    secret: &SigningSecret,
    id: &str,
    timestamp: &str,
    signature_header: &str,
    body: &[u8],
    now_secs: u64,
) -> Result<(), VerifyError> {
    let ts: u64 = timestamp
        .trim()
        .parse()
        .map_err(|_| VerifyError::BadTimestamp)?;
    if ts.abs_diff(now_secs) > DEFAULT_TOLERANCE_SECS {
        return Err(VerifyError::StaleTimestamp);
    }
    if signature_header
        .split_whitespace()
        .any(|sig| secret.verifies(id, ts, body, sig))
    {
        Ok(())
    } else {
        Err(VerifyError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example from the Standard Webhooks reference libraries' tests.
    #[test]
    fn matches_the_reference_vector() {
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = secret.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn verify_accepts_any_listed_signature_and_refuses_tampering() {
        let old = SigningSecret::generate();
        let new = SigningSecret::generate();
        let header = signature_header(&[new.clone(), old.clone()], "id1", 1000, b"body");
        assert!(verify(&old, "id1", "1000", &header, b"body", 1000).is_ok());
        assert!(verify(&new, "id1", "1000", &header, b"body", 1100).is_ok());
        assert_eq!(
            verify(&new, "id1", "1000", &header, b"bodx", 1000),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify(&new, "id1", "1000", &header, b"body", 2000),
            Err(VerifyError::StaleTimestamp)
        );
        let stranger = SigningSecret::generate();
        assert_eq!(
            verify(&stranger, "id1", "1000", &header, b"body", 1000),
            Err(VerifyError::NoMatch)
        );
    }

    #[test]
    fn secrets_round_trip_and_validate() {
        let s = SigningSecret::generate();
        assert_eq!(SigningSecret::parse(&s.expose()).unwrap(), s);
        assert_eq!(SigningSecret::parse("nope"), Err(SecretError::Format));
        assert_eq!(
            SigningSecret::parse("whsec_AAAA"),
            Err(SecretError::Length(3))
        );
        assert!(!format!("{s:?}").contains(&s.expose()[6..]));
        // 24 to 64 bytes, as the spec recommends; generated ones hold 32.
        assert_eq!(s.key.len(), 32);
        for (len, ok) in [(23, false), (24, true), (64, true), (65, false)] {
            let text = format!("whsec_{}", BASE64.encode(vec![7u8; len]));
            assert_eq!(SigningSecret::parse(&text).is_ok(), ok, "{len} bytes");
        }
    }
}
