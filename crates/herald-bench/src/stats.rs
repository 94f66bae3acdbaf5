//! Percentiles of a set of durations, as the JSON result carries them.

use std::time::Duration;

use serde::Serialize;

/// Nearest-rank percentiles of a distribution, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// `None` for an empty set: a figure of 0 ms would read as a result.
    pub fn of(samples: impl IntoIterator<Item = Duration>) -> Option<Percentiles> {
        let mut ms: Vec<f64> = samples.into_iter().map(|d| d.as_secs_f64() * 1e3).collect();
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            // Nearest rank: the smallest sample with at least p of the set
            // at or below it.
            let index = ((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1;
            ms[index]
        };
        Some(Percentiles {
            count: ms.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            p999: rank(0.999),
            max: ms[ms.len() - 1],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_of_a_hundred_samples() {
        let p = Percentiles::of((1..=100).map(Duration::from_millis)).expect("not empty");
        assert_eq!((p.p50, p.p90, p.p99, p.max), (50.0, 90.0, 99.0, 100.0));
        assert_eq!(p.count, 100);
    }

    #[test]
    fn an_empty_set_has_no_percentiles() {
        assert_eq!(Percentiles::of([]), None);
    }
}
