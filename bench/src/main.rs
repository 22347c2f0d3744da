//! `switchboard-bench`: drives a real Switchboard server over the real
//! protocol: the crash-safety tester and the load scenarios (docs/BENCHMARKS.md).

mod abuse;
mod crash;
mod failover;
mod group_fanout;
mod group_keys;
mod harness;
mod link;
mod plot;
mod relay;
mod scenarios;
mod server;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Kill the server with SIGKILL at random moments while senders and
    /// receivers run, restart it, repeat; then check that every
    /// acknowledged message was delivered, none twice, in order.
    Crash(crash::Args),
    /// Open N authenticated connections and sit idle: server RSS and kernel
    /// TCP memory per connection.
    Idle(scenarios::IdleArgs),
    /// N online users send 1:1 messages to random others at an offered
    /// rate: delivered msgs/s, send→✓ and send→delivered percentiles.
    Steady(scenarios::SteadyArgs),
    /// Raise the offered rate step by step to find the knee (and the
    /// baseline relay's, for the ratio).
    Ramp(scenarios::SteadyArgs),
    /// The ramp against a trivial built-in relay (no crypto, no storage):
    /// the yardstick every throughput figure is compared with.
    Baseline(scenarios::SteadyArgs),
    /// Queue K messages for an offline device, then time its drain.
    OfflineDrain(scenarios::DrainArgs),
    /// M clients connect at once: time until all are authenticated and
    /// drained.
    Herd(scenarios::HerdArgs),
    /// A two-node cluster loses the node its N clients are on: time until
    /// all are back on the other node and drained.
    Failover(failover::FailoverArgs),
    /// One user floods another with sends, receipts, lookups and bundle
    /// fetches from many reconnecting connections while two others chat:
    /// the limits hold and the bystanders' latency stays within 2×.
    Abuse(abuse::AbuseArgs),
    /// One group of N members, all online: send→last member latency at a
    /// low rate, the sustained fan-out in member deliveries/s, data-dir
    /// bytes per delivery, and the baseline relay's fan-out for the ratio.
    GroupFanout(group_fanout::FanoutArgs),
    /// A new sender's first message to a group of N members through the
    /// SDK, sender-key distribution included, and its second message.
    GroupKeys(group_keys::KeysArgs),
    /// Run the baseline relay in the foreground (started by the scenarios
    /// as a child process; prints its address).
    #[command(hide = true)]
    Relay(relay::RelayArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Crash(args) => crash::run(args).await,
            Command::Idle(args) => scenarios::idle(args).await,
            Command::Steady(args) => scenarios::steady(args).await,
            Command::Ramp(args) => scenarios::ramp(args).await,
            Command::Baseline(args) => scenarios::baseline(args).await,
            Command::Relay(args) => relay::serve(args).await,
            Command::OfflineDrain(args) => scenarios::offline_drain(args).await,
            Command::Herd(args) => scenarios::herd(args).await,
            Command::Failover(args) => failover::failover(args).await,
            Command::Abuse(args) => abuse::abuse(args).await,
            Command::GroupFanout(args) => group_fanout::group_fanout(args).await,
            Command::GroupKeys(args) => group_keys::group_keys(args).await,
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("switchboard-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
