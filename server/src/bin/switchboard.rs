//! `switchboard`: the server binary. Parses flags, sets up logging, binds,
//! and hands over to `switchboard_server::run`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Arg, ArgAction, ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use switchboard_server::config::{Source, settings};
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
    /// then environment variables (SWITCHBOARD_<SETTING>), then flags.
    Serve(ServeArgs),
    /// Print the effective configuration as TOML (a starting config file).
    Config(ServeArgs),
    /// Cluster mode: apply the PostgreSQL schema migrations this build
    /// knows to `postgres_url` (a node also does it at start), and print the
    /// schema version.
    Migrate(ServeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file; keys are the long flag names with '_' for '-'.
    #[arg(long, env = "SWITCHBOARD_CONFIG")]
    config: Option<PathBuf>,
}

/// Adds one flag per setting, derived from `Config`'s keys, so a new field
/// is a flag (and an env variable) with no edit here.
fn with_setting_flags(cmd: clap::Command) -> clap::Command {
    settings().into_iter().fold(cmd, |cmd, s| {
        cmd.arg(
            Arg::new(s.key.clone())
                .long(s.flag)
                .value_name("VALUE")
                // A value may start with '-' (a header, a path).
                .allow_hyphen_values(true)
                .action(ArgAction::Set)
                .help(format!(
                    "{} [env: {}] [default: {}]",
                    s.help, s.env, s.default
                )),
        )
    })
}

/// The effective configuration: defaults, then the config file, then the
/// `SWITCHBOARD_*` environment variables, then flags.
fn effective_config(args: &ServeArgs, matches: &ArgMatches) -> anyhow::Result<Config> {
    let base = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let all = settings();
    let mut env = Vec::new();
    for s in &all {
        match std::env::var(&s.env) {
            Ok(v) => env.push((s.key.as_str(), v)),
            Err(std::env::VarError::NotPresent) => {}
            Err(std::env::VarError::NotUnicode(_)) => {
                anyhow::bail!("invalid setting {} (env {}): not valid UTF-8", s.key, s.env)
            }
        }
    }
    let flags: Vec<(&str, &String)> = all
        .iter()
        .filter_map(|s| {
            matches
                .get_one::<String>(&s.key)
                .map(|v| (s.key.as_str(), v))
        })
        .collect();
    let c = base.with_overrides(
        env.iter()
            .map(|(k, v)| (*k, v.as_str(), Source::Env))
            .chain(flags.iter().map(|(k, v)| (*k, v.as_str(), Source::Flag))),
    )?;
    c.validate()?;
    Ok(c)
}

/// Without `RUST_LOG`: the server's info lines, and only warnings from the
/// storage engine (it says "Finished ingestion writer" at every log
/// checkpoint).
const DEFAULT_LOG_FILTER: &str = "info,lsm_tree=warn,fjall=warn";

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    // Colour only for a person at a terminal: escape codes in a log file
    // or a journal are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
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

/// `switchboard migrate`: brings `postgres_url`'s schema to this build's.
async fn migrate(config: &Config) -> anyhow::Result<()> {
    use switchboard_server::cluster::schema;
    if config.postgres_url.is_empty() {
        anyhow::bail!(
            "postgres_url is not set (flag --postgres-url, env SWITCHBOARD_POSTGRES_URL)"
        );
    }
    let mut client = schema::connect(&config.postgres_url)
        .await
        .context("cannot connect to postgres_url")?;
    let done = schema::migrate(&mut client).await?;
    println!(
        "schema at version {} (was {}; this build knows {})",
        done.to,
        done.from,
        schema::latest()
    );
    Ok(())
}

