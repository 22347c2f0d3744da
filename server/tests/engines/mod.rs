//! Real PostgreSQL (and later Redis) servers for the cluster-mode tests,
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
        let sockets = dir.path().to_str().unwrap().to_owned();
        let port_s = port.to_string();
        let child = command(
            &bin.join("postgres"),
            &[
                "-D",
                data_s,
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
        .unwrap();
        let pg = Self {
            child,
            port,
            _dir: dir,
        };
        let started = Instant::now();
        while tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "postgres did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pg
    }

    /// Its connection string.
    pub fn url(&self) -> String {
        format!("host=127.0.0.1 port={} user=sb dbname=postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
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
