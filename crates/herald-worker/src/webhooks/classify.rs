//! Phase 3, classify: what a response means, one table,
//! [`ResponseClass::of`]:
//!
//! | response                                   | class                       |
//! |--------------------------------------------|-----------------------------|
//! | 2xx                                        | delivered                   |
//! | 410 Gone                                   | gone: disable the endpoint  |
//! | 429, 503                                   | retry, honour `Retry-After` |
//! | 1xx, 3xx (redirects are never followed)    | retry                       |
//! | other 4xx (400, 401, 403, 404, 408, 413…)  | retry                       |
//! | other 5xx (500, 502, 504…)                 | retry                       |
//! | timeout, connection error, SSRF refusal    | retry                       |
//!
//! Other 4xx are retried like 5xx: receivers answer 401/404 while they are
//! being deployed or misconfigured, and the schedule gives them days to
//! recover; only 410 says "never again". What a class leads to is decided
//! in [`super::decide`].

use reqwest::StatusCode;

use super::request::Response;

/// How a response is handled; the table in the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ResponseClass {
    Delivered,
    Gone,
    Retry { honour_retry_after: bool },
}

impl ResponseClass {
    pub(super) fn of(response: &Response) -> Self {
        Self::of_status(response.status)
    }

    /// `None`: no response at all (timeout, connection error, SSRF refusal).
    fn of_status(status: Option<StatusCode>) -> Self {
        match status {
            Some(s) if s.is_success() => ResponseClass::Delivered,
            Some(StatusCode::GONE) => ResponseClass::Gone,
            Some(StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE) => {
                ResponseClass::Retry {
                    honour_retry_after: true,
                }
            }
            _ => ResponseClass::Retry {
                honour_retry_after: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    #[test]
    fn every_status_has_its_row_in_the_table() {
        let retry = ResponseClass::Retry {
            honour_retry_after: false,
        };
        let throttled = ResponseClass::Retry {
            honour_retry_after: true,
        };
        let table = [
            (Some(200), ResponseClass::Delivered),
            (Some(202), ResponseClass::Delivered),
            (Some(204), ResponseClass::Delivered),
            (Some(299), ResponseClass::Delivered),
            (Some(101), retry),
            (Some(301), retry),
            (Some(307), retry),
            (Some(400), retry),
            (Some(401), retry),
            (Some(404), retry),
            (Some(408), retry),
            (Some(410), ResponseClass::Gone),
            (Some(413), retry),
            (Some(429), throttled),
            (Some(500), retry),
            (Some(502), retry),
            (Some(503), throttled),
            (Some(504), retry),
            (None, retry),
        ];
        for (status, class) in table {
            let status = status.map(|s| StatusCode::from_u16(s).unwrap());
            assert_eq!(ResponseClass::of_status(status), class, "{status:?}");
        }
    }

    /// The class is the status's alone: a `Retry-After` or an error text
    /// on the response does not move a 200 or a 500 to another row.
    #[test]
    fn a_response_is_classed_by_its_status_only() {
        let response = |status: Option<u16>| Response {
            status: status.map(|s| StatusCode::from_u16(s).unwrap()),
            no_response: None,
            retry_after: Some(Duration::from_secs(30)),
            body: Some("slow down".to_string()),
            error: Some("HTTP 500".to_string()),
            latency: Duration::from_millis(5),
        };
        assert_eq!(
            ResponseClass::of(&response(Some(200))),
            ResponseClass::Delivered
        );
        assert_eq!(
            ResponseClass::of(&response(Some(500))),
            ResponseClass::Retry {
                honour_retry_after: false
            }
        );
        assert_eq!(
            ResponseClass::of(&response(None)),
            ResponseClass::Retry {
                honour_retry_after: false
            }
        );
    }
}