/// Cluster mode (both engines set): opens the cluster node and listens at
/// once. Until the node holds every partition it forwards its clients'
/// requests to the node that does (over a node link); once it holds them
/// it serves from the cluster store while keeping its lease, and takes the
/// other nodes' links. A node taken over by another (fenced) stops with an
/// error; a clean stop hands the partitions back at once.
async fn serve_cluster(
    config: Config,
    cluster: switchboard_server::cluster::ClusterSettings,
) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use switchboard_server::Backend;
    use switchboard_server::cluster::node::Node;
    use switchboard_server::router::Forwarder;

    let tcp = switchboard_server::listen(config.tcp_listen)
        .with_context(|| format!("cannot listen on {} (tcp_listen)", config.tcp_listen))?;
    let http = switchboard_server::listen(config.http_listen)
        .with_context(|| format!("cannot listen on {} (http_listen)", config.http_listen))?;
    let links = switchboard_server::listen(config.cluster_listen).with_context(|| {
        format!(
            "cannot listen on {} (cluster_listen)",
            config.cluster_listen
        )
    })?;
    let link_addr = links.local_addr()?;
    let open_config = config.clone();
    let node = Arc::new(blocking(move || Node::open(&cluster, &open_config, link_addr)).await??);

    // Forwarding until this node serves, then serving in the same stack:
    // its clients stay connected through the takeover.
    // The recorder first: the forwarder takes its metric handles at once.
    switchboard_server::telemetry::install();
    // A connection whose link ends waits this long for the next serving
    // node: the dead node's lease and a standby's step, with room.
    let grace = std::time::Duration::from_millis(2 * config.cluster_lease_ms + 1_000);
    let forwarder = Forwarder::new(switchboard_server::load_server_key(&config)?, grace);
    let (target_tx, target_rx) = tokio::sync::watch::channel(None);
    let link_cancel = tokio_util::sync::CancellationToken::new();
    let maintain = tokio::spawn(forwarder.clone().maintain(target_rx, link_cancel.clone()));
    let (serving_tx, serving_rx) = tokio::sync::oneshot::channel();
    let (fenced_tx, fenced_rx) = tokio::sync::oneshot::channel::<()>();
    let waiting = node.clone();
    let watching = forwarder.clone();
    let waiter = std::thread::Builder::new()
        .name("cluster-standby".into())
        .spawn(move || {
            let serving = waiting.wait_until_serving(
                |addr| {
                    target_tx.send_if_modified(|t| std::mem::replace(t, addr) != addr);
                },
                || watching.refused(),
            );
            let lease = serving
                .then(|| {
                    waiting.keep_lease(move || {
                        let _ = fenced_tx.send(());
                    })
                })
                .transpose();
            // Not taken (the node is stopping): the lease thread is joined
            // here, once the node has stopped waiting.
            if let Err(Ok(Some(lease))) = serving_tx.send(lease) {
                let _ = lease.join();
            }
        })
        .context("cannot start a thread")?;
    // A refused link wakes the standby: it takes over at once.
    let standby = waiter.thread().clone();
    forwarder.on_refused(move || standby.unpark());
    let lease = Arc::new(std::sync::Mutex::new(None));
    let lease_slot = lease.clone();
    let promote = Box::pin(async move {
        match serving_rx.await {
            Ok(Ok(Some(lease))) => {
                *lease_slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Ok(lease));
                true
            }
            Ok(Err(e)) => {
                // Its lease then expires, and another node takes over.
                tracing::error!(error = %e, "cannot start the lease thread: this node stays a forwarding node");
                *lease_slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Err(e));
                false
            }
            _ => false,
        }
    });
    let fenced = Arc::new(AtomicBool::new(false));
    let fenced_flag = fenced.clone();
    let stop = async move {
        tokio::select! {
            () = shutdown_signal() => {}
            Ok(()) = fenced_rx => fenced_flag.store(true, Ordering::Relaxed),
        }
    };
    let data_dir = config.data_dir.clone();
    let result = switchboard_server::run_stack(
        config.clone(),
        Backend::Cluster {
            forwarder,
            store: node.store(),
            links,
            promote,
            on_serving: Box::new(ready_line(&config)),
        },
        tcp,
        http,
        stop,
        move |ready: &switchboard_server::Ready| {
            say(&format!(
                "switchboard forwarding tcp={} http={} data_dir={} server_key={} link={link_addr}",
                ready.tcp_addr,
                ready.http_addr,
                data_dir.display(),
                hex::encode(&ready.server_public_key)
            ));
        },
    )
    .await;
    link_cancel.cancel();
    let _ = maintain.await;
    // The lease thread ends first: a step of it must not claim again what
    // resigning gives back.
    node.stop_waiting();
    waiter.thread().unpark();
    let lease = lease
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let lease = match lease {
        Some(Ok(lease)) => Some(lease),
        Some(Err(e)) => {
            let _ = blocking(move || waiter.join()).await;
            return Err(e).context("cannot start the lease thread");
        }
        None => None,
    };
    blocking(move || {
        if let Some(lease) = lease {
            lease.thread().unpark();
            let _ = lease.join();
        }
        let _ = waiter.join();
    })
    .await?;
    let resigning = node.clone();
    blocking(move || resigning.resign()).await?;
    if fenced.load(Ordering::Relaxed) {
        anyhow::bail!("stopped: another node took this node's partitions over (fenced)");
    }
    Ok(result?)
}

