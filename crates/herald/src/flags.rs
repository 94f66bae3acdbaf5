//! The flags every role's command takes, and the configuration they load.
//! Apart from [`crate::cli`] so that `herald dev` can take them without
//! importing the command line that starts it.

use std::path::PathBuf;

use clap::Args;
use serde_json::{Value, json};

use crate::config;

#[derive(Args, Clone)]
pub struct CommonFlags {
    /// TOML configuration file (see config.example.toml).
    #[arg(long, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL (nats.url).
    #[arg(long)]
    pub nats_url: Option<String>,
}

impl CommonFlags {
    /// The flags that were given, as a partial configuration.
    pub fn overrides(&self) -> Value {
        let mut overrides = json!({});
        if let Some(url) = &self.nats_url {
            overrides["nats"] = json!({ "url": url });
        }
        overrides
    }

    pub fn load(&self, mut extra: Value) -> anyhow::Result<config::Config> {
        let mut overrides = self.overrides();
        if let (Some(base), Some(more)) = (overrides.as_object_mut(), extra.as_object_mut()) {
            base.append(more);
        }
        config::load(self.config.as_deref(), overrides)
    }
}
