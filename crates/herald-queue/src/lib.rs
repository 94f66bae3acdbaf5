//! Herald's JetStream layer.
//!
//! Everything that talks to NATS goes through here: connecting, creating the
//! streams, consumers and buckets of DESIGN.md ([`topology`]), publishing
//! with a server acknowledgement ([`publish`]), the pull-consumer loop every
//! worker runs ([`consume`]), the local cache of `herald-endpoints`
//! ([`endpoints`]), endpoint health records ([`health`]), the shared
//! per-endpoint rate limit ([`rate_limit`]), reading a task's stored state
//! back ([`history`]) and messages by sequence ([`stored`]). What Herald
//! decides (when an endpoint is disabled, what a replay sends) lives in
//! `herald_core` and the roles; this crate stores and moves it.

mod backoff;
mod buckets;
mod cas;
pub mod connect;
pub mod consume;
pub mod endpoints;
pub mod error;
pub mod health;
pub mod history;
mod kv_follow;
pub mod limits;
pub mod publish;
pub mod rate_limit;
pub mod stored;
pub mod topology;
pub mod trace_context;

pub use connect::{Broker, ConnectError, NatsConfig, connect, connect_with};
pub use error::QueueError;
pub use topology::TopologyConfig;
