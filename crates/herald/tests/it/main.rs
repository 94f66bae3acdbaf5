//! Whole-system tests: a real nats-server with JetStream, a real SMTP server
//! (mailpit), real HTTP receivers on loopback, and Herald's roles started
//! in-process (or as a child process where a test kills it).

// Helpers as well as tests panic on an unexpected answer: that is the failure.
#![allow(clippy::unwrap_used)]

mod harness;

mod abandoned;
mod auth;
mod backlog;
mod chart;
mod counts;
mod delivery;
mod dev;
mod door;
mod endpoint_cache;
mod failures;
mod inputs;
mod kubernetes;
mod leaks;
mod lost_acks;
mod metrics_lint;
mod nats_auth;
mod nats_refusals;
mod nats_servers;
mod openapi;
mod operator;
mod policies;
mod probes;
mod promql;
mod replay;
mod replay_requests;
mod resilience;
mod secrets;
mod ssrf;
mod tenancy;
mod traces;
mod vanished_endpoint;
