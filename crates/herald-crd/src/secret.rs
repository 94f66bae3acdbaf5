//! Reading an endpoint's signing secret out of the `Secret` its
//! `secretRef` names. The operator reads that Secret from the API server,
//! `herald dev` from the endpoints file; both go through
//! [`SecretKeyRef::signing_secret`], so they accept the same Secrets and
//! refuse the same ones with the same words.

use herald_core::signing::{self, SigningSecret};
use k8s_openapi::api::core::v1::Secret;

use crate::SecretKeyRef;

/// Why a `secretRef` gives no signing secret. The message says where to
/// look and never shows the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("Secret {name} does not exist in {namespace}")]
    NotFound { namespace: String, name: String },
    #[error("Secret {name} has no key {key}")]
    KeyMissing { name: String, key: String },
    #[error("Secret {name} key {key}: {problem}")]
    Invalid {
        name: String,
        key: String,
        problem: signing::SecretError,
    },
}

impl SecretError {
    /// The reason a `WebhookEndpoint`'s status and Events give for it.
    pub fn reason(&self) -> &'static str {
        match self {
            SecretError::NotFound { .. } => "SecretNotFound",
            SecretError::KeyMissing { .. } => "SecretKeyMissing",
            SecretError::Invalid { .. } => "InvalidSecret",
        }
    }
}

impl SecretKeyRef {
    /// The signing secret under this reference's key in `secret`, the
    /// Secret it names in `namespace` (`None`: there is no such Secret).
    /// The value is read as text, surrounding white space (a newline
    /// from `echo` or a file) ignored.
    pub fn signing_secret(
        &self,
        namespace: &str,
        secret: Option<&Secret>,
    ) -> Result<SigningSecret, SecretError> {
        let secret = secret.ok_or_else(|| SecretError::NotFound {
            namespace: namespace.to_string(),
            name: self.name.clone(),
        })?;
        let value = secret
            .data
            .as_ref()
            .and_then(|data| data.get(&self.key))
            .map(|bytes| String::from_utf8_lossy(&bytes.0).trim().to_string())
            .ok_or_else(|| SecretError::KeyMissing {
                name: self.name.clone(),
                key: self.key.clone(),
            })?;
        SigningSecret::parse(&value).map_err(|problem| SecretError::Invalid {
            name: self.name.clone(),
            key: self.key.clone(),
            problem,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;

    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn reference(key: &str) -> SecretKeyRef {
        SecretKeyRef {
            name: "hooks".into(),
            key: key.into(),
        }
    }

    fn secret(key: &str, value: &str) -> Secret {
        Secret {
            data: Some(BTreeMap::from([(
                key.to_string(),
                ByteString(value.as_bytes().to_vec()),
            )])),
            ..Default::default()
        }
    }

    #[test]
    fn reads_the_named_key_ignoring_surrounding_white_space() {
        let found = reference("secret")
            .signing_secret("default", Some(&secret("secret", &format!("{SECRET}\n"))))
            .unwrap();
        assert_eq!(found.expose(), SECRET);
    }

    #[test]
    fn says_what_is_missing_or_wrong_without_the_value() {
        let cases = [
            (
                reference("secret").signing_secret("team-a", None),
                "SecretNotFound",
                "Secret hooks does not exist in team-a",
            ),
            (
                reference("other").signing_secret("team-a", Some(&secret("secret", SECRET))),
                "SecretKeyMissing",
                "Secret hooks has no key other",
            ),
            (
                reference("secret").signing_secret("team-a", Some(&secret("secret", "hunter2"))),
                "InvalidSecret",
                "Secret hooks key secret: a signing secret starts with",
            ),
        ];
        for (result, reason, message) in cases {
            let err = result.unwrap_err();
            assert_eq!(err.reason(), reason);
            let text = err.to_string();
            assert!(text.starts_with(message), "{text}");
            assert!(!text.contains("hunter2"), "{text}");
        }
    }
}
