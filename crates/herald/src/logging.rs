//! Logging to stderr, as `log.filter` and `log.format` say (`RUST_LOG`
//! wins over the filter).

use crate::config;

pub fn init_logging(log: &config::LogConfig) {
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.filter));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match log.format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}
