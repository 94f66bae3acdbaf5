//! Phase 2, the request: the signed POST to the endpoint, and what came
//! back of it ([`Response`]). Nothing here decides what the answer means.
//!
//! A URL the SSRF guard refuses ([`crate::ssrf`]) is a failed attempt like
//! a connection error: DNS answers change, so it follows the same schedule.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use herald_core::{
    metrics::RefusedRange,
    payload::{DeliveryJob, EndpointConfig, RESPONSE_BODY_LIMIT},
    signing::signature_header,
};
use herald_queue::trace_context::inject_current_into;
use reqwest::{StatusCode, header};

use super::WebhookWorkerConfig;
use crate::ssrf::{GuardedClient, Resolver, SendError, SsrfConfig, SsrfGuard, SystemResolver};

/// The connection-pooled client every delivery shares, behind the SSRF
/// guard, resolving names with the system resolver.
pub fn http_client(ssrf: &SsrfConfig) -> GuardedClient {
    http_client_with(ssrf, Arc::new(SystemResolver))
}

/// [`http_client`] with the name resolution the guard checks given (tests
/// choose the DNS answers). Redirects are never followed: a 3xx is a failed
/// attempt, and a `Location` is never reached unchecked. No proxy either:
/// the guard must see the endpoint's own address.
pub fn http_client_with(ssrf: &SsrfConfig, resolver: Arc<dyn Resolver>) -> GuardedClient {
    // reqwest is built without a bundled crypto provider; use ring, as the
    // NATS client does. Installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("Herald/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(64)
        .no_proxy();
    GuardedClient::new(builder, SsrfGuard::new(ssrf), resolver)
        .expect("the HTTP client configuration is static and valid")
}

/// What one HTTP attempt produced.
#[derive(Debug)]
pub(super) struct Response {
    /// `None`: no response at all ([`Self::no_response`] says why).
    pub status: Option<StatusCode>,
    pub no_response: Option<NoResponse>,
    pub retry_after: Option<Duration>,
    /// The start of the body, as much as the attempt record keeps.
    pub body: Option<String>,
    /// Why the attempt failed, if it did, fit to show the endpoint's owner.
    pub error: Option<String>,
    pub latency: Duration,
}

/// Why an attempt got no HTTP response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum NoResponse {
    /// The SSRF guard refused every address of the endpoint.
    Refused,
    /// No response within the endpoint's timeout.
    Timeout,
    /// The connection failed (refused, reset, TLS, DNS).
    Connection,
}

impl Response {
    /// The response class of `herald_webhook_responses_total`: the status
    /// class (`2xx`...), or why there was none.
    pub(super) fn class_label(&self) -> &'static str {
        match (self.status, self.no_response) {
            (Some(status), _) => match status.as_u16() {
                100..=199 => "1xx",
                200..=299 => "2xx",
                300..=399 => "3xx",
                400..=499 => "4xx",
                _ => "5xx",
            },
            (None, Some(NoResponse::Refused)) => "refused",
            (None, Some(NoResponse::Timeout)) => "timeout",
            (None, _) => "connection",
        }
    }
}

/// The Standard Webhooks headers of one request.
#[derive(Debug, PartialEq, Eq)]
struct Signed {
    /// The same on every attempt of a delivery, so a receiver can drop
    /// repeats.
    webhook_id: String,
    timestamp: u64,
    signature: String,
}

impl Signed {
    /// `job`'s body signed at `timestamp` (unix seconds) with every secret
    /// `endpoint` signs with at that time.
    fn new(endpoint: &EndpointConfig, job: &DeliveryJob, timestamp: u64) -> Self {
        let webhook_id = job.webhook_id();
        let signature = signature_header(
            endpoint.signing_secrets(timestamp * 1000),
            &webhook_id,
            timestamp,
            job.body.as_bytes(),
        );
        Signed {
            webhook_id,
            timestamp,
            signature,
        }
    }
}

