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

use crate::server::{LOAD_GENERATOR_LIMITS, ServerProc, locate};

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
        Self::start_with_config(t, extra_args, LOAD_GENERATOR_LIMITS).await
    }

    /// As [`Sut::start`], with the server's settings in `config_toml`
    /// instead of the load generator's lifted limits.
    pub async fn start_with_config(
        t: &Target,
        extra_args: &[String],
        config_toml: &str,
    ) -> Result<Self> {
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
        let proc = ServerProc::start_with_config(&bin, &data_dir, extra_args, config_toml).await?;
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
        rss_of(self.pid()?)
    }

    /// The server's process id, if we started it.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref()?.pid()
    }

    /// Stops the server if we started it.
    pub async fn stop(self) -> Result<()> {
        if let Some(p) = self.proc {
            p.stop().await?;
        }
        Ok(())
    }
}

/// The resident memory of process `pid`, from /proc.
pub fn rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
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

/// Starts the baseline relay (`switchboard-bench relay`, with `--receipts`
/// if asked) as a child process, pinned to `--server-cpus` like the server.
///
/// # Errors
/// If it cannot be started or pinned.
pub async fn start_relay(t: &Target, receipts: bool) -> Result<ServerProc> {
    let me = std::env::current_exe().context("cannot find this executable")?;
    let mut cmd = tokio::process::Command::new(me);
    cmd.args(["relay", "--listen", "127.0.0.1:0"]);
    if receipts {
        cmd.arg("--receipts");
    }
    let relay = ServerProc::spawn(cmd, "the baseline relay").await?;
    if let (Some(cpus), Some(pid)) = (&t.server_cpus, relay.pid()) {
        pin(pid, cpus)?;
    }
    Ok(relay)
}

/// CPU time (user + system, all threads) a process has used so far, in
/// seconds; `None` if it cannot be read (not Linux, or the process is gone).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may
    // hold spaces: state is the first, utime the 12th and stime the 13th.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// The CPU the target (when we started it) and this load generator use
/// over a stretch of time, in cores (1.0 is one core busy throughout).
pub struct CpuMeter {
    target: Option<(u32, f64)>,
    load: Option<f64>,
    since: Instant,
}

/// What a [`CpuMeter`] measured.
#[derive(Serialize, Clone, Copy, Default)]
pub struct CpuUse {
    /// Cores the server (or relay) kept busy; none if it was not started
    /// by this tool.
    pub target_cores: Option<f64>,
    /// Cores this load generator kept busy.
    pub load_cores: Option<f64>,
    /// Cores this load generator may use (its CPU affinity).
    pub load_cores_available: usize,
}

impl CpuMeter {
    /// Starts measuring; `target` is the target's process id.
    pub fn start(target: Option<u32>) -> Self {
        Self {
            target: target.and_then(|pid| Some((pid, cpu_seconds(pid)?))),
            load: cpu_seconds(std::process::id()),
            since: Instant::now(),
        }
    }

    /// The cores used since [`CpuMeter::start`].
    pub fn finish(&self) -> CpuUse {
        let wall = self.since.elapsed().as_secs_f64().max(1e-9);
        CpuUse {
            target_cores: self
                .target
                .and_then(|(pid, t0)| Some((cpu_seconds(pid)? - t0) / wall)),
            load_cores: self
                .load
                .and_then(|t0| Some((cpu_seconds(std::process::id())? - t0) / wall)),
            load_cores_available: std::thread::available_parallelism()
                .map_or(1, std::num::NonZero::get),
        }
    }
}

impl CpuUse {
    /// Microseconds of CPU per message at `per_sec` messages a second, for
    /// the target and the load generator: the figure to compare builds by
    /// (cores alone move with the rate a step ran at).
    pub fn per_message_us(&self, per_sec: f64) -> String {
        let us = |c: Option<f64>| {
            c.filter(|_| per_sec > 0.0)
                .map_or_else(|| "n/a".to_owned(), |c| format!("{:.1}", c * 1e6 / per_sec))
        };
        format!(
            "CPU per message (µs): target {}, load generator {}",
            us(self.target_cores),
            us(self.load_cores)
        )
    }

