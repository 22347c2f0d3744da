//! What the end-to-end tests of `sbchat send` and `sbchat chat` share: a
//! real server in-process on ephemeral ports, homes registered through the
//! dev code file, and the real binary run to completion or kept running
//! with its standard streams piped.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Longest wait for anything a test expects.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct Env {
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub tcp: String,
    server: Option<switchboard_server::RunningServer>,
}

impl Env {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let cfg = switchboard_server::Config {
            data_dir: data_dir.clone(),
            tcp_listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            shards: 2,
            ..Default::default()
        };
        let server = switchboard_server::start(cfg).await.unwrap();
        Self {
            tcp: server.ready.tcp_addr.to_string(),
            data_dir,
            dir,
            server: Some(server),
        }
    }

    pub fn home(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Registers a new home for `phone`.
    pub async fn register(&self, name: &str, phone: &str) -> PathBuf {
        let home = self.home(name);
        let run = self.run(&home, &["register", phone], None).await;
        assert_eq!(run.code, 0, "{run:?}");
        let code_file = self.data_dir.join("dev-codes").join(phone);
        let dev_code = std::fs::read_to_string(code_file).unwrap();
        let run = self.run(&home, &["verify", dev_code.trim()], None).await;
        assert_eq!(run.code, 0, "{run:?}");
        home
    }

    /// Links a new home to the account of `primary`.
    pub async fn link(&self, primary: &Path, name: &str) -> PathBuf {
        let run = self.run(primary, &["link-code"], None).await;
        assert_eq!(run.code, 0, "{run:?}");
        let code = run.json[0]["code"].as_str().unwrap().to_owned();
        let home = self.home(name);
        let run = self.run(&home, &["link", &code], None).await;
        assert_eq!(run.code, 0, "{run:?}");
        home
    }

    /// Runs `sbchat --json ARGS` to completion, with `stdin` (or nothing)
    /// as its standard input.
    pub async fn run(&self, home: &Path, args: &[&str], stdin: Option<&[u8]>) -> Run {
        self.run_with(home, &["--json"], args, stdin).await
    }

    /// Runs `sbchat ARGS` in text mode to completion.
    pub async fn run_text(&self, home: &Path, args: &[&str], stdin: Option<&[u8]>) -> Run {
        self.run_with(home, &[], args, stdin).await
    }

    async fn run_with(
        &self,
        home: &Path,
        mode: &[&str],
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Run {
        let mut child = self
            .command(home, mode, args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(bytes) = stdin {
            let mut input = child.stdin.take().unwrap();
            // sbchat may refuse before reading it all.
            let _ = input.write_all(bytes).await;
        }
        let out = tokio::time::timeout(WAIT, child.wait_with_output())
            .await
            .expect("sbchat hung")
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let json = if mode.contains(&"--json") {
            stdout
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
                .collect()
        } else {
            Vec::new()
        };
        Run {
            code: out.status.code().unwrap_or(-1),
            json,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn command(&self, home: &Path, mode: &[&str], args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sbchat"));
        command
            .arg("--home")
            .arg(home)
            .args(["--server", &self.tcp])
            .args(mode)
            .args(args)
            .env_remove("SBCHAT_SERVER")
            .kill_on_drop(true);
        command
    }

    /// Starts `sbchat chat PHONE` in text mode (`--json` if `json`) with
    /// piped streams, as a script or a test drives it.
    pub fn chat(&self, home: &Path, phone: &str, json: bool) -> Chat {
        let mode: &[&str] = if json { &["--json"] } else { &[] };
        let mut child = self
            .command(home, mode, &["chat", phone])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        Chat {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    pub async fn stop(mut self) {
        self.server.take().unwrap().stop().await.unwrap();
    }
}

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub json: Vec<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn events(&self, name: &str) -> Vec<&Value> {
        self.json.iter().filter(|l| l["event"] == name).collect()
    }
}

/// A running `sbchat chat`.
pub struct Chat {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: Lines<BufReader<tokio::process::ChildStderr>>,
}

impl Chat {
    pub async fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(line.as_bytes()).await.unwrap();
        stdin.write_all(b"\n").await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Closes standard input (EOF).
    pub fn close_input(&mut self) {
        self.stdin = None;
    }

    /// Reads stdout lines until one satisfies `want`; returns the lines
    /// read, that one last.
    pub async fn stdout_until(&mut self, want: impl Fn(&str) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = tokio::time::timeout(WAIT, self.stdout.next_line())
                .await
                .unwrap_or_else(|_| panic!("timed out; stdout so far: {seen:#?}"))
                .unwrap();
            let Some(line) = line else {
                panic!("stdout ended; so far: {seen:#?}");
            };
            let done = want(&line);
            seen.push(line);
            if done {
                return seen;
            }
        }
    }

    /// Reads stderr lines until one satisfies `want`.
    pub async fn stderr_until(&mut self, want: impl Fn(&str) -> bool) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let line = tokio::time::timeout(WAIT, self.stderr.next_line())
                .await
                .unwrap_or_else(|_| panic!("timed out; stderr so far: {seen:#?}"))
                .unwrap();
            let Some(line) = line else {
                panic!("stderr ended; so far: {seen:#?}");
            };
            let done = want(&line);
            seen.push(line);
            if done {
                return seen;
            }
        }
    }

    /// Waits for the exit; returns its code and the rest of stdout and
    /// stderr.
    pub async fn finish(mut self) -> (i32, Vec<String>, Vec<String>) {
        self.stdin = None;
        let rest = async {
            let mut out = Vec::new();
            while let Some(line) = self.stdout.next_line().await.unwrap() {
                out.push(line);
            }
            let mut err = Vec::new();
            while let Some(line) = self.stderr.next_line().await.unwrap() {
                err.push(line);
            }
            let status = self.child.wait().await.unwrap();
            (status.code().unwrap_or(-1), out, err)
        };
        tokio::time::timeout(WAIT, rest)
            .await
            .expect("sbchat chat did not exit")
    }
}
