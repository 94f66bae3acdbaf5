//! `herald dev`: the whole system in one process for a laptop. Starts a
//! `nats-server` child with JetStream in a temporary store, loads endpoints
//! from a file, and runs the API and every worker.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, bail};
use clap::Args;
use herald_queue::{endpoints, topology};
use serde_json::json;
use tokio::process::Child;

use crate::{
    endpoints_file,
    flags::CommonFlags,
    roles::{self, Roles},
    shutdown, telemetry,
};

#[derive(Args)]
pub struct DevArgs {
    #[command(flatten)]
    common: CommonFlags,
    /// WebhookEndpoint (and Secret) documents to load into herald-endpoints.
    #[arg(long, default_value = "examples/endpoints.yaml")]
    endpoints: PathBuf,
    /// The nats-server binary; by default from PATH or `make tools`' cache.
    #[arg(long, env = "HERALD_NATS_SERVER")]
    nats_server: Option<PathBuf>,
    /// Port for the local nats-server.
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    /// JetStream store directory; a temporary one (removed on exit) if unset.
    #[arg(long)]
    store_dir: Option<PathBuf>,
    /// Address of the API.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: String,
    /// Webhook retry delays, short so the demo reaches its email quickly.
    #[arg(long, value_delimiter = ',', default_value = "1s,2s,4s,8s")]
    retry_schedule: Vec<String>,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if args.common.nats_url.is_some() {
        bail!(
            "herald dev runs its own nats-server: choose its port with --nats-port, not --nats-url"
        );
    }
    let overrides = json!({
        "nats": { "url": format!("nats://127.0.0.1:{}", args.nats_port) },
        "api": { "listen": args.listen },
        "webhooks": { "retry_schedule": args.retry_schedule },
    });
    let mut config = args.common.load(overrides)?;
    // The demo receiver, and whatever else a laptop runs, is on loopback;
    // ranges the configuration already opens stay open.
    for cidr in herald_worker::ssrf::LOOPBACK {
        if !config.webhooks.ssrf.allow.contains(&cidr) {
            config.webhooks.ssrf.allow.push(cidr);
        }
    }
    let telemetry = telemetry::init(&config.log, &config.tracing)?;
    if config.secrets.keyring()?.is_none() {
        // Nothing outlives a dev run unless --store-dir keeps it; endpoint
        // records a later run cannot read are rewritten from the file.
        config.secrets.key = herald_core::keyring::new_key_text("dev-ephemeral")?;
        println!(
            "herald dev: signing secrets are encrypted under a key made for this run (set secrets.key_file to keep one)"
        );
    }
    let records = config.secrets.record_writer("herald dev")?;
    let shutdown = shutdown::on_signal().context("cannot install signal handlers")?;

    // Read the endpoints before starting anything: a bad file fails fast.
    let file_endpoints = endpoints_file::load(&args.endpoints)?;
    let nats_server = find_nats_server(args.nats_server.as_deref())?;
    let temporary_store;
    let store = match &args.store_dir {
        Some(dir) => dir.clone(),
        None => {
            temporary_store = tempfile::Builder::new().prefix("herald-dev-").tempdir()?;
            temporary_store.path().to_path_buf()
        }
    };
    let mut nats = start_nats(&nats_server, args.nats_port, &store).await?;

    let result = async {
        let broker = herald_queue::connect(&config.nats.url, "herald-dev").await?;
        topology::ensure(&broker, &config.topology).await?;
        sync_endpoints(&broker, &records, &file_endpoints).await?;
        println!(
            "herald dev: NATS on {} (store and nats-server.log in {})",
            config.nats.url,
            store.display()
        );
        println!("herald dev: API on http://{}", config.api.listen);
        let allowed: Vec<String> = config
            .webhooks
            .ssrf
            .allow
            .iter()
            .map(|c| c.to_string())
            .collect();
        println!(
            "herald dev: webhooks may reach {} (webhooks.ssrf.allow)",
            allowed.join(", ")
        );
        for endpoint in &file_endpoints {
            let c = &endpoint.config;
            println!(
                "herald dev: user {} -> {} (email {})",
                c.user,
                c.url,
                c.email.as_deref().unwrap_or("none")
            );
            if endpoint.generated_secret {
                println!(
                    "herald dev:   generated signing secret {}",
                    c.secrets[0].expose()
                );
            }
        }
        let listener = tokio::net::TcpListener::bind(&config.api.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.api.listen))?;
        roles::run_with(
            config,
            Roles::all(),
            broker,
            Some(listener),
            herald_worker::handlers::HandlerRegistry::with_builtins,
            shutdown,
        )
        .await
    }
    .await;

    stop_nats(&mut nats).await;
    telemetry.shutdown().await;
    result
}