    /// True if the load generator was (nearly) out of CPU: then a step
    /// measures the generator as much as the target.
    pub fn load_saturated(&self) -> bool {
        self.load_cores
            .is_some_and(|c| c >= 0.9 * self.load_cores_available as f64)
    }
}

impl std::fmt::Display for CpuUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cores = |c: Option<f64>| c.map_or_else(|| "n/a".to_owned(), |c| format!("{c:.2}"));
        write!(
            f,
            "CPU (cores): target {}, load generator {} of {}",
            cores(self.target_cores),
            cores(self.load_cores),
            self.load_cores_available
        )?;
        if self.load_saturated() {
            write!(
                f,
                " (the load generator was saturated: this step measured it as much as the target)"
            )?;
        }
        Ok(())
    }
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

/// Times `taskset` is tried: it lists the process's threads, then pins
/// each, and fails if one exits in between (a tokio blocking-pool thread
/// retiring); the next try pins the rest.
const PIN_ATTEMPTS: usize = 5;

fn pin(pid: u32, cpus: &str) -> Result<()> {
    for _ in 0..PIN_ATTEMPTS {
        let status = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", cpus, &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .context("taskset (util-linux) is needed for CPU pinning")?;
        if status.success() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    anyhow::bail!("taskset failed {PIN_ATTEMPTS} times for pid {pid}")
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
    let mut options = ConnectOptions::default();
    options.user_agent = format!("switchboard-bench/{agent}");
    options.connect_timeout = Duration::from_secs(30);
    options
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
    connect_drained_with(tcp, creds, &options(agent)).await
}

/// [`connect_drained`] with `options`.
pub async fn connect_drained_with(
    tcp: &str,
    creds: &Credentials,
    options: &ConnectOptions,
) -> Result<Connection> {
    let endpoint: Endpoint = tcp.parse().context("endpoint")?;
    let mut conn = Connection::connect(&endpoint, options).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// This process's CPU time from the kernel's clock, not from /proc.
    fn process_cpu_seconds() -> f64 {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
        t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
    }

    #[test]
    fn cpu_seconds_counts_this_process_working() {
        let me = std::process::id();
        // Spin until the process has used 300 ms of CPU by the kernel's
        // clock (on a busy machine that takes longer than 300 ms), and
        // compare: /proc counts the same, in clock ticks (10 ms on Linux).
        let reference = process_cpu_seconds();
        let before = cpu_seconds(me).expect("own /proc stat");
        let mut x = 0u64;
        while process_cpu_seconds() - reference < 0.3 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = cpu_seconds(me).expect("own /proc stat");
        let used = process_cpu_seconds() - reference;
        assert!(
            (after - before - used).abs() <= 0.05,
            "/proc: {before} -> {after}, the kernel's clock: {used} s"
        );
        assert!(cpu_seconds(u32::MAX).is_none());
    }

    #[test]
    fn a_saturated_load_generator_is_called_out() {
        let busy = CpuUse {
            target_cores: Some(0.8),
            load_cores: Some(0.95),
            load_cores_available: 1,
        };
        assert!(busy.load_saturated());
        let line = busy.to_string();
        assert!(line.contains("target 0.80"), "{line}");
        assert!(line.contains("saturated"), "{line}");
        let calm = CpuUse {
            load_cores: Some(0.95),
            load_cores_available: 2,
            ..busy
        };
        assert!(!calm.load_saturated());
        assert!(!calm.to_string().contains("saturated"));
        assert!(CpuUse::default().to_string().contains("target n/a"));
    }

    #[test]
    fn cpu_per_message_is_cores_over_the_rate() {
        let used = CpuUse {
            target_cores: Some(0.72),
            load_cores: Some(0.6),
            load_cores_available: 1,
        };
        let line = used.per_message_us(10_000.0);
        assert!(line.contains("target 72.0"), "{line}");
        assert!(line.contains("load generator 60.0"), "{line}");
        let none = CpuUse::default().per_message_us(10_000.0);
        assert!(none.contains("target n/a"), "{none}");
        assert!(used.per_message_us(0.0).contains("target n/a"));
    }
}