/// How long a request to `endpoint` may take: its own `timeoutSeconds`, or
/// `default`.
pub(super) fn timeout(endpoint: &EndpointConfig, default: Duration) -> Duration {
    endpoint
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(default)
}

/// POSTs `job` to `endpoint`, signed, and reads what came back.
pub(super) async fn send(
    client: &GuardedClient,
    config: &WebhookWorkerConfig,
    endpoint: &EndpointConfig,
    job: &DeliveryJob,
) -> Response {
    let signed = Signed::new(endpoint, job, herald_core::now_ms() / 1000);
    let mut request = client
        .post(&endpoint.url)
        .timeout(timeout(endpoint, config.timeout))
        .header(header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &signed.webhook_id)
        .header("webhook-timestamp", signed.timestamp.to_string())
        .header("webhook-signature", signed.signature);
    for (name, value) in &endpoint.headers {
        request = request.header(name, value);
    }
    if endpoint.send_trace_context {
        let mut trace_headers = header::HeaderMap::new();
        inject_current_into(&mut opentelemetry_http::HeaderInjector(&mut trace_headers));
        request = request.headers(trace_headers);
    }
    let started = tokio::time::Instant::now();
    match client.send(request.body(job.body.clone())).await {
        Ok(mut response) => {
            let status = response.status();
            let retry_after = retry_after(response.headers());
            let keep = response_body_bytes(config, response.remote_addr());
            let mut body = Vec::new();
            while body.len() < keep {
                match response.chunk().await {
                    Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                    _ => break,
                }
            }
            body.truncate(keep);
            Response {
                status: Some(status),
                no_response: None,
                retry_after,
                body: (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned()),
                error: (!status.is_success()).then(|| format!("HTTP {}", status.as_u16())),
                latency: started.elapsed(),
            }
        }
        Err(e) => Response {
            status: None,
            no_response: Some(match &e {
                SendError::Refused(_) => NoResponse::Refused,
                SendError::Http(e) if e.is_timeout() => NoResponse::Timeout,
                SendError::Http(_) => NoResponse::Connection,
            }),
            retry_after: None,
            body: None,
            error: Some(match e {
                SendError::Refused(refused) => {
                    herald_core::metrics::metrics()
                        .ssrf_refusals
                        .get_or_create(&RefusedRange {
                            range: refused.range_name(),
                        })
                        .inc();
                    refused.describe(config.ssrf.reveal_refused_address)
                }
                // Without the URL: its query or path may hold a secret.
                SendError::Http(e) => describe_request_error(&e.without_url()),
            }),
            latency: started.elapsed(),
        },
    }
}

/// How much of the body of a response from `peer` the attempt keeps:
/// an address only the allow-list opens is an internal service, whose
/// answer is kept only as far as `ssrf.allowed_response_body_bytes`
/// says (an unknown peer counts as one).
fn response_body_bytes(config: &WebhookWorkerConfig, peer: Option<SocketAddr>) -> usize {
    let limit = if peer.is_some_and(|p| SsrfGuard::is_global(p.ip())) {
        config.response_body_bytes
    } else {
        config.ssrf.allowed_response_body_bytes
    };
    limit.min(RESPONSE_BODY_LIMIT)
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 10.2.3); a date
/// in the past means "now".
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

