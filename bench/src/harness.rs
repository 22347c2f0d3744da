//! The harness every scenario shares: the server under test (spawned or given),
//! user registration at scale, connections, and latency summaries.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use switchboard_client::pb::server_frame::Body as Out;
use switchboard_client::{ConnectOptions, Connection, Credentials, Endpoint};
use tokio::sync::Semaphore;

use crate::server::{ServerProc, locate};

/// Where the server under test comes from.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Use a running server at this address instead of starting one.
    #[arg(long, requires = "data_dir")]
    pub server: Option<String>,
    /// With --server: its data dir (registration reads the development
    /// codes from it).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Path of the `switchboard` binary to start (default: next to this one).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Pin the started server to these CPUs (taskset list, e.g. "0").
    #[arg(long)]
    pub server_cpus: Option<String>,
    /// Pin this load generator to these CPUs (e.g. "1").
    #[arg(long)]
    pub load_cpus: Option<String>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Also write a latency-distribution plot (SVG) to this file, for the
    /// scenarios that measure latencies (steady, ramp, baseline, herd).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// A server we started (with its temp data dir) or one we were given.
pub struct Sut {
    pub tcp: String,
    pub data_dir: PathBuf,
    proc: Option<ServerProc>,
    _dir: Option<tempfile::TempDir>,
}

impl Sut {
    /// Starts (or attaches to) the server under test and applies CPU pinning.
    pub async fn start(t: &Target, extra_args: &[String]) -> Result<Self> {
        pin_load(t)?;
        if let Some(addr) = &t.server {
            return Ok(Self {
                tcp: addr.clone(),
                data_dir: t.data_dir.clone().unwrap_or_default(),
                proc: None,
                _dir: None,
            });
        }
        let bin = locate(t.server_bin.clone())?;
        let dir = tempfile::tempdir().context("temp dir")?;
        let data_dir = dir.path().join("data");
        let proc = ServerProc::start(&bin, &data_dir, extra_args).await?;
        if let (Some(cpus), Some(pid)) = (&t.server_cpus, proc.pid()) {
            pin(pid, cpus)?;
        }
        Ok(Self {
            tcp: proc.tcp.clone(),
            data_dir,
            proc: Some(proc),
            _dir: Some(dir),
        })
    }

    /// The server's resident memory, if we started it.
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.proc.as_ref()?.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    }

    /// Stops the server if we started it.
    pub async fn stop(self) -> Result<()> {
        if let Some(p) = self.proc {
            p.stop().await?;
        }
        Ok(())
    }
}

/// Pins this load generator to `--load-cpus`, if given.
///
/// # Errors
/// If `taskset` fails.
pub fn pin_load(t: &Target) -> Result<()> {
    match &t.load_cpus {
        Some(cpus) => pin(std::process::id(), cpus),
        None => Ok(()),
    }
}

/// Starts the baseline relay (`switchboard-bench relay`) as a child
/// process, pinned to `--server-cpus` like the server.
///
/// # Errors
/// If it cannot be started or pinned.
pub async fn start_relay(t: &Target) -> Result<ServerProc> {
    let me = std::env::current_exe().context("cannot find this executable")?;
    let mut cmd = tokio::process::Command::new(me);
    cmd.args(["relay", "--listen", "127.0.0.1:0"]);
    let relay = ServerProc::spawn(cmd, "the baseline relay").await?;
    if let (Some(cpus), Some(pid)) = (&t.server_cpus, relay.pid()) {
        pin(pid, cpus)?;
    }
    Ok(relay)
}

/// A progress bar on stderr (drawn only when stderr is a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) =
        ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {elapsed} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_owned());
    bar
}

fn pin(pid: u32, cpus: &str) -> Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .context("taskset (util-linux) is needed for CPU pinning")?;
    anyhow::ensure!(status.success(), "taskset failed for pid {pid}");
    Ok(())
}

/// Kernel TCP memory in use, in bytes (from /proc/net/sockstat).
pub fn tcp_mem_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return words.next()?.parse::<u64>().ok().map(|pages| pages * 4096);
        }
    }
    None
}

pub fn options(agent: &str) -> ConnectOptions {
    ConnectOptions {
        user_agent: format!("switchboard-bench/{agent}"),
        connect_timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    }
}

/// Registers `n` users, `concurrency` at a time, with phone numbers made
/// from `prefix` (7 digits) and the index.
pub async fn register_users(
    tcp: &str,
    data_dir: &Path,
    prefix: u32,
    n: usize,
    concurrency: usize,
) -> Result<Vec<Credentials>> {
    let endpoint: Endpoint = tcp.parse().context("endpoint")?;
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let endpoint = endpoint.clone();
        let gate = gate.clone();
        let data_dir = data_dir.to_path_buf();
        let phone = format!("+1{prefix:07}{i:06}");
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let mut conn = Connection::connect(&endpoint, &options("register")).await?;
            conn.request_code(&phone).await?;
            let file = data_dir.join("dev-codes").join(&phone);
            let started = Instant::now();
            let code = loop {
                if let Ok(c) = tokio::fs::read_to_string(&file).await {
                    break c.trim().to_owned();
                }
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(30),
                    "no code for {phone}"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            Ok::<_, anyhow::Error>(conn.verify_code(&phone, &code).await?)
        }));
    }
    let bar = progress(n as u64, "registering");
    let mut users = Vec::with_capacity(n);
    for t in tasks {
        users.push(t.await??);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(users)
}

/// Connects and authenticates, then acks everything queued until
/// `UpToDate`.
pub async fn connect_drained(tcp: &str, creds: &Credentials, agent: &str) -> Result<Connection> {
    let endpoint: Endpoint = tcp.parse().context("endpoint")?;
    let mut conn = Connection::connect(&endpoint, &options(agent)).await?;
    conn.auth(creds).await?;
    loop {
        let f = conn.next_frame().await?;
        match f.body {
            Some(Out::Deliver(d)) => {
                let seqs: Vec<u64> = d.entries.iter().map(|e| e.seq).collect();
                conn.ack(&seqs).await?;
            }
            Some(Out::UpToDate(_)) => return Ok(conn),
            _ => {}
        }
    }
}

/// Latency figures in milliseconds.
#[derive(Debug, Serialize, Default, Clone)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// A histogram of microseconds, 1 µs to 60 s, 3 significant digits.
pub fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 60_000_000, 3).context("histogram bounds")
}

pub fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Latency {
        count: h.len(),
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
    }
}

pub fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string(v)?);
    Ok(())
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50={:.2}ms p90={:.2}ms p99={:.2}ms p99.9={:.2}ms max={:.2}ms",
            self.count, self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}
