//! How an endpoint URL appears anywhere but its sealed record.
//!
//! Webhook URLs often carry their credential in the URL itself (a
//! `?token=` query, a Slack-style `/services/T000/B000/secret` path,
//! `user:password@`). Attempt records, mails, logs and Kubernetes Events are
//! read by more people than the endpoint's owner, so they show only what
//! identifies the endpoint to a person (scheme, host and port) plus a
//! fingerprint that tells two URLs on the same host apart without revealing
//! either.

use std::fmt;

use sha2::{Digest, Sha256};
use url::Url;

/// An endpoint URL with its path, query, fragment and credentials replaced
/// by a fingerprint: `https://hooks.example.com/…#a1b2c3d4`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedactedUrl(String);

impl RedactedUrl {
    pub fn new(url: &Url) -> Self {
        let digest = Sha256::digest(url.as_str().as_bytes());
        let fingerprint: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        let host = url.host_str().unwrap_or("");
        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
        Self(format!("{}://{host}{port}/…#{fingerprint}", url.scheme()))
    }

    /// Redacts a URL held as text; text that is not a URL is replaced whole.
    pub fn from_text(url: &str) -> Self {
        match Url::parse(url) {
            Ok(url) => Self::new(&url),
            Err(_) => Self("<unparseable url>".to_string()),
        }
    }

    /// Like [`from_text`](Self::from_text), but text that is already a
    /// redacted URL stays as it is (redacting it again would change its
    /// fingerprint): for fields written redacted by one version and in
    /// clear by an older one.
    pub fn from_text_or_redacted(text: &str) -> Self {
        match Url::parse(text) {
            Ok(url) if is_redacted(&url) => Self(text.to_string()),
            Ok(url) => Self::new(&url),
            Err(_) => Self::from_text(text),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The shape [`RedactedUrl::new`] writes: no credentials, path `/…`, no
/// query, an 8-hex-digit fingerprint as the fragment.
fn is_redacted(url: &Url) -> bool {
    url.username().is_empty()
        && url.password().is_none()
        && url.path() == "/%E2%80%A6"
        && url.query().is_none()
        && url
            .fragment()
            .is_some_and(|f| f.len() == 8 && f.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_scheme_host_and_port_only() {
        let secret = "https://user:pw@hooks.example.com:8443/services/T0/B0/s3cr3t?token=abc#frag";
        let shown = RedactedUrl::from_text(secret);
        assert!(
            shown
                .as_str()
                .starts_with("https://hooks.example.com:8443/…#"),
            "{shown}"
        );
        for part in ["user", "pw", "services", "s3cr3t", "token", "abc", "frag"] {
            assert!(!shown.as_str().contains(part), "{part} leaked in {shown}");
        }
    }

    #[test]
    fn fingerprint_tells_urls_on_one_host_apart() {
        let a = RedactedUrl::from_text("https://hooks.example.com/a?token=1");
        let b = RedactedUrl::from_text("https://hooks.example.com/a?token=2");
        assert_ne!(a, b);
        assert_eq!(
            a,
            RedactedUrl::from_text("https://hooks.example.com/a?token=1")
        );
    }

    #[test]
    fn redacting_twice_changes_nothing() {
        let once = RedactedUrl::from_text("https://hooks.example.com/services/T/B/x?token=s");
        assert_eq!(RedactedUrl::from_text_or_redacted(once.as_str()), once);
        let clear = "https://hooks.example.com/%E2%80%A6?token=s#abcdef01";
        assert!(
            !RedactedUrl::from_text_or_redacted(clear)
                .as_str()
                .contains("token"),
            "a query is never kept"
        );
    }

    #[test]
    fn unparseable_text_is_replaced_whole() {
        assert_eq!(
            RedactedUrl::from_text("not a url ?token=x").as_str(),
            "<unparseable url>"
        );
    }
}
