//! The real server for the SDK's tests: `switchboard_server::start` on
//! ephemeral ports with a temporary data dir, restartable on the same ports
//! (so a running client reconnects to the same endpoint), accounts
//! registered through the SDK with the development code file (which
//! publishes their keys), and a [`Peer`] pairing a
//! client with its events. Every client gets a crypto state directory named
//! after its server and device, so a restarted client keeps its identity.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use switchboard_client::{
    Backoff, Client, ClientConfig, CloseReason, ConnectOptions, Connection, Credentials, DeviceId,
    Endpoint, Error, Event, Events, ReceiptKind, Seq, UserId, register,
};
use switchboard_server::{Config, RunningServer, ServerError};
use tempfile::TempDir;

/// How long any single expected event may take before a test fails: generous,
/// the tests share two cores with builds.
pub const WAIT: Duration = Duration::from_secs(30);

/// Pause between looks at something that has no event (a file the server
/// writes, a port the previous server is releasing).
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A real server in this process, on its own data dir.
pub struct TestServer {
    dir: TempDir,
    config: Config,
    running: Option<RunningServer>,
    /// The Noise/TCP listener, kept across restarts.
    pub tcp_addr: SocketAddr,
    /// The HTTP/WebSocket listener, kept across restarts.
    pub http_addr: SocketAddr,
    /// The server's static key (kept in the data dir, so it survives restarts).
    pub public_key: Vec<u8>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts with `tweak` applied to the test configuration.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().into(),
            tcp_listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            shards: 2,
            // Tests pipeline thousands of sends from one user; the server's
            // abuse limits are tested in the server's limits.rs.
            sends_per_user_per_min: 1_000_000,
            sends_per_pair_per_min: 1_000_000,
            read_receipts_per_user_per_min: 1_000_000,
            lookups_per_user_per_hour: 1_000_000,
            bundle_fetches_per_user_per_hour: 1_000_000,
            code_requests_per_ip_per_hour: 1_000_000,
            connections_per_ip_per_min: 1_000_000,
            ..Config::default()
        };
        tweak(&mut config);
        let running = switchboard_server::start(config.clone()).await.unwrap();
        let ready = running.ready.clone();
        Self {
            dir,
            config,
            running: Some(running),
            tcp_addr: ready.tcp_addr,
            http_addr: ready.http_addr,
            public_key: ready.server_public_key,
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        self.tcp_addr.to_string().parse().unwrap()
    }

    pub fn ws_endpoint(&self) -> Endpoint {
        format!("ws://{}/ws", self.http_addr).parse().unwrap()
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops cleanly (clients are told `SHUTTING_DOWN`), keeping the data dir.
    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await.unwrap();
        }
    }

    /// Starts again on the same data dir and the same ports.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut config = self.config.clone();
        config.tcp_listen = self.tcp_addr;
        config.http_listen = self.http_addr;
        let running = tokio::time::timeout(WAIT, async {
            loop {
                match switchboard_server::start(config.clone()).await {
                    Ok(running) => return running,
                    // The old sockets may take a moment to be released.
                    Err(ServerError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::AddrInUse =>
                    {
                        tokio::time::sleep(POLL_INTERVAL).await;
                    }
                    Err(e) => panic!("restart failed: {e}"),
                }
            }
        })
        .await
        .expect("the old ports were never released");
        assert_eq!(running.ready.server_public_key, self.public_key);
        self.running = Some(running);
    }

    fn dev_code_path(&self, phone: &str) -> PathBuf {
        self.data_dir()
            .join(switchboard_server::DEV_CODES_DIR)
            .join(phone)
    }

    /// Registers `phone` (a new primary device, revoking any previous one)
    /// through the SDK, reading the code the development sender wrote; the
    /// SDK publishes the device's keys from its state directory.
    pub async fn register(&self, phone: &str) -> Credentials {
        let code = self.code_for(phone).await;
        let dir = new_state_dir();
        let creds = register::verify_code(
            &self.endpoint(),
            &ConnectOptions::default(),
            phone,
            &code,
            &dir,
        )
        .await
        .unwrap();
        assert_eq!(creds.phone, phone);
        adopt_state_dir(&dir, &creds);
        creds
    }

    /// Registers `phone` with a raw connection, publishing no keys: a
    /// device that verified and never connected (as older SDKs left it).
    pub async fn register_without_keys(&self, phone: &str) -> Credentials {
        let code = self.code_for(phone).await;
        let mut conn = Connection::connect(&self.endpoint(), &ConnectOptions::default())
            .await
            .unwrap();
        let creds = conn.verify_code(phone, &code).await.unwrap();
        let _ = conn.close().await;
        assert_eq!(creds.phone, phone);
        creds
    }

    /// Asks for a code for `phone` and reads it from the dev code file.
    pub async fn code_for(&self, phone: &str) -> String {
        let endpoint = self.endpoint();
        let options = ConnectOptions::default();
        let path = self.dev_code_path(phone);
        // A code file left by an earlier registration must not be mistaken
        // for the new one.
        let _ = std::fs::remove_file(&path);
        register::request_code(&endpoint, &options, phone)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(code) = tokio::fs::read_to_string(&path).await {
                    return code.trim().to_owned();
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        })
        .await
        .expect("the dev code file never appeared")
    }

    /// Links a new device to the account of `primary` (a running primary
    /// device); the SDK publishes its keys.
    pub async fn link(&self, primary: &Client) -> Credentials {
        let code = primary.create_link_code().await.unwrap();
        let dir = new_state_dir();
        let creds = register::link_device(
            &self.endpoint(),
            &ConnectOptions::default(),
            &code.code,
            &dir,
        )
        .await
        .unwrap();
        assert_eq!(creds.user_id, primary.user_id());
        adopt_state_dir(&dir, &creds);
        creds
    }
}

