//! Matches webhooks to accepted tasks and counts what went wrong: every
//! POST not answered 201, every accepted task with no webhook, every
//! webhook beyond the first for a task, every webhook for no task of the
//! run.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Instant, SystemTime},
};

use serde::Serialize;

use crate::{
    load::{Answer, Sending},
    receiver::Arrival,
    stats::Percentiles,
};

/// The result of a run, printed as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Tally {
    pub sent: usize,
    /// Answered 201 with an id.
    pub accepted: usize,
    /// Answered 201 without a readable id: stored, but not matchable.
    pub accepted_without_id: usize,
    /// Every other status, by status code.
    pub rejected: BTreeMap<u16, usize>,
    /// POSTs with no answer at all.
    pub failed_requests: usize,
    /// Accepted tasks that got at least one webhook.
    pub delivered: usize,
    /// Accepted tasks that got none.
    pub missing: usize,
    /// Webhooks beyond the first for an accepted task.
    pub duplicates: usize,
    /// Distinct `webhook-id`s that arrived more than once.
    pub repeated_webhook_ids: usize,
    /// Webhooks about a task this run was not told was accepted.
    pub strays: usize,
    /// Requests that were not a Herald webhook (no `data.task_id`).
    pub unreadable: usize,
    /// Accepted tasks ÷ seconds from the first POST to the last 201.
    pub ingest_per_s: f64,
    /// Delivered tasks ÷ seconds from the first POST to the last first
    /// webhook of a task.
    pub deliveries_per_s: f64,
    /// Seconds from the first POST to the last first webhook.
    pub span_s: f64,
    /// From the 201 to the task's first webhook.
    pub accept_to_webhook_ms: Option<Percentiles>,
    /// Open loop: from when the task was due to its first webhook, the
    /// latency a client sending at the rate sees.
    pub due_to_webhook_ms: Option<Percentiles>,
    /// From the payload's `timestamp` (the handler finished) to arrival:
    /// the delivery leg alone, on the wall clock (millisecond resolution).
    pub finished_to_webhook_ms: Option<Percentiles>,
    /// How long the POST took to answer.
    pub post_ms: Option<Percentiles>,
    pub late_sends: usize,
    pub unsent: usize,
    /// When tasks got their first webhook, as counts per interval of the
    /// wall clock: how a bench that broke something mid-run sees the rate
    /// fall and come back.
    pub first_webhooks: Timeline,
}

/// Counts of events per `interval_s` from `start_unix_s` (seconds since
/// the Unix epoch, the start of `counts[0]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timeline {
    pub start_unix_s: f64,
    pub interval_s: f64,
    pub counts: Vec<usize>,
}

/// The interval of [`Tally::first_webhooks`].
const TIMELINE_INTERVAL_S: f64 = 0.25;

impl Timeline {
    pub fn of(events: impl IntoIterator<Item = SystemTime>, interval_s: f64) -> Timeline {
        let unix_s = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
        };
        let events: Vec<f64> = events.into_iter().map(unix_s).collect();
        let Some(first) = events.iter().copied().reduce(f64::min) else {
            return Timeline {
                interval_s,
                ..Timeline::default()
            };
        };
        let start_unix_s = (first / interval_s).floor() * interval_s;
        let mut counts = Vec::new();
        for event in events {
            let index = ((event - start_unix_s) / interval_s) as usize;
            if counts.len() <= index {
                counts.resize(index + 1, 0);
            }
            counts[index] += 1;
        }
        Timeline {
            start_unix_s,
            interval_s,
            counts,
        }
    }
}

impl Tally {
    /// True when nothing was refused, lost, repeated or unexplained.
    pub fn clean(&self) -> bool {
        self.accepted == self.sent
            && self.missing == 0
            && self.duplicates == 0
            && self.strays == 0
            && self.unreadable == 0
    }
}

