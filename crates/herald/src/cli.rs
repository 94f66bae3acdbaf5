//! The command line: `herald <role> [flags]`.

use std::{collections::BTreeSet, path::PathBuf};

use anyhow::Context;
use clap::{ArgGroup, Args, Parser, Subcommand};
use serde_json::json;

// Where `herald worker <kinds>` parses its kinds, and tests name them.
pub use crate::roles::WorkerKind;
use crate::{child, dev, flags::CommonFlags, receiver, roles, shutdown, telemetry};

#[derive(Parser)]
#[command(
    name = "herald",
    version,
    about = "Webhook and notification delivery over NATS JetStream"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Api {
        #[command(flatten)]
        common: CommonFlags,
        /// Address to listen on (api.listen).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run one or more workers: tasks, webhooks, mail.
    Worker {
        #[command(flatten)]
        common: CommonFlags,
        #[arg(required = true, value_delimiter = ',')]
        kinds: Vec<WorkerKind>,
    },
    /// Everything in one process, with a local nats-server and endpoints
    /// from a file: the laptop setup.
    Dev(dev::DevArgs),
    /// A demo webhook receiver that verifies signatures and prints what
    /// arrives.
    Receiver(receiver::ReceiverArgs),
    /// Reconcile WebhookEndpoint resources into herald-endpoints and report
    /// endpoint health in their status (leader-elected; uses KUBECONFIG or
    /// the in-cluster service account).
    Operator {
        #[command(flatten)]
        common: CommonFlags,
    },
    /// Print the WebhookEndpoint CustomResourceDefinition (YAML), as
    /// committed in crds/ and the Helm chart.
    Crd,
    /// Print the API's OpenAPI document (JSON), as committed in
    /// openapi.json and served at /openapi.json.
    Openapi,
    /// API bearer tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Make herald-endpoints hold exactly the endpoints of a YAML file
    /// (without Kubernetes; the operator does this in a cluster).
    Endpoints {
        #[command(flatten)]
        common: CommonFlags,
        /// WebhookEndpoint (and Secret) documents.
        file: PathBuf,
    },
    /// Keys that encrypt signing secrets at rest.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// Become a program that dies with process <parent> (how `herald dev`
    /// starts nats-server).
    #[command(hide = true)]
    ChildOf(child::ChildArgs),
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Print a new random key, `<id>:<base64>`, for secrets.key_file or
    /// HERALD_SECRETS__KEY (the first key of a keyring encrypts).
    NewKey {
        /// The key's id, stored next to everything it encrypts; by default
        /// `k` and the current UTC time.
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Generate a token: prints it (once: only its hash is kept), then the
    /// entry to add to the tokens file (api.tokens_file).
    New(NewTokenArgs),
}

#[derive(Args)]
#[command(group(ArgGroup::new("scope").required(true).args(["users", "all_users"])))]
struct NewTokenArgs {
    /// Name of the token in logs, such as the client that uses it.
    #[arg(long)]
    name: String,
    /// The users it may act for (comma-separated).
    #[arg(long, value_delimiter = ',')]
    users: Vec<String>,
    /// It may act for every user.
    #[arg(long)]
    all_users: bool,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        // First and without awaiting anything: nothing of the runtime is
        // needed, and exec replaces the whole process.
        Command::ChildOf(args) => Err(child::exec(args)),
        Command::Api { common, listen } => {
            let extra = listen.map_or(json!({}), |l| json!({ "api": { "listen": l } }));
            let config = common.load(extra)?;
            let telemetry = telemetry::init(&config.log, &config.tracing)?;
            let shutdown = shutdown::on_signal().context("cannot install signal handlers")?;
            let ran = roles::run(config, roles::Roles::api_only(), shutdown).await;
            telemetry.shutdown().await;
            ran
        }
        Command::Worker { common, kinds } => {
            let config = common.load(json!({}))?;
            let telemetry = telemetry::init(&config.log, &config.tracing)?;
            let shutdown = shutdown::on_signal().context("cannot install signal handlers")?;
            let kinds: BTreeSet<_> = kinds.into_iter().collect();
            let ran = roles::run(config, roles::Roles::workers(kinds), shutdown).await;
            telemetry.shutdown().await;
            ran
        }
        Command::Dev(args) => dev::run(args).await,
        Command::Operator { common } => {
            let config = common.load(json!({}))?;
            let telemetry = telemetry::init(&config.log, &config.tracing)?;
            let shutdown = shutdown::on_signal().context("cannot install signal handlers")?;
            let ran = crate::operator::run(config, shutdown).await;
            telemetry.shutdown().await;
            ran
        }
        Command::Crd => {
            print!("{}", herald_crd::crd_yaml());
            Ok(())
        }
        Command::Openapi => {
            print!("{}", herald_api::openapi_json());
            Ok(())
        }
        Command::Token {
            command: TokenCommand::New(args),
        } => new_token(args),
        Command::Receiver(args) => receiver::run(args).await,
        Command::Secrets {
            command: SecretsCommand::NewKey { id },
        } => {
            let id = id.unwrap_or_else(default_key_id);
            println!("{}", herald_core::keyring::new_key_text(&id)?);
            Ok(())
        }
        Command::Endpoints { common, file } => {
            let config = common.load(json!({}))?;
            telemetry::init_logs(&config.log);
            let records = config.secrets.record_writer("herald endpoints")?;
            let endpoints = crate::endpoints_file::load(&file)?;
            let broker = herald_queue::connect_with(&config.nats, "herald-endpoints").await?;
            if config.nats.manage_topology {
                herald_queue::topology::ensure(&broker, &config.topology).await?;
            } else {
                // Least-privilege credentials: wait for the role that may
                // create the topology.
                let shutdown = shutdown::on_signal().context("cannot install signal handlers")?;
                herald_queue::topology::prepare(&broker, &config.topology, false, &shutdown)
                    .await?;
            }
            dev::sync_endpoints(&broker, &records, &endpoints).await?;
            broker.flush().await?;
            println!("{} endpoints in herald-endpoints", endpoints.len());
            Ok(())
        }
    }
}

/// Prints the token on the first line of stdout and the tokens-file entry
/// after a blank line, so a script can take either; the explanations go to
/// stderr.
fn new_token(args: NewTokenArgs) -> anyhow::Result<()> {
    use herald_api::auth::{Scope, new_token};
    let scope = if args.all_users {
        Scope::AllUsers
    } else {
        let users = args
            .users
            .iter()
            .map(|u| herald_core::UserId::new(u.trim()))
            .collect::<Result<_, _>>()?;
        Scope::Users(users)
    };
    let made = new_token(&args.name, &scope).map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "The token (shown only now; give it to the client as `Authorization: Bearer <token>`):"
    );
    println!(
        "{}
",
        made.token
    );
    eprintln!("Add this entry to the tokens file (api.tokens_file) and restart the API:");
    print!("{}", made.entry.to_toml());
    Ok(())
}

/// `k20261129T053000`: ids that sort by creation and say when.
fn default_key_id() -> String {
    let format = time::macros::format_description!("k[year][month][day]T[hour][minute][second]");
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_else(|_| "k1".into())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn the_committed_openapi_document_matches_the_code() {
        let root = Path::new(
            &std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for tests"),
        )
        .join("../..");
        let text = std::fs::read_to_string(root.join("openapi.json")).unwrap_or_default();
        assert!(
            text == herald_api::openapi_json(),
            "openapi.json drifted from the code: run `cargo run -q --bin herald -- openapi > openapi.json`",
        );
    }
}
