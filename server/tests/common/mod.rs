//! Test harness: a real server on ephemeral ports with a temporary data
//! dir, and a raw protocol client built only on `switchboard-proto` (so
//! these tests pin the wire protocol, independent of the SDK).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use ed25519_dalek::{Signer, SigningKey};
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use switchboard_proto::noise::{Handshake, generate_keypair};
use switchboard_proto::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_proto::{PREAMBLE, Session, limits, record, version};
use switchboard_server::{Config, RunningServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;

/// How long any single expected event may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn test_config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        tcp_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        shards: 2,
        // Tests pipeline thousands of requests from one user; the limits
        // themselves are tested in limits.rs with settings of their own.
        sends_per_user_per_min: 1_000_000,
        sends_per_pair_per_min: 1_000_000,
        read_receipts_per_user_per_min: 1_000_000,
        lookups_per_user_per_hour: 1_000_000,
        group_changes_per_user_per_hour: 1_000_000,
        bundle_fetches_per_user_per_hour: 1_000_000,
        code_requests_per_ip_per_hour: 1_000_000,
        connections_per_ip_per_min: 1_000_000,
        ..Config::default()
    }
}

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub server: Option<RunningServer>,
    /// The configuration it started with (a restart uses it again).
    pub config: Config,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        // Logs with RUST_LOG=debug when a test needs explaining.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        tweak(&mut cfg);
        let server = switchboard_server::start(cfg.clone()).await.unwrap();
        Self {
            dir,
            server: Some(server),
            config: cfg,
        }
    }

    pub fn tcp(&self) -> String {
        self.server.as_ref().unwrap().ready.tcp_addr.to_string()
    }

    pub fn ws(&self) -> String {
        format!("ws://{}/ws", self.server.as_ref().unwrap().ready.http_addr)
    }

    pub fn http(&self) -> String {
        self.server.as_ref().unwrap().ready.http_addr.to_string()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Stops cleanly, keeping the data dir.
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().await.unwrap();
        }
    }

    /// Starts again on the same data dir (new ports).
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut cfg = self.config.clone();
        // New ports, the same settings.
        cfg.tcp_listen = "127.0.0.1:0".parse().unwrap();
        cfg.http_listen = "127.0.0.1:0".parse().unwrap();
        self.server = Some(switchboard_server::start(cfg).await.unwrap());
    }
}

/// Reads the code the development sender wrote for `phone`.
pub async fn dev_code(data_dir: &Path, phone: &str) -> String {
    let path = data_dir.join("dev-codes").join(phone);
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(s) = tokio::fs::read_to_string(&path).await {
                return s.trim().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("dev code file never appeared")
}

enum Pipe {
    Tcp(TcpStream),
    Ws(Box<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>>),
}

impl Pipe {
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Pipe::Tcp(s) => s.write_all(bytes).await,
            Pipe::Ws(ws) => ws
                .send(tungstenite::Message::Binary(bytes.to_vec().into()))
                .await
                .map_err(std::io::Error::other),
        }
    }

    async fn read(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            Pipe::Tcp(s) => {
                buf.reserve(16 * 1024);
                s.read_buf(buf).await
            }
            Pipe::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(tungstenite::Message::Binary(b))) => {
                        buf.extend_from_slice(&b);
                        return Ok(b.len());
                    }
                    Some(Ok(tungstenite::Message::Close(_))) | None => return Ok(0),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(std::io::Error::other(e)),
                }
            },
        }
    }
}

/// A raw protocol client.
pub struct Raw {
    pipe: Pipe,
    session: Session,
    rbuf: BytesMut,
    next_id: u32,
    /// Pushed frames (id 0) seen while waiting for responses.
    pub pushes: VecDeque<pb::ServerFrame>,
}

pub async fn raw_tcp(addr: &str) -> Raw {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    Raw::handshake(Pipe::Tcp(s), &[version::CURRENT])
        .await
        .unwrap()
}

pub async fn raw_ws(url: &str) -> Raw {
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    Raw::handshake(Pipe::Ws(Box::new(ws)), &[version::CURRENT])
        .await
        .unwrap()
}

/// Connects over TCP offering `versions`; returns the server's refusal if any.
pub async fn raw_tcp_versions(addr: &str, versions: &[u32]) -> Result<Raw, pb::Error> {
    let s = TcpStream::connect(addr).await.unwrap();
    Raw::handshake(Pipe::Tcp(s), versions).await
}