pub fn tally(sending: &Sending, arrivals: &[Arrival]) -> Tally {
    let mut rejected = BTreeMap::new();
    let (mut failed_requests, mut accepted_without_id) = (0, 0);
    // Task id -> when its 201 came back (and when it was due).
    let mut accepted: HashMap<&str, (Instant, Option<Instant>)> = HashMap::new();
    for sent in &sending.sent {
        match &sent.answer {
            Answer::Accepted(id) => {
                accepted.insert(id.as_str(), (sent.answered, sent.due));
            }
            Answer::AcceptedWithoutId => accepted_without_id += 1,
            Answer::Status(status) => *rejected.entry(*status).or_insert(0) += 1,
            Answer::Failed => failed_requests += 1,
        }
    }

    let mut first_arrival: HashMap<&str, &Arrival> = HashMap::new();
    let (mut duplicates, mut strays, mut unreadable) = (0, 0, 0);
    let mut finished_to_webhook = Vec::new();
    for arrival in arrivals {
        let Some(task) = arrival.task_id.as_deref() else {
            unreadable += 1;
            continue;
        };
        if let Some(finished) = arrival.finished {
            // Clocks of one machine; a negative difference (the timestamp
            // is rounded to the millisecond) counts as zero.
            finished_to_webhook.push(arrival.wall.duration_since(finished).unwrap_or_default());
        }
        if !accepted.contains_key(task) {
            strays += 1;
        } else if first_arrival.contains_key(task) {
            duplicates += 1;
        } else {
            first_arrival.insert(task, arrival);
        }
    }
    let mut seen_ids = HashSet::new();
    let mut repeated_ids = HashSet::new();
    for id in arrivals.iter().filter_map(|a| a.webhook_id.as_deref()) {
        if !seen_ids.insert(id) {
            repeated_ids.insert(id);
        }
    }

    let start = sending.sent.iter().map(|s| s.sent).min();
    let last_accept = sending
        .sent
        .iter()
        .filter(|s| matches!(s.answer, Answer::Accepted(_)))
        .map(|s| s.answered)
        .max();
    let last_delivery = first_arrival.values().map(|a| a.at).max();
    let seconds = |end: Option<Instant>| match (start, end) {
        (Some(start), Some(end)) => end.saturating_duration_since(start).as_secs_f64(),
        _ => 0.0,
    };
    let per_second = |count: usize, seconds: f64| {
        if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        }
    };
    let span_s = seconds(last_delivery);
    let latencies = |from: fn(&(Instant, Option<Instant>)) -> Option<Instant>| {
        Percentiles::of(first_arrival.iter().filter_map(|(task, arrival)| {
            let from = from(&accepted[task])?;
            Some(arrival.at.saturating_duration_since(from))
        }))
    };
    Tally {
        sent: sending.sent.len(),
        accepted: accepted.len(),
        accepted_without_id,
        rejected,
        failed_requests,
        delivered: first_arrival.len(),
        missing: accepted.len() - first_arrival.len(),
        duplicates,
        repeated_webhook_ids: repeated_ids.len(),
        strays,
        unreadable,
        ingest_per_s: per_second(accepted.len(), seconds(last_accept)),
        deliveries_per_s: per_second(first_arrival.len(), span_s),
        span_s,
        accept_to_webhook_ms: latencies(|(answered, _)| Some(*answered)),
        due_to_webhook_ms: latencies(|(_, due)| *due),
        finished_to_webhook_ms: Percentiles::of(finished_to_webhook),
        post_ms: Percentiles::of(
            sending
                .sent
                .iter()
                .map(|s| s.answered.saturating_duration_since(s.sent)),
        ),
        late_sends: sending.late_sends,
        unsent: sending.unsent,
        first_webhooks: Timeline::of(first_arrival.values().map(|a| a.wall), TIMELINE_INTERVAL_S),
    }
}

/// The ids of the tasks `sending` got a 201 for.
pub fn accepted_ids(sending: &Sending) -> HashSet<String> {
    sending
        .sent
        .iter()
        .filter_map(|s| match &s.answer {
            Answer::Accepted(id) => Some(id.clone()),
            _ => None,
        })
        .collect()
}

/// p50 / p99 / max for a summary line; `-` when there was nothing to measure.
pub fn ms(p: &Option<Percentiles>) -> String {
    match p {
        Some(p) => format!("{:.1} / {:.1} / {:.1} ms", p.p50, p.p99, p.max),
        None => "-".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::load::Sent;

    fn sent(index: usize, answer: Answer) -> Sent {
        let now = Instant::now();
        Sent {
            index,
            due: None,
            sent: now,
            answered: now,
            answer,
        }
    }

    fn arrival(task: Option<&str>, webhook_id: &str) -> Arrival {
        Arrival {
            at: Instant::now(),
            wall: SystemTime::now(),
            webhook_id: Some(webhook_id.to_string()),
            task_id: task.map(str::to_owned),
            finished: None,
        }
    }

    #[test]
    fn every_kind_of_fault_is_counted_once() {
        let sending = Sending {
            sent: vec![
                sent(0, Answer::Accepted("a".into())),
                sent(1, Answer::Accepted("b".into())),
                sent(2, Answer::Accepted("c".into())),
                sent(3, Answer::Status(503)),
                sent(4, Answer::Status(503)),
                sent(5, Answer::Failed),
            ],
            ..Sending::default()
        };
        let arrivals = [
            arrival(Some("a"), "w-a"),
            arrival(Some("a"), "w-a"),
            arrival(Some("b"), "w-b"),
            arrival(Some("zz"), "w-zz"),
            arrival(None, "w-?"),
        ];
        let t = tally(&sending, &arrivals);
        assert_eq!(t.sent, 6);
        assert_eq!(t.accepted, 3);
        assert_eq!(t.rejected, BTreeMap::from([(503, 2)]));
        assert_eq!(t.failed_requests, 1);
        assert_eq!(t.delivered, 2);
        assert_eq!(t.missing, 1, "c never arrived");
        assert_eq!(t.duplicates, 1, "a arrived twice");
        assert_eq!(t.repeated_webhook_ids, 1);
        assert_eq!(t.strays, 1);
        assert_eq!(t.unreadable, 1);
        assert!(!t.clean());
    }

    #[test]
    fn the_timeline_counts_events_per_interval_from_the_first() {
        let at = |s: f64| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s);
        let timeline = Timeline::of([at(100.6), at(100.1), at(100.2), at(101.9)], 0.5);
        assert_eq!(timeline.start_unix_s, 100.0);
        assert_eq!(timeline.counts, vec![2, 1, 0, 1]);
        assert_eq!(Timeline::of([], 0.5).counts, Vec::<usize>::new());
    }
}
