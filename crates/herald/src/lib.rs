//! The `herald` binary's library: configuration, the command line, and the
//! code that starts each role. `main.rs` only calls [`cli::run`]; tests
//! start roles in-process with [`roles::run_with`].

pub mod child;
pub mod cli;
pub mod config;
pub mod dev;
pub mod endpoints_file;
pub mod flags;
pub mod operator;
pub mod probes;
pub mod receiver;
pub mod roles;
pub mod shutdown;
pub mod telemetry;