impl Raw {
    async fn handshake(mut pipe: Pipe, versions: &[u32]) -> Result<Self, pb::Error> {
        let key = generate_keypair().unwrap();
        let mut hs = Handshake::initiator(&key.private).unwrap();
        let mut out = BytesMut::from(&PREAMBLE[..]);
        let hello = pb::ClientHello {
            versions: versions.to_vec(),
            user_agent: "raw-test".into(),
        };
        hs.write_message(&hello.encode_to_vec(), &mut out).unwrap();
        pipe.write(&out).await.unwrap();
        let mut rbuf = BytesMut::new();
        let msg2 = loop {
            if let Some(r) = record::decode(&mut rbuf).unwrap() {
                break r;
            }
            assert!(
                pipe.read(&mut rbuf).await.unwrap() > 0,
                "closed in handshake"
            );
        };
        let payload = hs.read_message(&msg2).unwrap();
        let sh = pb::ServerHello::decode(&payload[..]).unwrap();
        match sh.result.unwrap() {
            pb::server_hello::Result::Version(v) => assert!(versions.contains(&v)),
            pb::server_hello::Result::Error(e) => return Err(e),
        }
        let mut out = BytesMut::new();
        hs.write_message(&[], &mut out).unwrap();
        pipe.write(&out).await.unwrap();
        let session = hs
            .into_session(limits::DEFAULT_MAX_FRAME_BYTES * 4)
            .unwrap();
        Ok(Self {
            pipe,
            session,
            rbuf,
            next_id: 1,
            pushes: VecDeque::new(),
        })
    }

    pub async fn send_frame(&mut self, frame: &pb::ClientFrame) {
        self.session.queue(frame);
        let mut out = BytesMut::new();
        self.session.seal(&mut out).unwrap();
        self.pipe.write(&out).await.unwrap();
    }

    /// Seals a frame into wire bytes without sending them.
    pub fn seal_frame(&mut self, frame: &pb::ClientFrame) -> BytesMut {
        self.session.queue(frame);
        let mut out = BytesMut::new();
        self.session.seal(&mut out).unwrap();
        out
    }