fn test_root() -> &'static Path {
    static ROOT: OnceLock<TempDir> = OnceLock::new();
    ROOT.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// A fresh directory for a device that is not registered yet.
pub fn new_state_dir() -> PathBuf {
    let name = next_id();
    test_root().join(format!("new-{name:016x}"))
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Moves a state directory made at registration to the device's own.
fn adopt_state_dir(dir: &Path, creds: &Credentials) {
    std::fs::rename(dir, state_dir(creds)).unwrap();
}

/// The crypto state directory of a device (named by its credential, which
/// is random per device, so servers and transports never share one).
pub fn state_dir(creds: &Credentials) -> PathBuf {
    let root = test_root();
    let credential: String = creds
        .credential
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    root.join(format!(
        "{}-{}-{credential}",
        creds.user_id, creds.device_id
    ))
}

/// A client config for `endpoint` that reconnects quickly.
pub fn client_config(endpoint: Endpoint) -> ClientConfig {
    let mut config = ClientConfig::new(endpoint);
    config.backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
    config
}

/// A message event, flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub seq: Seq,
    pub from_user: UserId,
    pub from_device: DeviceId,
    pub from_phone: String,
    pub to_user: UserId,
    pub from_own_device: bool,
    pub client_msg_id: String,
    pub payload: Bytes,
}

/// A running client and its events.
pub struct Peer {
    pub client: Client,
    pub events: Events,
    pub creds: Credentials,
}

impl Peer {
    /// Starts a client and waits until its queue is drained.
    pub async fn online(server: &TestServer, creds: Credentials) -> Self {
        Self::online_with(client_config(server.endpoint()), creds).await
    }

    /// Starts a client and waits until its queue is drained and its keys
    /// are published.
    pub async fn online_with(config: ClientConfig, creds: Credentials) -> Self {
        let mut peer = Self::start(config, creds).await;
        peer.up_to_date().await;
        tokio::time::timeout(WAIT, peer.client.keys_published())
            .await
            .expect("keys never published")
            .unwrap();
        peer
    }

