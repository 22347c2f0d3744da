//! `switchboard`: the server binary. Parses flags, sets up logging, binds,
//! and hands over to `switchboard_server::run`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use switchboard_server::{Config, LogFormat};

/// mimalloc: measurably less time in malloc/free than glibc's allocator on
/// the message path (many small, short-lived buffers), and less
/// fragmentation with many idle connections (docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Switchboard: a messaging server for chat apps.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server. With no options it uses its embedded defaults: data in
    /// ./switchboard-data, Noise/TCP on 127.0.0.1:5222, HTTP and WebSocket on
    /// 127.0.0.1:8080. Settings come from the defaults, then the config file,
    /// then environment variables, then flags.
    Serve(ServeArgs),
    /// Print the effective configuration as TOML (a starting config file).
    Config(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file; keys are the long flag names with '_' for '-'.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (database, server key, dev codes).
    #[arg(long, env = "SWITCHBOARD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Noise/TCP listen address for native clients.
    #[arg(long, env = "SWITCHBOARD_TCP_LISTEN")]
    tcp_listen: Option<SocketAddr>,
    /// HTTP listen address (WebSocket at /ws, /healthz, /readyz).
    #[arg(long, env = "SWITCHBOARD_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Router shards (0 = one per four CPU cores, at least one).
    #[arg(long, env = "SWITCHBOARD_SHARDS")]
    shards: Option<usize>,
    /// Seconds an undelivered message is kept (default 30 days).
    #[arg(long, env = "SWITCHBOARD_QUEUE_TTL_SECS")]
    queue_ttl_secs: Option<u64>,
    /// Seconds client message ids are remembered for deduplication (default 48 h).
    #[arg(long, env = "SWITCHBOARD_DEDUP_WINDOW_SECS")]
    dedup_window_secs: Option<u64>,
    /// Seconds between expiry sweeps.
    #[arg(long, env = "SWITCHBOARD_SWEEP_INTERVAL_SECS")]
    sweep_interval_secs: Option<u64>,
    /// Largest frame accepted from a client, in bytes.
    #[arg(long, env = "SWITCHBOARD_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// Milliseconds allowed for the Noise handshake.
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT_MS")]
    handshake_timeout_ms: Option<u64>,
    /// Seconds of silence after which a connection is closed.
    #[arg(long, env = "SWITCHBOARD_IDLE_TIMEOUT_SECS")]
    idle_timeout_secs: Option<u64>,
    /// Pushes buffered per connection before it is dropped as a slow reader.
    #[arg(long, env = "SWITCHBOARD_OUTBOUND_QUEUE_FRAMES")]
    outbound_queue_frames: Option<usize>,
    /// Commands buffered per shard before senders wait.
    #[arg(long, env = "SWITCHBOARD_SHARD_INBOX")]
    shard_inbox: Option<usize>,
    /// Least microseconds between two synced commits of a shard (0 = none).
    #[arg(long, env = "SWITCHBOARD_GROUP_COMMIT_INTERVAL_US")]
    group_commit_interval_us: Option<u64>,
    /// Log format.
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field.clone() { c.$field = v; } )* };
        }
        set!(
            data_dir,
            tcp_listen,
            http_listen,
            shards,
            queue_ttl_secs,
            dedup_window_secs,
            sweep_interval_secs,
            max_frame_bytes,
            handshake_timeout_ms,
            idle_timeout_secs,
            outbound_queue_frames,
            shard_inbox,
            group_commit_interval_us,
            log_format
        );
        c.validate()?;
        Ok(c)
    }
}

/// Without `RUST_LOG`: the server's info lines, and only warnings from the
/// storage engine (it says "Finished ingestion writer" at every log
/// checkpoint).
const DEFAULT_LOG_FILTER: &str = "info,lsm_tree=warn,fjall=warn";

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let tcp = switchboard_server::listen(config.tcp_listen)
        .with_context(|| format!("cannot listen on {} (tcp_listen)", config.tcp_listen))?;
    let http = switchboard_server::listen(config.http_listen)
        .with_context(|| format!("cannot listen on {} (http_listen)", config.http_listen))?;
    let data_dir = config.data_dir.clone();
    switchboard_server::run(config, tcp, http, shutdown_signal(), |ready| {
        // One machine-readable line on stdout; logs go to stderr.
        println!(
            "switchboard ready tcp={} http={} data_dir={} server_key={}",
            ready.tcp_addr,
            ready.http_addr,
            data_dir.display(),
            hex::encode(&ready.server_public_key)
        );
    })
    .await?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Config(args) => args.config().and_then(|c| {
            print!("{}", toml::to_string(&c)?);
            Ok(())
        }),
        Command::Serve(args) => match args.config() {
            Ok(config) => {
                init_logging(config.log_format);
                if let Err(e) = switchboard_server::os::disable_transparent_huge_pages() {
                    tracing::warn!(error = %e, "cannot turn transparent huge pages off");
                }
                tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .context("cannot start the async runtime")
                    .and_then(|rt| rt.block_on(serve(config)))
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