    /// Sends raw bytes on the socket (bypassing the session).
    pub async fn send_raw_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.pipe.write(bytes).await
    }

    /// Seals `bytes` as the whole plaintext of one record (no frame length
    /// added), e.g. to send just a length prefix.
    pub async fn send_plain_prefix(&mut self, bytes: &[u8]) {
        self.session.queue_unframed(bytes);
        let mut out = BytesMut::new();
        self.session.seal(&mut out).unwrap();
        self.pipe.write(&out).await.unwrap();
    }

    /// Queues a raw plaintext frame body and seals it.
    pub async fn send_plain(&mut self, plain_frame_body: &[u8]) -> std::io::Result<()> {
        self.session.queue_raw(plain_frame_body);
        let mut out = BytesMut::new();
        self.session.seal(&mut out).unwrap();
        self.pipe.write(&out).await
    }

    /// Next frame from the server, or None when it closed.
    pub async fn next(&mut self) -> Option<pb::ServerFrame> {
        loop {
            if let Some(f) = self.session.poll_frame(&mut self.rbuf).unwrap() {
                return Some(f);
            }
            match tokio::time::timeout(WAIT, self.pipe.read(&mut self.rbuf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(_)) => {}
                Err(_) => panic!("no frame from the server within {WAIT:?}"),
            }
        }
    }

    /// Reads until the server closes; returns the frames seen.
    pub async fn until_closed(&mut self) -> Vec<pb::ServerFrame> {
        let mut v = Vec::new();
        while let Some(f) = self.next().await {
            v.push(f);
        }
        v
    }

    /// Sends a request and waits for its response, keeping pushes aside.
    pub async fn request(&mut self, body: In) -> Out {
        let id = self.next_id;
        self.next_id += 1;
        self.send_frame(&pb::ClientFrame {
            id,
            body: Some(body),
        })
        .await;
        loop {
            let f = self
                .next()
                .await
                .expect("server closed while awaiting a response");
            if f.id == id {
                return f.body.unwrap();
            }
            assert_eq!(f.id, 0, "response to an unknown request");
            self.pushes.push_back(f);
        }
    }

    /// Like [`Raw::request`], but `None` if the server closes first.
    pub async fn try_request(&mut self, body: In) -> Option<Out> {
        let id = self.next_id;
        self.next_id += 1;
        self.send_frame(&pb::ClientFrame {
            id,
            body: Some(body),
        })
        .await;
        loop {
            let f = self.next().await?;
            if f.id == id {
                return f.body;
            }
            self.pushes.push_back(f);
        }
    }

    /// Next pushed frame.
    pub async fn push(&mut self) -> Out {
        if let Some(f) = self.pushes.pop_front() {
            return f.body.unwrap();
        }
        let f = self
            .next()
            .await
            .expect("server closed while awaiting a push");
        assert_eq!(f.id, 0);
        f.body.unwrap()
    }

    pub async fn ack(&mut self, seqs: Vec<u64>) {
        self.send_frame(&pb::ClientFrame {
            id: 0,
            body: Some(In::Ack(pb::Ack { seqs })),
        })
        .await;
    }

    pub async fn auth(&mut self, acct: &Account) -> Out {
        self.request(In::Auth(pb::Auth {
            user_id: acct.user_id,
            device_id: acct.device_id,
            credential: acct.credential.clone().into(),
        }))
        .await
    }

    pub async fn lookup(&mut self, phone: &str) -> pb::UserInfo {
        match self
            .request(In::LookupUser(pb::LookupUser {
                phone: phone.into(),
            }))
            .await
        {
            Out::UserInfo(u) => u,
            other => panic!("lookup failed: {other:?}"),
        }
    }

    pub async fn send_text(&mut self, to: &pb::UserInfo, id: &str, text: &str) -> Out {
        self.request(send_to(to, id, text.as_bytes().to_vec()))
            .await
    }

    /// Waits until delivery receipts (✓✓) for `n` message ids have come.
    pub async fn await_delivered(&mut self, n: usize) {
        let mut delivered = 0;
        while delivered < n {
            if let Some(pb::queue_entry::Body::Receipt(r)) = self.next_entry().await.body {
                delivered += r.client_msg_ids.len();
            }
        }
    }

    /// Sends `n` messages to one device without waiting for answers: frame
    /// ids from `first_id`, message ids `{prefix}{i}`, payload `i` big-endian.
    pub async fn pipeline_sends(
        &mut self,
        to_user: u64,
        device_id: u32,
        first_id: u32,
        prefix: &str,
        n: u32,
    ) {
        for i in 0..n {
            self.send_frame(&pb::ClientFrame {
                id: first_id + i,
                body: Some(In::Send(pb::Send {
                    client_msg_id: format!("{prefix}{i}"),
                    to_user,
                    payloads: vec![pb::DevicePayload {
                        device_id,
                        payload: i.to_be_bytes().to_vec().into(),
                    }],
                    ..Default::default()
                })),
            })
            .await;
        }
    }

    /// Collects delivered entries (acking each page) until `UpToDate`.
    pub async fn drain(&mut self) -> Vec<pb::QueueEntry> {
        let mut got = Vec::new();
        loop {
            match self.push().await {
                Out::Deliver(d) => {
                    let seqs = d.entries.iter().map(|e| e.seq).collect();
                    got.extend(d.entries);
                    self.ack(seqs).await;
                }
                Out::UpToDate(_) => return got,
                other => panic!("unexpected push {other:?}"),
            }
        }
    }

    /// Waits for the next delivered entry (acking it).
    pub async fn next_entry(&mut self) -> pb::QueueEntry {
        loop {
            match self.push().await {
                Out::Deliver(mut d) => {
                    let seqs = d.entries.iter().map(|e| e.seq).collect();
                    self.ack(seqs).await;
                    let first = d.entries.remove(0);
                    // Keep the rest for later calls.
                    if !d.entries.is_empty() {
                        self.pushes.push_front(pb::ServerFrame {
                            id: 0,
                            body: Some(Out::Deliver(pb::Deliver { entries: d.entries })),
                        });
                    }
                    return first;
                }
                Out::UpToDate(_) => {}
                other => panic!("unexpected push {other:?}"),
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Account {
    pub phone: String,
    pub user_id: u64,
    pub device_id: u32,
    pub credential: Vec<u8>,
}

/// Registers `phone` through the raw protocol and the dev code file.
pub async fn register(server: &TestServer, phone: &str) -> Account {
    register_at(&server.tcp(), &server.data_dir(), phone).await
}

/// Registers `phone` at the server on `tcp` whose data dir is `data_dir`.
pub async fn register_at(tcp: &str, data_dir: &Path, phone: &str) -> Account {
    let mut c = raw_tcp(tcp).await;
    match c
        .request(In::RequestCode(pb::RequestCode {
            phone: phone.into(),
            ..Default::default()
        }))
        .await
    {
        Out::CodeSent(_) => {}
        other => panic!("request code failed: {other:?}"),
    }
    let code = dev_code(data_dir, phone).await;
    match c
        .request(In::VerifyCode(pb::VerifyCode {
            phone: phone.into(),
            code,
            pin: String::new(),
        }))
        .await
    {
        Out::Verified(v) => Account {
            phone: phone.into(),
            user_id: v.user_id,
            device_id: v.device_id,
            credential: v.credential.to_vec(),
        },
        other => panic!("verify failed: {other:?}"),
    }
}

/// The real `switchboard` binary as a child process; killed on drop so no
/// test leaves one behind.
pub struct Proc {
    pub child: tokio::process::Child,
    pub tcp: String,
    pub http: String,
}

/// Starts the server binary on `data_dir` and ephemeral ports, with
/// `extra` flags, and waits for its ready line.
pub async fn spawn_server(data_dir: &Path, extra: &[&str]) -> Proc {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "serve",
            "--tcp-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(WAIT, async {
        loop {
            let line = lines.next_line().await.unwrap();
            // A cluster node forwards until it serves.
            if !line
                .as_deref()
                .is_some_and(|l| l.starts_with("switchboard forwarding "))
            {
                return line;
            }
        }
    })
    .await
    .expect("server did not become ready")
    .expect("server exited before it was ready");
    assert!(line.starts_with("switchboard ready "), "{line}");
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap()
            .to_owned()
    };
    Proc {
        tcp: field("tcp="),
        http: field("http="),
        child,
    }
}