    /// Starts a client without waiting for anything. Without a
    /// `state_dir`, the device's directory under the test root is used.
    pub async fn start(mut config: ClientConfig, creds: Credentials) -> Self {
        if config.state_dir.is_none() {
            config.state_dir = Some(state_dir(&creds));
        }
        let (client, events) = Client::start(config, creds.clone()).await.unwrap();
        Self {
            client,
            events,
            creds,
        }
    }

    pub fn user_id(&self) -> UserId {
        self.creds.user_id
    }

    pub fn phone(&self) -> &str {
        &self.creds.phone
    }

    /// Waits for the first event `pick` accepts, skipping the others.
    /// Receipts are acknowledged as they are seen (no test needs one
    /// redelivered), so they never hold up a drain.
    pub async fn wait_for<T>(&mut self, mut pick: impl FnMut(Event) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                let event = self.events.recv().await.expect("events ended");
                if let Event::Receipt { seq, .. } = &event {
                    // Fails only once the client is closing (the test is
                    // waiting for its end): nothing to redeliver then.
                    let _ = self.client.ack([*seq]).await;
                }
                if let Some(t) = pick(event) {
                    return t;
                }
            }
        })
        .await
        .expect("timed out waiting for an event")
    }

    pub async fn up_to_date(&mut self) {
        self.wait_for(|e| matches!(e, Event::UpToDate).then_some(()))
            .await;
    }

    pub async fn connected(&mut self) {
        self.wait_for(|e| matches!(e, Event::Connected { .. }).then_some(()))
            .await;
    }

    /// Why the link went down, at the next `Disconnected`.
    pub async fn disconnected(&mut self) -> Error {
        self.wait_for(|e| match e {
            Event::Disconnected { reason } => Some(reason),
            _ => None,
        })
        .await
    }

    /// Why the client stopped, at its `Closed`.
    pub async fn closed(&mut self) -> CloseReason {
        self.wait_for(|e| match e {
            Event::Closed { reason } => Some(reason),
            _ => None,
        })
        .await
    }

    /// The next message (not acknowledged).
    pub async fn message(&mut self) -> Received {
        self.wait_for(|e| match e {
            Event::Message {
                seq,
                from_user,
                from_device,
                from_phone,
                to_user,
                from_own_device,
                client_msg_id,
                payload,
                ..
            } => Some(Received {
                seq,
                from_user,
                from_device,
                from_phone,
                to_user,
                from_own_device,
                client_msg_id,
                payload,
            }),
            _ => None,
        })
        .await
    }

    /// The ids of the next receipt of `kind` (acknowledged).
    pub async fn receipt(&mut self, kind: ReceiptKind) -> Vec<String> {
        self.wait_for(|e| match e {
            Event::Receipt {
                kind: k,
                client_msg_ids,
                ..
            } if k == kind => Some(client_msg_ids),
            _ => None,
        })
        .await
    }

    /// Waits until receipts of `kind` have named every id in `ids`.
    pub async fn receipts_for(&mut self, kind: ReceiptKind, ids: &[&str]) {
        let mut missing: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        while !missing.is_empty() {
            let got = self.receipt(kind).await;
            missing.retain(|id| !got.contains(id));
        }
    }

    /// Everything already in the events channel.
    pub fn drain_ready(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.events.try_recv()).collect()
    }

    pub async fn close(self) {
        self.client.close().await.unwrap();
    }
}

/// Sends `text` from `from` to `to_user` and returns its id.
pub async fn say(from: &Peer, to_user: UserId, text: &str) -> String {
    from.client
        .send_to_user(to_user, Bytes::from(text.to_owned()))
        .await
        .unwrap()
        .client_msg_id
}

/// The next message (acknowledged), checked to be `text` under `id`.
pub async fn hear(peer: &mut Peer, id: &str, text: &str) -> Received {
    let m = peer.message().await;
    assert_eq!(
        (m.client_msg_id.as_str(), &m.payload[..]),
        (id, text.as_bytes())
    );
    peer.client.ack([m.seq]).await.unwrap();
    m
}