/// The owner of records written from an endpoints file (`herald dev`,
/// `herald endpoints`).
pub(crate) const FILE_OWNER: &str = "herald-file";

/// Endpoint records written (or removed) at once by [`sync_endpoints`]:
/// each write is a read and a compare-and-set, a round trip apiece, so one
/// at a time would leave the server idle between them.
const WRITES_IN_FLIGHT: usize = 128;

/// Makes the bucket hold exactly the file's endpoints, among the records
/// `herald dev` owns: another writer's records (an operator sharing the
/// NATS server) are neither removed nor replaced. An endpoint whose secret
/// changed since the last sync keeps signing with the old one too for the
/// rotation overlap.
pub(crate) async fn sync_endpoints(
    broker: &herald_queue::Broker,
    records: &endpoints::RecordWriter,
    file: &[endpoints_file::FileEndpoint],
) -> anyhow::Result<()> {
    use futures::{StreamExt, TryStreamExt, stream};

    let wanted: HashSet<String> = file
        .iter()
        .map(|e| herald_core::names::endpoint_key(&e.config.user, &e.config.id))
        .collect();
    let unwanted = endpoints::keys(broker)
        .await?
        .into_iter()
        .filter(|key| !wanted.contains(key))
        .filter_map(|key| herald_core::names::parse_endpoint_key(&key));
    stream::iter(unwanted)
        .map(|(user, id)| async move {
            endpoints::remove_owned(broker, &records.keyring, &user, &id, FILE_OWNER).await
        })
        .buffer_unordered(WRITES_IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    stream::iter(file)
        .map(|endpoint| async move {
            let mut config = endpoint.config.clone();
            config.owner = Some(FILE_OWNER.to_string());
            if let endpoints::Put::OwnedElsewhere { owner } =
                endpoints::put(broker, records, &config).await?
            {
                bail!(
                    "endpoint {} is already in herald-endpoints, owned by {owner}; \
                     rename it in the endpoints file",
                    herald_core::names::endpoint_key(&config.user, &config.id)
                );
            }
            Ok(())
        })
        .buffer_unordered(WRITES_IN_FLIGHT)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

fn find_nats_server(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        bail!("nats-server not found at {}", path.display());
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join("nats-server"))
                .collect()
        })
        .unwrap_or_default();
    let tools = std::env::var_os("HERALD_TOOLS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/herald-tools"))
        });
    if let Some(tools) = tools {
        candidates.push(tools.join("bin/nats-server"));
    }
    candidates.into_iter().find(|p| p.is_file()).context(
        "nats-server not found in PATH or in the tools cache: run `make tools` (scripts/install-tools.sh) or pass --nats-server",
    )
}

/// Starts nats-server with its log in `<store>/nats-server.log` (its
/// start-up banner would bury Herald's own output); on a failed start the
/// error carries the log's end.
async fn start_nats(binary: &Path, port: u16, store: &Path) -> anyhow::Result<Child> {
    std::fs::create_dir_all(store)
        .with_context(|| format!("cannot create the store {}", store.display()))?;
    let log_path = store.join("nats-server.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;
    // A name of its own, so the readiness check below knows it reached this
    // server and not something else already listening on the port.
    let server_name = format!("herald-dev-{}", std::process::id());
    // Through `child-of`: even if herald dev is killed, the server goes
    // with it and frees the port.
    let mut child = crate::child::command(binary)?
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store)
        .args(["--server_name", &server_name])
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let log_tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "nats-server exited at start ({status}); is port {port} in use? Its log:\n{}",
                log_tail()
            );
        }
        if let Some(name) = server_name_at(port).await {
            if name == server_name {
                return Ok(child);
            }
            bail!(
                "port {port} is already taken by another NATS server ({name}): choose another with --nats-port"
            );
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "nats-server did not accept connections on port {port} within 10s. Its log:\n{}",
                log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `server_name` a NATS server on `port` announces in the INFO line it
/// sends on connect; None if nothing answers like a NATS server.
async fn server_name_at(port: u16) -> Option<String> {
    use tokio::io::AsyncBufReadExt;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut line = String::new();
    let mut reader = tokio::io::BufReader::new(stream);
    tokio::time::timeout(Duration::from_secs(1), reader.read_line(&mut line))
        .await
        .ok()?
        .ok()?;
    let info: serde_json::Value = serde_json::from_str(line.strip_prefix("INFO ")?.trim()).ok()?;
    info["server_name"].as_str().map(String::from)
}

async fn stop_nats(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
