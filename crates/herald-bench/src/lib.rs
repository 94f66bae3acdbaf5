//! Herald's own benchmark tools, used by `make bench` (scripts/bench.py):
//!
//! - [`run`]: a load driver POSTing tasks (closed or open loop) with the
//!   webhook receiver in the same process, so accept-to-webhook latency is
//!   read on one clock, and a [`tally`] of every fault: non-201 answers,
//!   missing, duplicate and stray webhooks;
//! - [`jetstream_bound`]: the bare two-hop JetStream pipeline, the
//!   baseline Herald's throughput is read against.

pub mod jetstream_bound;
pub mod load;
pub mod receiver;
pub mod run;
pub mod stats;
pub mod tally;
