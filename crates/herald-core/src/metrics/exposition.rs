//! The two text formats `/metrics` serves, chosen by the scraper's
//! `Accept` header as Prometheus' own Go client does: OpenMetrics to
//! whoever asks for it (Prometheus does, by default), the classic
//! Prometheus text format (0.0.4) to everyone else (`curl`, older
//! agents, `promtool check metrics`, which parses only that format and
//! reports every OpenMetrics counter as a metric without help text).
//!
//! prometheus_client encodes OpenMetrics only; the classic text is
//! derived from it. They differ, for what Herald registers (counters,
//! gauges, histograms), only in that a counter's `# HELP` and `# TYPE`
//! name its samples' name (`x_total`) instead of the family's (`x`), and
//! that OpenMetrics ends with `# EOF`.

/// A text exposition format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    /// The format for a request's `Accept` header: OpenMetrics when it
    /// prefers `application/openmetrics-text` over `text/plain` (highest
    /// `q`; the first on a tie); the classic text otherwise, also without
    /// a header or with only `*/*`.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let mut best: Option<(f32, Format)> = None;
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';');
            let media_type = parts.next().unwrap_or_default().trim();
            let format = if media_type.eq_ignore_ascii_case("application/openmetrics-text") {
                Format::OpenMetrics
            } else if media_type.eq_ignore_ascii_case("text/plain") {
                Format::PrometheusText
            } else {
                continue;
            };
            let q = parts
                .filter_map(|param| param.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, value)| value.trim().parse::<f32>().ok());
            // A q we cannot read or of 0 accepts nothing.
            let Some(q) = q.filter(|q| *q > 0.0) else {
                continue;
            };
            if best.is_none_or(|(best_q, _)| q > best_q) {
                best = Some((q, format));
            }
        }
        best.map_or(Format::PrometheusText, |(_, format)| format)
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Every metric of this process in `format`.
pub fn render_as(format: Format) -> String {
    let openmetrics = super::render();
    match format {
        Format::OpenMetrics => openmetrics,
        Format::PrometheusText => prometheus_text(&openmetrics),
    }
}

/// The classic Prometheus text of an OpenMetrics exposition of counters,
/// gauges and histograms (the types Herald registers).
fn prometheus_text(openmetrics: &str) -> String {
    // The counter families, whose descriptor lines take the `_total` name.
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "].into_iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match descriptor {
            Some(renamed) => text.push_str(&renamed),
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Prometheus 3 sends by default (scrape_protocols).
    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,\
        application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;q=0.3,\
        text/plain;version=0.0.4;q=0.2,*/*;q=0.1";

    #[test]
    fn openmetrics_goes_to_whoever_prefers_it_and_the_classic_text_to_everyone_else() {
        assert_eq!(
            Format::negotiate(Some(PROMETHEUS_ACCEPT)),
            Format::OpenMetrics
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text")),
            Format::OpenMetrics
        );
        for accept in [
            None,
            Some(""),
            Some("*/*"),
            Some("text/plain"),
            Some("text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"),
            Some("application/openmetrics-text;q=0"),
            Some("application/openmetrics-text;q=soon"),
            Some("application/json"),
        ] {
            assert_eq!(
                Format::negotiate(accept),
                Format::PrometheusText,
                "{accept:?}"
            );
        }
    }

    #[test]
    fn the_classic_text_names_counters_by_their_samples_and_has_no_eof() {
        let openmetrics = "# HELP herald_tasks_accepted Tasks stored by the API.\n\
            # TYPE herald_tasks_accepted counter\n\
            herald_tasks_accepted_total 3\n\
            # HELP herald_endpoints WebhookEndpoints by state.\n\
            # TYPE herald_endpoints gauge\n\
            herald_endpoints{state=\"active\"} 2\n\
            # HELP herald_webhook_duration_seconds Time to answer.\n\
            # TYPE herald_webhook_duration_seconds histogram\n\
            # UNIT herald_webhook_duration_seconds seconds\n\
            herald_webhook_duration_seconds_sum 0.5\n\
            herald_webhook_duration_seconds_count 1\n\
            herald_webhook_duration_seconds_bucket{le=\"+Inf\"} 1\n\
            # EOF\n";
        assert_eq!(
            prometheus_text(openmetrics),
            "# HELP herald_tasks_accepted_total Tasks stored by the API.\n\
            # TYPE herald_tasks_accepted_total counter\n\
            herald_tasks_accepted_total 3\n\
            # HELP herald_endpoints WebhookEndpoints by state.\n\
            # TYPE herald_endpoints gauge\n\
            herald_endpoints{state=\"active\"} 2\n\
            # HELP herald_webhook_duration_seconds Time to answer.\n\
            # TYPE herald_webhook_duration_seconds histogram\n\
            herald_webhook_duration_seconds_sum 0.5\n\
            herald_webhook_duration_seconds_count 1\n\
            herald_webhook_duration_seconds_bucket{le=\"+Inf\"} 1\n"
        );
    }

    #[test]
    fn both_formats_carry_the_same_samples() {
        super::super::metrics().tasks_accepted.inc();
        let samples = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|line| !line.starts_with('#'))
                .map(String::from)
                .collect()
        };
        // One rendering converted: other tests count meanwhile.
        let openmetrics = render_as(Format::OpenMetrics);
        let text = prometheus_text(&openmetrics);
        assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
        assert!(!text.contains("# EOF"), "{text}");
        assert_eq!(samples(&openmetrics), samples(&text));
        assert!(
            text.contains("# TYPE herald_tasks_accepted_total counter\n"),
            "{text}"
        );
    }
}
