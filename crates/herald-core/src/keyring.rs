//! Encryption at rest for what Herald stores in NATS (endpoint records with
//! their signing secrets): XChaCha20-Poly1305 under keys from a keyring.
//!
//! A keyring lists keys, each with an id; the first one encrypts, every one
//! decrypts, and each ciphertext names the id of its key. Rotating the key
//! is therefore: add the new key after the old one everywhere, then move it
//! first (new writes use it, old entries are re-encrypted as they are
//! rewritten), then drop the old one (docs/design.md has the steps).
//!
//! The text form of a keyring is one key per line (or separated by commas
//! or spaces): `<id>:<base64 of 32 bytes>`; `#` starts a comment. A key
//! without `<id>:` gets an id derived from the key itself.

use std::fmt;

use base64::{Engine, engine::general_purpose::STANDARD as BASE64};
use chacha20poly1305::{
    KeyInit, XChaCha20Poly1305, XNonce,
    aead::{Aead, Payload},
};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The only algorithm this build writes; named in every sealed value.
pub const ALGORITHM: &str = "xchacha20poly1305";
const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("the keyring holds no key")]
    Empty,
    #[error("key {0}: expected <id>:<base64 of 32 bytes>")]
    Format(usize),
    #[error("key {index}: a key is 32 bytes, this one is {len}")]
    Length { index: usize, len: usize },
    #[error("key {0}: an id is 1 to 64 letters, digits, '-', '_' or '.'")]
    Id(usize),
    #[error("key id {0:?} appears twice in the keyring")]
    DuplicateId(String),
}

/// Why a sealed value could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error(
        "encrypted with key {0:?}, which the keyring does not hold (keys: {1}): add that key to secrets.key_file / HERALD_SECRETS__KEY"
    )]
    UnknownKey(String, String),
    #[error("algorithm {0:?} is not supported")]
    Algorithm(String),
    #[error(
        "the ciphertext does not authenticate under key {0:?}: it was altered, or stored under another name"
    )]
    Forged(String),
    #[error("the sealed value is malformed")]
    Malformed,
}

/// One encryption key. `Debug` never prints the key bytes.
#[derive(Clone)]
pub struct EncryptionKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

impl EncryptionKey {
    fn new(id: String, bytes: &[u8]) -> Self {
        Self {
            id,
            cipher: XChaCha20Poly1305::new_from_slice(bytes).expect("keys are 32 bytes"),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EncryptionKey({}, ***)", self.id)
    }
}

/// Keys by id; the first encrypts.
#[derive(Debug, Clone)]
pub struct Keyring {
    keys: Vec<EncryptionKey>,
}

/// A value encrypted under a keyring key, as stored. Everything here may be
/// read by anyone with access to the store: the key id, the nonce and the
/// ciphertext reveal nothing of the plaintext.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub alg: String,
    /// The id of the key that encrypted it.
    pub kid: String,
    /// Base64 of the 24-byte nonce, random for every encryption.
    pub nonce: String,
    /// Base64 of ciphertext and tag.
    pub ciphertext: String,
}

impl Keyring {
    /// Parses the text form (see the module documentation).
    pub fn parse(text: &str) -> Result<Self, KeyringError> {
        let mut keys: Vec<EncryptionKey> = Vec::new();
        let entries = text
            .lines()
            .map(|line| line.split('#').next().unwrap_or_default())
            .flat_map(|line| line.split([',', ' ', '\t']))
            .map(str::trim)
            .filter(|entry| !entry.is_empty());
        for (index, entry) in entries.enumerate() {
            let index = index + 1;
            let (id, encoded) = match entry.rsplit_once(':') {
                Some((id, encoded)) => (Some(id), encoded),
                None => (None, entry),
            };
            let bytes = BASE64
                .decode(encoded)
                .map_err(|_| KeyringError::Format(index))?;
            if bytes.len() != KEY_BYTES {
                return Err(KeyringError::Length {
                    index,
                    len: bytes.len(),
                });
            }
            let id = match id {
                Some(id) if valid_id(id) => id.to_string(),
                Some(_) => return Err(KeyringError::Id(index)),
                None => derived_id(&bytes),
            };
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyringError::DuplicateId(id));
            }
            keys.push(EncryptionKey::new(id, &bytes));
        }
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        Ok(Self { keys })
    }

    /// The key that encrypts.
    pub fn primary(&self) -> &EncryptionKey {
        &self.keys[0]
    }

    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Encrypts `plaintext` under the primary key with a fresh nonce.
    /// `context` is authenticated, not stored: opening needs the same one,
    /// so a value moved to another name does not open.
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Sealed {
        let key = self.primary();
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = key
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any message that fits in memory");
        Sealed {
            alg: ALGORITHM.into(),
            kid: key.id.clone(),
            nonce: BASE64.encode(nonce),
            ciphertext: BASE64.encode(ciphertext),
        }
    }

    /// Decrypts and authenticates a sealed value under `context`.
    pub fn open(&self, sealed: &Sealed, context: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.alg != ALGORITHM {
            return Err(OpenError::Algorithm(sealed.alg.clone()));
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.id == sealed.kid)
            .ok_or_else(|| OpenError::UnknownKey(sealed.kid.clone(), self.ids().join(", ")))?;
        let nonce = BASE64
            .decode(&sealed.nonce)
            .ok()
            .filter(|n| n.len() == NONCE_BYTES)
            .ok_or(OpenError::Malformed)?;
        let ciphertext = BASE64
            .decode(&sealed.ciphertext)
            .map_err(|_| OpenError::Malformed)?;
        key.cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: context,
                },
            )
            .map_err(|_| OpenError::Forged(sealed.kid.clone()))
    }
}

