//! The metric names a PromQL expression uses, for checking the chart's
//! dashboard and alerts against what Herald serves (metrics_lint.rs).

use std::collections::BTreeSet;

/// The metric names a PromQL expression selects: what is left once
/// strings, label matchers, ranges, grouping labels, Grafana variables,
/// numbers, keywords and function names are taken out.
pub(crate) fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Whether the last word was a grouping keyword, whose (...) lists labels.
    let mut grouping = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                i += 1;
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if grouping => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                grouping = false;
                i += 1;
            }
            '$' => {
                // A Grafana variable such as $__rate_interval.
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // A number or a duration (5m, 1e3, 0.99).
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let lower = word.to_ascii_lowercase();
                // What follows: `(` after a function or an aggregation,
                // `by`/`without` after an aggregation grouped first.
                let rest: String = chars[i..].iter().collect();
                let rest = rest.trim_start();
                let grouped_next = ["by", "without"].iter().any(|keyword| {
                    rest.strip_prefix(keyword).is_some_and(|after| {
                        !after.starts_with(|c: char| c.is_alphanumeric() || c == '_')
                    })
                });
                if KEYWORDS.contains(&lower.as_str()) {
                    grouping = matches!(
                        lower.as_str(),
                        "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                    );
                } else if !rest.starts_with('(') && !grouped_next {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn promql_metric_names_finds_only_metric_names() {
    let names = |expr| promql_metric_names(expr).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le) (rate(herald_webhook_duration_seconds_bucket{namespace="$namespace", x=~"a|b{1}"}[$__rate_interval])))"#
        ),
        ["herald_webhook_duration_seconds_bucket"]
    );
    assert_eq!(
        names(
            "max by (namespace, deployment) (kube_deployment_status_replicas_available{a=\"b\"}) < on (namespace) group_left (x) up offset 5m and bool vector(1)"
        ),
        ["kube_deployment_status_replicas_available", "up"]
    );
    assert_eq!(
        names("herald_a_total / herald_b_total > 0.05"),
        ["herald_a_total", "herald_b_total"]
    );
}