/// A connected, authenticated raw client that has drained its queue.
pub async fn online(server: &TestServer, acct: &Account) -> Raw {
    let mut c = raw_tcp(&server.tcp()).await;
    match c.auth(acct).await {
        Out::AuthOk(_) => {}
        other => panic!("auth failed: {other:?}"),
    }
    c
}

pub fn error_code(out: &Out) -> pb::ErrorCode {
    match out {
        Out::Error(e) => e.code(),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// GETs `path` from the server's HTTP listener; returns (status, body).
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// The value of one Prometheus series (exact name and labels), if present.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// Resident memory of a process (`"self"` or a pid), from /proc; 0 if it
/// cannot be read.
pub fn rss_bytes(process: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{process}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A device's test identity: an Ed25519 signing key and a made-up X25519
/// identity key (the server only checks signatures and sizes).
pub struct TestKeys {
    sk: SigningKey,
    curve: [u8; 32],
}

impl TestKeys {
    pub fn new(seed: u8) -> Self {
        Self {
            sk: SigningKey::from_bytes(&[seed; 32]),
            curve: [seed.wrapping_add(100); 32],
        }
    }

    pub fn sign(&self, label: &[u8], public: &[u8]) -> Vec<u8> {
        let mut msg = label.to_vec();
        msg.extend_from_slice(public);
        self.sk.sign(&msg).to_bytes().to_vec()
    }

    pub fn identity(&self) -> pb::IdentityKeys {
        pb::IdentityKeys {
            curve25519: self.curve.to_vec().into(),
            ed25519: self.sk.verifying_key().to_bytes().to_vec().into(),
            signature: self.sign(b"switchboard identity v1", &self.curve).into(),
        }
    }

    pub fn key(&self, id: &str, public: [u8; 32]) -> pb::SignedKey {
        pb::SignedKey {
            key_id: id.into(),
            public_key: public.to_vec().into(),
            signature: self.sign(b"switchboard key v1", &public).into(),
        }
    }

    pub fn upload(&self, first: u32, count: u32) -> pb::UploadKeys {
        pb::UploadKeys {
            identity: Some(self.identity()),
            fallback_key: Some(self.key("fallback", [0xfb; 32])),
            one_time_keys: (first..first + count)
                .map(|i| {
                    let mut k = [0u8; 32];
                    k[..4].copy_from_slice(&i.to_be_bytes());
                    self.key(&format!("otk{i}"), k)
                })
                .collect(),
        }
    }
}

/// A `Send` of `payload` to every device of `to`.
pub fn send_to(to: &pb::UserInfo, id: &str, payload: Vec<u8>) -> In {
    In::Send(pb::Send {
        client_msg_id: id.into(),
        to_user: to.user_id,
        payloads: to
            .devices
            .iter()
            .map(|d| pb::DevicePayload {
                device_id: *d,
                payload: payload.clone().into(),
            })
            .collect(),
        ..Default::default()
    })
}

/// The client message ids of the message entries among `entries`, in order.
pub fn message_ids(entries: &[pb::QueueEntry]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|e| match &e.body {
            Some(pb::queue_entry::Body::Message(m)) => Some(m.client_msg_id.clone()),
            _ => None,
        })
        .collect()
}
