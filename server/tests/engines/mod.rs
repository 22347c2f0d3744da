//! Real PostgreSQL servers and Redis Clusters for the cluster-mode tests,
//! started from the machine's packages on their own ports and temporary
//! directories, and killed when dropped. `.ci/run` installs the packages.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A directory holding `name`: on the PATH, else in Debian's versioned
/// `/usr/lib/postgresql/<v>/bin` (the newest).
fn find_bin(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join(name).is_file() {
                return dir;
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    versions.retain(|d| d.join(name).is_file());
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| panic!("{name} not found: apt-get install -y postgresql"))
}

fn is_root() -> bool {
    rustix::process::getuid().is_root()
}

/// `program args` as the `postgres` system user when running as root
/// (PostgreSQL refuses to run as root), else as is.
fn command(program: &Path, args: &[&str]) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
}

/// A port free right now on 127.0.0.1.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A PostgreSQL server of its own.
pub struct Postgres {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Postgres {
    /// initdb in a temporary directory, then `postgres` on a free port,
    /// trust authentication for user `sb`, fsync off (tests only).
    pub async fn start() -> Self {
        let bin = find_bin("initdb");
        let dir = tempfile::tempdir().unwrap();
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown for postgres");
        }
        let data = dir.path().join("data");
        let data_s = data.to_str().unwrap();
        let out = command(
            &bin.join("initdb"),
            &[
                "-D",
                data_s,
                "-U",
                "sb",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .stdout(Stdio::null())
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let child = Self::postmaster(&dir, port);
        let pg = Self {
            child,
            port,
            _dir: dir,
        };
        pg.wait_ready().await;
        pg
    }

    fn postmaster(dir: &TempDir, port: u16) -> Child {
        let bin = find_bin("initdb");
        let data = dir.path().join("data");
        let sockets = dir.path().to_str().unwrap().to_owned();
        let port_s = port.to_string();
        command(
            &bin.join("postgres"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-p",
                &port_s,
                "-k",
                &sockets,
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
    }

    async fn wait_ready(&self) {
        let started = Instant::now();
        while tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "postgres did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Crashes the server (immediate shutdown, as a power cut would leave
    /// it but with the data intact) and starts it again on the same port
    /// and data; returns once it accepts connections.
    pub async fn restart(&mut self) {
        self.stop();
        self.child = Self::postmaster(&self._dir, self.port);
        self.wait_ready().await;
    }

    /// Its connection string.
    pub fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=sb dbname=postgres", self.port)
    }
}

impl Postgres {
    fn stop(&mut self) {
        // Immediate shutdown (SIGQUIT) of the postmaster: the child itself,
        // or as root the child of `runuser`, which exits after it.
        let pid = self.child.id().to_string();
        let _ = if is_root() {
            Command::new("pkill").args(["-QUIT", "-P", &pid]).status()
        } else {
            Command::new("kill").args(["-QUIT", &pid]).status()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port `p` free right now on 127.0.0.1 with `p + 10000` free too (a
/// Redis Cluster node's bus port).
fn free_cluster_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if !(1_024..=55_000).contains(&p) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

/// A Redis Cluster of its own: 3 masters and 3 replicas from the
/// machine's `redis-server`, AOF on, each node in its own directory.
pub struct RedisCluster {
    nodes: Vec<(u16, Option<Child>)>,
    dir: TempDir,
}

impl RedisCluster {
    /// Starts the six nodes and joins them (`redis-cli --cluster create`);
    /// returns once every node reports `cluster_state:ok`.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
        };
        for _ in 0..6 {
            let port = free_cluster_port();
            let child = cluster.spawn(port);
            cluster.nodes.push((port, Some(child)));
        }
        for (port, _) in &cluster.nodes {
            wait_for(Duration::from_secs(20), || ping(*port));
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(p, _)| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli not found: apt-get install -y redis-server");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let ports: Vec<u16> = cluster.nodes.iter().map(|(p, _)| *p).collect();
        for port in ports {
            wait_for(Duration::from_secs(30), || {
                cli(port, &["cluster", "info"]).contains("cluster_state:ok")
            });
            // Replicas in sync, so the first WAIT is not a timeout.
            wait_for(Duration::from_secs(30), || {
                let info = cli(port, &["info", "replication"]);
                info.contains("master_link_status:up") || info.contains("connected_slaves:1")
            });
        }
        cluster
    }

    fn spawn(&self, port: u16) -> Child {
        let dir = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--dir",
                dir.to_str().unwrap(),
                "--logfile",
                "redis.log",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: apt-get install -y redis-server")
    }

    /// Kills the node on `port` (SIGKILL).
    pub fn kill(&mut self, port: u16) {
        for (p, child) in &mut self.nodes {
            if *p == port
                && let Some(mut c) = child.take()
            {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts the node on `port` again with its data and cluster config;
    /// it rejoins (a killed master comes back as a replica of the replica
    /// that took over).
    pub fn restart(&mut self, port: u16) {
        let i = self.nodes.iter().position(|(p, _)| *p == port).unwrap();
        // The previous process was killed and reaped by `kill`; this one is
        // reaped on drop.
        let child = self.spawn(port);
        self.nodes[i].1 = Some(child);
        wait_for(Duration::from_secs(20), || ping(port));
    }

    /// The port of the master serving `key`'s slot.
    pub fn master_of(&self, key: &str) -> u16 {
        let any = self.nodes.iter().find(|(_, c)| c.is_some()).unwrap().0;
        let slot: u16 = cli(any, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .unwrap();
        let nodes = cli(any, &["cluster", "nodes"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let port: u16 = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
                .unwrap();
            for range in &fields[8..] {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>())
                    && (lo..=hi).contains(&slot)
                {
                    return port;
                }
            }
        }
        panic!("no master serves slot {slot}:\n{nodes}")
    }

    /// Empties every live node's script cache (`SCRIPT FLUSH`), as a
    /// restart or a replica's promotion leaves a master.
    pub fn flush_scripts(&self) {
        for (port, child) in &self.nodes {
            if child.is_some() {
                assert!(cli(*port, &["script", "flush"]).contains("OK"));
            }
        }
    }

    /// Whether every node reports `cluster_state:ok` and each master a
    /// connected replica.
    pub fn healthy(&self) -> bool {
        self.nodes.iter().all(|(port, child)| {
            child.is_some() && cli(*port, &["cluster", "info"]).contains("cluster_state:ok")
        })
    }

    /// The seed-node list for `redis_url`.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|(p, _)| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Whether a Redis on `port` answers PING.
fn ping(port: u16) -> bool {
    cli(port, &["ping"]).trim() == "PONG"
}

/// `redis-cli -p port args...`'s output ("" if it failed).
fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn wait_for(limit: Duration, mut ready: impl FnMut() -> bool) {
    let started = Instant::now();
    while !ready() {
        assert!(started.elapsed() < limit, "engine not ready in {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(mut c) = child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