/// A new random key in the keyring's text form, `<id>:<base64>`.
pub fn new_key_text(id: &str) -> Result<String, KeyringError> {
    if !valid_id(id) {
        return Err(KeyringError::Id(1));
    }
    let mut key = [0u8; KEY_BYTES];
    rand::rng().fill_bytes(&mut key);
    Ok(format!("{id}:{}", BASE64.encode(key)))
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// An id for a key given without one: a short hash, which names the key
/// without revealing anything about it.
fn derived_id(key: &[u8]) -> String {
    let digest = Sha256::digest(key);
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("k-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> String {
        new_key_text(id).unwrap()
    }

    #[test]
    fn the_first_key_seals_and_every_key_opens() {
        let (k1, k2) = (key("k1"), key("k2"));
        let old = Keyring::parse(&k1).unwrap();
        let sealed = old.seal(b"whsec_x", b"1.a");
        assert_eq!(sealed.kid, "k1");
        assert!(!sealed.ciphertext.contains("whsec"));

        let both = Keyring::parse(&format!("# rotating\n{k2}\n{k1} # old\n")).unwrap();
        assert_eq!(both.ids(), ["k2", "k1"]);
        assert_eq!(both.open(&sealed, b"1.a").unwrap(), b"whsec_x");
        assert_eq!(both.seal(b"x", b"c").kid, "k2");

        let new_only = Keyring::parse(&k2).unwrap();
        let err = new_only.open(&sealed, b"1.a").unwrap_err();
        assert!(matches!(err, OpenError::UnknownKey(ref id, _) if id == "k1"));
        assert!(err.to_string().contains("k1"), "{err}");
    }

    #[test]
    fn a_value_opens_only_under_its_own_context_and_untouched() {
        let ring = Keyring::parse(&key("k1")).unwrap();
        let sealed = ring.seal(b"secret", b"1.a");
        assert!(matches!(
            ring.open(&sealed, b"2.a"),
            Err(OpenError::Forged(_))
        ));
        let mut altered = sealed.clone();
        let mut bytes = BASE64.decode(&altered.ciphertext).unwrap();
        bytes[0] ^= 1;
        altered.ciphertext = BASE64.encode(bytes);
        assert!(matches!(
            ring.open(&altered, b"1.a"),
            Err(OpenError::Forged(_))
        ));
        // Two seals of the same text differ: fresh nonces.
        assert_ne!(ring.seal(b"secret", b"1.a"), sealed);
    }

    #[test]
    fn bad_keyrings_are_refused_with_the_reason() {
        assert_eq!(
            Keyring::parse(" # nothing\n").unwrap_err(),
            KeyringError::Empty
        );
        assert_eq!(
            Keyring::parse("k1:nope!").unwrap_err(),
            KeyringError::Format(1)
        );
        assert_eq!(
            Keyring::parse("k1:AAAA").unwrap_err(),
            KeyringError::Length { index: 1, len: 3 }
        );
        let k = key("same");
        assert_eq!(
            Keyring::parse(&format!("{k},{k}")).unwrap_err(),
            KeyringError::DuplicateId("same".into())
        );
        let bad_id = format!("bad id:{}", key("x").split_once(':').unwrap().1);
        assert!(Keyring::parse(&bad_id).is_err());
        assert!(new_key_text("no/slash").is_err());
        // A bare key gets a stable id of its own.
        let bare = key("x").split_once(':').unwrap().1.to_string();
        let ring = Keyring::parse(&bare).unwrap();
        assert!(ring.primary().id().starts_with("k-"));
        assert_eq!(Keyring::parse(&bare).unwrap().ids(), ring.ids());
        assert!(!format!("{ring:?}").contains(&bare));
    }
}
