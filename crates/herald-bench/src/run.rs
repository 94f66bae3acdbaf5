//! One load run: the receiver listening, every task sent, then waiting
//! until every accepted task has had its webhook (or the deadline passed),
//! then a grace period to catch late duplicates, then the tally.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use crate::{
    load::{self, Load},
    receiver::Receiver,
    tally::{self, Tally},
};

/// How long to wait, and listen on, after the POSTs.
#[derive(Debug, Clone, Copy)]
pub struct Waiting {
    /// Stop waiting for missing webhooks at this instant.
    pub deadline: Instant,
    /// Listen this much longer once every task has arrived.
    pub grace: Duration,
}

pub async fn run(load: &Load, receiver: &Receiver, waiting: Waiting) -> Tally {
    let sending = load::send(load).await;
    let accepted = tally::accepted_ids(&sending);
    // Read only the arrivals since the last look, and outside the lock:
    // the receiver keeps taking webhooks while the run waits.
    let (mut read, mut delivered) = (0, HashSet::new());
    let mut pause = Duration::from_millis(5);
    loop {
        let new: Vec<Option<String>> = receiver
            .inspect(|arrivals| arrivals[read..].iter().map(|a| a.task_id.clone()).collect());
        read += new.len();
        delivered.extend(
            new.into_iter()
                .flatten()
                .filter(|task| accepted.contains(task)),
        );
        if delivered.len() == accepted.len() || Instant::now() >= waiting.deadline {
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    tokio::time::sleep(waiting.grace).await;
    tally::tally(&sending, &receiver.arrivals())
}