fn describe_request_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        format!("connection failed: {}", root_cause(e))
    } else {
        format!("request failed: {}", root_cause(e))
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use herald_core::signing::{SigningSecret, verify};
    use herald_testkit::{ReceiverBehaviour, TestReceiver};

    use super::*;
    use crate::webhooks::tests::{endpoint, job};

    /// A worker configuration whose SSRF guard lets loopback through, as a
    /// test receiver needs; `body_bytes` of an allow-listed answer kept.
    fn loopback_config(body_bytes: usize) -> WebhookWorkerConfig {
        WebhookWorkerConfig {
            ssrf: SsrfConfig {
                allow: crate::ssrf::LOOPBACK.to_vec(),
                allowed_response_body_bytes: body_bytes,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let headers = |value: &str| {
            let mut map = header::HeaderMap::new();
            map.insert(header::RETRY_AFTER, value.parse().unwrap());
            map
        };
        assert_eq!(retry_after(&headers("120")), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(&headers(" 7 ")), Some(Duration::from_secs(7)));
        let in_a_minute = std::time::SystemTime::now() + Duration::from_secs(61);
        let from_date = retry_after(&headers(&httpdate::fmt_http_date(in_a_minute))).unwrap();
        assert!(
            (Duration::from_secs(59)..=Duration::from_secs(61)).contains(&from_date),
            "{from_date:?}"
        );
        assert_eq!(
            retry_after(&headers("Wed, 21 Oct 2015 07:28:00 GMT")),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&headers("soon")), None);
        assert_eq!(retry_after(&headers("-5")), None);
        assert_eq!(retry_after(&header::HeaderMap::new()), None);
    }

    /// Every secret of a rotation signs; the `webhook-id` is the
    /// delivery's, the same on attempt 1 and attempt 5, so a receiver can
    /// drop a repeat.
    #[test]
    fn every_secret_signs_under_the_delivery_s_webhook_id() {
        let (old, new) = (SigningSecret::generate(), SigningSecret::generate());
        let mut endpoint = endpoint("https://hooks.example.com/in");
        endpoint.secrets = vec![new.clone(), old.clone()];
        let first = job();
        let fifth = DeliveryJob {
            attempt: 5,
            ..job()
        };
        let timestamp = herald_core::now_ms() / 1000;
        let signed = Signed::new(&endpoint, &first, timestamp);
        assert_eq!(signed, Signed::new(&endpoint, &fifth, timestamp));
        assert_eq!(
            signed.webhook_id,
            format!("{}.{}", first.task, first.endpoint)
        );
        for secret in [&new, &old] {
            verify(
                secret,
                &signed.webhook_id,
                &signed.timestamp.to_string(),
                &signed.signature,
                first.body.as_bytes(),
                timestamp,
            )
            .unwrap();
        }
        // A body changed on the way does not verify.
        assert!(
            verify(
                &new,
                &signed.webhook_id,
                &signed.timestamp.to_string(),
                &signed.signature,
                b"{\"tampered\":true}",
                timestamp,
            )
            .is_err()
        );
    }

    #[test]
    fn an_endpoint_s_own_timeout_wins_over_the_default() {
        let mut endpoint = endpoint("https://hooks.example.com/in");
        assert_eq!(
            timeout(&endpoint, Duration::from_secs(15)),
            Duration::from_secs(15)
        );
        endpoint.timeout_ms = Some(2500);
        assert_eq!(
            timeout(&endpoint, Duration::from_secs(15)),
            Duration::from_millis(2500)
        );
    }

    /// An allow-listed (internal) peer's answer is kept only as far as
    /// `ssrf.allowed_response_body_bytes`; a global peer's as far as
    /// `response_body_bytes`; neither beyond the record's limit.
    #[test]
    fn internal_answers_keep_only_what_the_allow_list_allows() {
        let config = WebhookWorkerConfig {
            response_body_bytes: 5000,
            ssrf: SsrfConfig {
                allowed_response_body_bytes: 16,
                ..Default::default()
            },
            ..Default::default()
        };
        let global: SocketAddr = "93.184.216.34:443".parse().unwrap();
        let internal: SocketAddr = "10.0.0.7:443".parse().unwrap();
        assert_eq!(
            response_body_bytes(&config, Some(global)),
            RESPONSE_BODY_LIMIT
        );
        assert_eq!(response_body_bytes(&config, Some(internal)), 16);
        assert_eq!(response_body_bytes(&config, None), 16);
    }

    /// A real POST to a loopback receiver: it gets the body, the signed
    /// headers and the endpoint's own headers; the attempt keeps the
    /// status, the `Retry-After` and only the allowed start of the body.
    #[tokio::test]
    async fn the_request_carries_the_signed_body_and_reads_the_answer() {
        let receiver = TestReceiver::start(ReceiverBehaviour::Throttle {
            times: 1,
            status: 503,
            retry_after: "7".to_string(),
        })
        .await;
        let mut endpoint = endpoint(&receiver.url("/hooks"));
        endpoint
            .headers
            .insert("x-tenant".to_string(), "acme".to_string());
        let config = loopback_config(RESPONSE_BODY_LIMIT);
        let client = http_client(&config.ssrf);
        let job = job();

        let response = send(&client, &config, &endpoint, &job).await;
        assert_eq!(response.status, Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(response.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(response.error.as_deref(), Some("HTTP 503"));

        let received = receiver.wait_for(1, Duration::from_secs(5)).await;
        let request = &received[0];
        assert_eq!(request.path, "/hooks");
        assert_eq!(request.body, job.body);
        assert_eq!(request.headers["content-type"], "application/json");
        assert_eq!(request.headers["x-tenant"], "acme");
        assert_eq!(
            request.headers["webhook-id"],
            format!("{}.{}", job.task, job.endpoint)
        );
        verify(
            &endpoint.secrets[0],
            &request.headers["webhook-id"],
            &request.headers["webhook-timestamp"],
            &request.headers["webhook-signature"],
            request.body.as_bytes(),
            herald_core::now_ms() / 1000,
        )
        .unwrap();

        // The second answer is a 200: no error, nothing to wait for.
        let response = send(&client, &config, &endpoint, &job).await;
        assert_eq!(response.status, Some(StatusCode::OK));
        assert_eq!(response.error, None);
        assert_eq!(response.retry_after, None);
    }

    #[tokio::test]
    async fn a_long_answer_is_cut_to_what_the_record_keeps() {
        let receiver = TestReceiver::start(ReceiverBehaviour::Answer {
            status: 500,
            body: "x".repeat(10_000),
        })
        .await;
        let endpoint = endpoint(&receiver.url("/hooks"));
        let config = loopback_config(32);
        let response = send(&http_client(&config.ssrf), &config, &endpoint, &job()).await;
        assert_eq!(response.status, Some(StatusCode::INTERNAL_SERVER_ERROR));
        assert_eq!(response.body.as_deref(), Some("x".repeat(32).as_str()));
        assert_eq!(response.error.as_deref(), Some("HTTP 500"));
    }

    /// No answer at all: the error says what happened without the URL,
    /// whose path or query may hold a secret.
    #[tokio::test]
    async fn no_answer_is_described_without_the_url() {
        let hanging = TestReceiver::start(ReceiverBehaviour::Hang).await;
        let mut endpoint = endpoint(&hanging.url("/hooks?token=s3cret"));
        endpoint.timeout_ms = Some(200);
        let config = loopback_config(0);
        let client = http_client(&config.ssrf);
        let response = send(&client, &config, &endpoint, &job()).await;
        assert_eq!(response.status, None);
        assert_eq!(response.error.as_deref(), Some("timed out"));

        // A port nothing listens on: bound, then let go.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let endpoint =
            crate::webhooks::tests::endpoint(&format!("http://{closed}/hooks?token=s3cret"));
        let response = send(&client, &config, &endpoint, &job()).await;
        let error = response.error.unwrap();
        assert!(error.starts_with("connection failed: "), "{error}");
        assert!(!error.contains("s3cret"), "{error}");

        // Refused by the guard (loopback is not allowed here).
        let guarded = WebhookWorkerConfig::default();
        let response = send(&http_client(&guarded.ssrf), &guarded, &endpoint, &job()).await;
        assert_eq!(response.status, None);
        let error = response.error.unwrap();
        assert!(error.starts_with("refused by the SSRF guard: "), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
    }
}
