//! `herald-bench load ...` and `herald-bench jetstream-bound ...`: each
//! prints a short summary on stderr and one JSON line on stdout.

use std::{
    net::SocketAddr,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use herald_bench::{
    jetstream_bound::{self, Bound},
    load::Load,
    receiver::Receiver,
    run::{Waiting, run},
    tally::ms,
};

#[derive(Parser)]
#[command(about = "Herald's benchmark tools (make bench)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// POST tasks and receive their webhooks; count every fault.
    Load(LoadArgs),
    /// The bare two-hop JetStream pipeline, Herald's durability.
    JetstreamBound(BoundArgs),
}

#[derive(clap::Args)]
struct LoadArgs {
    /// The task endpoint; `{user}` and `{type}` are filled in.
    #[arg(
        long,
        default_value = "http://127.0.0.1:8080/users/{user}/tasks/{type}"
    )]
    url: String,
    #[arg(short = 'n', long, default_value_t = 1000)]
    tasks: usize,
    /// Closed loop: POSTs in flight. Open loop: the most outstanding.
    #[arg(short, long, default_value_t = 50)]
    concurrency: usize,
    /// Open loop at this many tasks/s (default: closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// How many users the tasks are spread over, round-robin.
    #[arg(short, long, default_value_t = 6)]
    users: usize,
    #[arg(long, default_value_t = 1)]
    first_user: usize,
    #[arg(long = "type", default_value = "echo")]
    task_type: String,
    /// Where the webhook receiver listens (the endpoints' URLs point here).
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
    /// Give up on missing webhooks this long after the start.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    #[arg(long, default_value_t = 30)]
    request_timeout_s: u64,
    /// Keep listening this long after the last webhook, for duplicates.
    #[arg(long, default_value_t = 1000)]
    grace_ms: u64,
}

#[derive(clap::Args)]
struct BoundArgs {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    url: String,
    #[arg(short = 'n', long, default_value_t = 100_000)]
    messages: u64,
    /// Producer publishes with their ack outstanding.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Stage: messages being passed on from A to B at once.
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    #[arg(long, default_value_t = 256)]
    payload_bytes: usize,
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Load(args) => load(args).await,
        Command::JetstreamBound(args) => bound(args).await,
    }
}

async fn load(args: LoadArgs) -> ExitCode {
    let receiver = match Receiver::bind(args.listen).await {
        Ok(receiver) => receiver,
        Err(e) => {
            eprintln!("herald-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.timeout_s);
    let load = Load {
        url: args.url,
        tasks: args.tasks,
        concurrency: args.concurrency,
        rate: args.rate,
        users: args.users,
        first_user: args.first_user,
        task_type: args.task_type,
        request_timeout: Duration::from_secs(args.request_timeout_s),
        send_deadline: deadline,
    };
    let waiting = Waiting {
        deadline,
        grace: Duration::from_millis(args.grace_ms),
    };
    let tally = run(&load, &receiver, waiting).await;
    receiver.stop().await;
    eprintln!(
        "herald-bench load: {} sent, {} accepted, rejected {:?}, {} without answer; \
         {} delivered, {} missing, {} duplicates, {} strays",
        tally.sent,
        tally.accepted,
        tally.rejected,
        tally.failed_requests,
        tally.delivered,
        tally.missing,
        tally.duplicates,
        tally.strays
    );
    eprintln!(
        "  {:.0} accepted/s, {:.0} deliveries/s; accept -> webhook p50/p99/max {}",
        tally.ingest_per_s,
        tally.deliveries_per_s,
        ms(&tally.accept_to_webhook_ms)
    );
    let mut json = serde_json::to_value(&tally).expect("a tally always serializes");
    json["clean"] = tally.clean().into();
    println!("{json}");
    ExitCode::SUCCESS
}

async fn bound(args: BoundArgs) -> ExitCode {
    let bound = Bound {
        url: args.url,
        messages: args.messages,
        window: args.window,
        inflight: args.inflight,
        payload_bytes: args.payload_bytes,
        timeout: Duration::from_secs(args.timeout_s),
    };
    match jetstream_bound::run(&bound).await {
        Ok(result) => {
            eprintln!(
                "herald-bench jetstream-bound: {} messages in {:.2} s: {:.0} msgs/s, {} missing, {} duplicates",
                result.messages,
                result.seconds,
                result.msgs_per_s,
                result.missing,
                result.duplicates
            );
            println!(
                "{}",
                serde_json::to_value(&result).expect("a result always serializes")
            );
            if result.missing == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
