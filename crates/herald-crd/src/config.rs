//! A `WebhookEndpoint`'s spec into the [`EndpointConfig`] the workers read,
//! with the checks the CRD schema cannot make.

use herald_core::{
    EndpointId, InvalidToken, UserId,
    payload::{EndpointConfig, VERSION},
    signing::SigningSecret,
};

use crate::WebhookEndpointSpec;

/// The longest per-request timeout an endpoint may ask for.
const MAX_TIMEOUT_SECONDS: u64 = 120;

/// Why a spec cannot become an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("userId: {0}")]
    User(InvalidToken),
    #[error("endpoint name: {0}")]
    Name(InvalidToken),
    #[error("url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("email {0:?} is not an email address")]
    Email(String),
    #[error("timeoutSeconds must be between 1 and {MAX_TIMEOUT_SECONDS}")]
    Timeout,
    #[error("headers: {0:?} is not a header Herald lets an endpoint set")]
    Header(String),
}

/// Headers the signature and transport own; an endpoint cannot override them.
const RESERVED_HEADERS: &[&str] = &[
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "host",
    "transfer-encoding",
    "connection",
];

/// Checks a webhook URL: absolute, `http` or `https`, with a host.
fn validate_url(url: &str) -> Result<url::Url, SpecError> {
    let bad = |reason: &str| SpecError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("scheme must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad("credentials in the URL are not allowed; use headers"));
    }
    Ok(parsed)
}

/// A deliberately loose email check: one `@`, something on each side, a dot
/// in the domain, no spaces. SMTP has the last word.
fn validate_email(email: &str) -> Result<(), SpecError> {
    let bad = || SpecError::Email(email.to_string());
    let (local, domain) = email.split_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || domain.is_empty()
        || domain.contains('@')
        || !domain.contains('.')
        || email.chars().any(char::is_whitespace)
    {
        return Err(bad());
    }
    Ok(())
}

impl WebhookEndpointSpec {
    /// The endpoint record for the workers, given the resource's identity and
    /// its signing secrets (resolved by the caller from `secretRef`).
    pub fn to_config(
        &self,
        namespace: &str,
        name: &str,
        secrets: Vec<SigningSecret>,
    ) -> Result<EndpointConfig, SpecError> {
        let user = UserId::new(self.user_id.clone()).map_err(SpecError::User)?;
        let id = EndpointId::from_resource(namespace, name).map_err(SpecError::Name)?;
        validate_url(&self.url)?;
        if let Some(email) = &self.email {
            validate_email(email)?;
        }
        if let Some(t) = self.timeout_seconds
            && !(1..=MAX_TIMEOUT_SECONDS).contains(&t)
        {
            return Err(SpecError::Timeout);
        }
        if let Some(h) = self.headers.keys().find(|h| {
            RESERVED_HEADERS.contains(&h.to_ascii_lowercase().as_str())
                || reqwest_header_name_invalid(h)
        }) {
            return Err(SpecError::Header(h.clone()));
        }
        Ok(EndpointConfig {
            v: VERSION,
            user,
            id,
            url: self.url.clone(),
            email: self.email.clone(),
            secrets,
            previous_secrets: Vec::new(),
            event_types: self.event_types.clone(),
            retry_schedule: self.retry.as_ref().map(|r| r.schedule.clone()),
            timeout_ms: self.timeout_seconds.map(|s| s * 1000),
            headers: self.headers.clone(),
            paused: self.paused,
            rate_limit_per_second: self.rate_limit.as_ref().map(|r| r.per_second),
            send_trace_context: self.send_trace_context,
            owner: None,
        })
    }
}

/// An HTTP header name is a non-empty RFC 7230 token.
fn reqwest_header_name_invalid(name: &str) -> bool {
    name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(url: &str) -> WebhookEndpointSpec {
        WebhookEndpointSpec {
            user_id: "1".into(),
            url: url.into(),
            email: Some("ops@example.com".into()),
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_plain_endpoint() {
        let config = spec("http://127.0.0.1:8080/hooks")
            .to_config("default", "user-1", vec![SigningSecret::generate()])
            .unwrap();
        assert_eq!(config.id.as_str(), "default_user-1");
        assert_eq!(config.user.as_str(), "1");
    }

    #[test]
    fn refuses_bad_specs_with_a_reason() {
        let cases = [
            (spec("ftp://x/"), "scheme"),
            (spec("not a url"), "url"),
            (spec("http://user:pw@x/"), "credentials"),
            (
                WebhookEndpointSpec {
                    user_id: "".into(),
                    ..spec("http://x/")
                },
                "userId",
            ),
            (
                WebhookEndpointSpec {
                    email: Some("nobody".into()),
                    ..spec("http://x/")
                },
                "email",
            ),
            (
                WebhookEndpointSpec {
                    timeout_seconds: Some(0),
                    ..spec("http://x/")
                },
                "timeoutSeconds",
            ),
            (
                WebhookEndpointSpec {
                    headers: [("webhook-signature".to_string(), "x".to_string())].into(),
                    ..spec("http://x/")
                },
                "headers",
            ),
        ];
        for (spec, word) in cases {
            let err = spec
                .to_config("default", "e", vec![])
                .unwrap_err()
                .to_string();
            assert!(err.contains(word), "{err:?} does not mention {word}");
        }
    }
}