/// The line printed on stdout when the server is ready (logs go to stderr).
fn ready_line(config: &Config) -> impl FnOnce(&switchboard_server::Ready) + Send + use<> {
    let data_dir = config.data_dir.clone();
    move |ready: &switchboard_server::Ready| {
        say(&format!(
            "switchboard ready tcp={} http={} data_dir={} server_key={}",
            ready.tcp_addr,
            ready.http_addr,
            data_dir.display(),
            hex::encode(&ready.server_public_key)
        ));
    }
}

/// One line on stdout. A closed stdout (whoever started the node stopped
/// reading after its first line) must not stop a node that takes over
/// later, so a failed write is ignored.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Runs `f` on a thread of its own (the cluster engines' blocking calls
/// must not run on the async runtime).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cluster-open".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .context("cannot start a thread")?;
    rx.await.context("the thread ended without an answer")
}

async fn serve(config: Config) -> anyhow::Result<()> {
    use switchboard_server::cluster::{ClusterSettings, schema};
    if let Some(cluster) = ClusterSettings::from_config(&config)? {
        let mut client = schema::connect(&cluster.postgres_url)
            .await
            .context("cannot connect to postgres_url")?;
        schema::migrate(&mut client).await?;
        return serve_cluster(config, cluster).await;
    }
    serve_embedded(config, shutdown_signal()).await
}

/// Listens and serves from the embedded store until `stop` resolves.
async fn serve_embedded(
    config: Config,
    stop: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let tcp = switchboard_server::listen(config.tcp_listen)
        .with_context(|| format!("cannot listen on {} (tcp_listen)", config.tcp_listen))?;
    let http = switchboard_server::listen(config.http_listen)
        .with_context(|| format!("cannot listen on {} (http_listen)", config.http_listen))?;
    let on_ready = ready_line(&config);
    switchboard_server::run(config, tcp, http, stop, on_ready).await?;
    Ok(())
}

fn main() -> ExitCode {
    let matches = Cli::command()
        .mut_subcommand("serve", with_setting_flags)
        .mut_subcommand("config", with_setting_flags)
        .mut_subcommand("migrate", with_setting_flags)
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let sub = matches
        .subcommand()
        .map_or_else(ArgMatches::default, |(_, m)| m.clone());
    let result = match cli.command {
        Command::Config(args) => effective_config(&args, &sub).and_then(|c| {
            print!("{}", toml::to_string(&c)?);
            Ok(())
        }),
        Command::Migrate(args) => effective_config(&args, &sub).and_then(|config| {
            init_logging(config.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the async runtime")
                .and_then(|rt| rt.block_on(migrate(&config)))
        }),
        Command::Serve(args) => match effective_config(&args, &sub) {
            Ok(config) => {
                init_logging(config.log_format);
                if let Err(e) = switchboard_server::os::disable_transparent_huge_pages() {
                    tracing::warn!(error = %e, "cannot turn transparent huge pages off");
                }
                switchboard_server::runtime()
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
