//! The server under test as a child process: started from the `switchboard`
//! binary with a data dir of ours, on ephemeral ports.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long a server may take to print its ready line. Generous: a debug
/// build replaying its journal on a machine busy with other work has taken
/// over 30 s; the crash tester reports the slowest restart separately.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The server's settings file, written into its data dir.
const CONFIG_FILE: &str = "bench-config.toml";

/// The load generator is one trusted client sending for thousands of users
/// from one address at rates far above a person's: the per-user, per-pair
/// and per-address request limits are lifted so they measure the server,
/// not its abuse limits. Queue quotas stay as configured by default
/// (docs/BENCHMARKS.md; the abuse scenario measures the limits).
pub const LOAD_GENERATOR_LIMITS: &str = "\
sends_per_user_per_min = 1000000000
sends_per_pair_per_min = 1000000000
read_receipts_per_user_per_min = 1000000000
lookups_per_user_per_hour = 1000000000
bundle_fetches_per_user_per_hour = 1000000000
code_requests_per_ip_per_hour = 1000000000
connections_per_ip_per_min = 1000000000
";

/// Where the `switchboard` binary is: the given path, else next to this
/// executable (both are built into the same target directory).
pub fn locate(explicit: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let me = std::env::current_exe().context("cannot find this executable")?;
    let dir = me.parent().context("executable has no directory")?;
    // Tests run from target/<profile>/deps; binaries live one level up.
    for candidate in [dir.join("switchboard"), dir.join("../switchboard")] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "no `switchboard` binary next to {}; build it (cargo build --release --bin switchboard) or pass --server-bin",
        me.display()
    )
}

/// `switchboard serve` on `data_dir` and free loopback ports with extra
/// `args` and the settings in `config_toml` (written into the data dir).
fn serve_command(
    bin: &Path,
    data_dir: &Path,
    args: &[String],
    config_toml: &str,
) -> Result<Command> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    let config = data_dir.join(CONFIG_FILE);
    std::fs::write(&config, config_toml)
        .with_context(|| format!("cannot write {}", config.display()))?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "serve",
        "--tcp-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(data_dir)
    .arg("--config")
    .arg(&config)
    .args(args)
    .env(
        "RUST_LOG",
        std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "error".into()),
    );
    Ok(cmd)
}

/// A running server process.
pub struct ServerProc {
    child: Child,
    /// Its Noise/TCP address.
    pub tcp: String,
}

impl ServerProc {
    /// Starts the server on `data_dir` with extra `args`, the request limits
    /// lifted for the load generator ([`LOAD_GENERATOR_LIMITS`]).
    ///
    /// # Errors
    /// If it cannot be spawned or never becomes ready.
    pub async fn start(bin: &Path, data_dir: &Path, args: &[String]) -> Result<Self> {
        Self::start_with_config(bin, data_dir, args, LOAD_GENERATOR_LIMITS).await
    }

    /// Starts the server on `data_dir` with extra `args` and the settings in
    /// `config` (TOML).
    ///
    /// # Errors
    /// If it cannot be spawned or never becomes ready.
    pub async fn start_with_config(
        bin: &Path,
        data_dir: &Path,
        args: &[String],
        config_toml: &str,
    ) -> Result<Self> {
        let cmd = serve_command(bin, data_dir, args, config_toml)?;
        Self::spawn(cmd, &bin.display().to_string()).await
    }

    /// Spawns `cmd` and waits for its ready line (`… tcp=ADDR …` on stdout).
    ///
    /// # Errors
    /// If it cannot be spawned or never becomes ready.
    pub async fn spawn(cmd: Command, what: &str) -> Result<Self> {
        Self::spawn_until(cmd, what, false).await
    }

    /// Starts a cluster node on `data_dir` with extra `args` (the engines
    /// come from the environment): ready once it takes clients, whether it
    /// serves or forwards to the node that does.
    ///
    /// # Errors
    /// If it cannot be spawned or never takes clients.
    pub async fn start_node(bin: &Path, data_dir: &Path, args: &[String]) -> Result<Self> {
        let cmd = serve_command(bin, data_dir, args, LOAD_GENERATOR_LIMITS)?;
        Self::spawn_until(cmd, &bin.display().to_string(), true).await
    }

    /// Spawns `cmd` and waits for its ready line, or with `forwarding` its
    /// forwarding line too.
    async fn spawn_until(mut cmd: Command, what: &str, forwarding: bool) -> Result<Self> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(START_TIMEOUT, async {
            loop {
                // A cluster node forwards to the serving node until it
                // serves itself: wait for the serving line.
                match lines.next_line().await? {
                    Some(l) if !forwarding && l.starts_with("switchboard forwarding ") => {}
                    other => return Ok::<_, std::io::Error>(other),
                }
            }
        })
        .await
        .with_context(|| format!("{what} did not become ready"))??
        .with_context(|| format!("{what} exited before it was ready"))?;
        let tcp = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("tcp="))
            .with_context(|| format!("unexpected ready line: {line}"))?
            .to_owned();
        // Keep reading: a cluster node prints again when it takes over.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, tcp })
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, and wait for it to be gone.
    pub async fn kill(mut self) -> Result<()> {
        self.child.start_kill().context("kill")?;
        self.child.wait().await.context("wait")?;
        Ok(())
    }

    /// SIGTERM (a clean stop), and wait.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        Ok(())
    }
}
