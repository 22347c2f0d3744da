//! The abuse scenario: one user floods another with sends, READ receipts,
//! phone lookups and key-bundle fetches from many connections that keep
//! reconnecting, while a third user's 1:1 traffic goes on. The server runs
//! its production limits (only the victim's queue quota is set small, so it
//! is reached within the run).
//!
//! It checks what issue #18 asks of the limits: the victim's queue stays
//! within its quota, the flooder gets RATE_LIMITED and QUEUE_FULL, and the
//! bystanders' p99 send→delivered stays within 2× of its unloaded value.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use switchboard_client::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_client::{Connection, Credentials, Endpoint};
use tokio::sync::Mutex;

use crate::harness::{
    Latency, Sut, Target, connect_drained, histogram, latency, options, print_json, register_users,
};
use crate::scenarios::connect_drained_counting;

/// Options of `abuse`.
#[derive(clap::Args, Debug)]
pub struct AbuseArgs {
    #[command(flatten)]
    target: Target,
    /// Seconds of bystander traffic measured without, then with, the flood.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Bystander pairs (each one user sending to another).
    #[arg(long, default_value_t = 10)]
    pairs: usize,
    /// Messages per second each bystander pair sends (within the default
    /// per-pair limit over both phases).
    #[arg(long, default_value_t = 10)]
    rate: u32,
    /// The flooder's connections at once.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Requests a flooding connection makes before it reconnects.
    #[arg(long, default_value_t = 200)]
    requests_per_connection: u32,
    /// Requests a flooding connection keeps in flight.
    #[arg(long, default_value_t = 16)]
    window: u32,
    /// The victim's queue quota (`queue_max_entries_per_device`).
    #[arg(long, default_value_t = 1000)]
    queue_quota: u64,
}

/// What the flooder's requests got, by request kind and answer.
type Tally = BTreeMap<String, u64>;

#[derive(Serialize)]
struct AbuseReport {
    scenario: &'static str,
    unloaded: Latency,
    loaded: Latency,
    /// loaded p99 / unloaded p99.
    p99_ratio: f64,
    flood_requests: u64,
    flood_connections_opened: u64,
    flood_answers: Tally,
    victim_queue_entries: usize,
    victim_queue_quota: u64,
    passed: bool,
}

pub async fn abuse(a: AbuseArgs) -> Result<bool> {
    let config = format!(
        "queue_max_entries_per_device = {}\n\
         # The load generator registers its users from one address.\n\
         code_requests_per_ip_per_hour = 1000\n",
        a.queue_quota
    );
    let sut = Sut::start_with_config(&a.target, &[], &config).await?;
    let users = register_users(&sut.tcp, &sut.data_dir, 7_000_000, 2 + 2 * a.pairs, 8).await?;
    let (victim, flooder) = (&users[0], &users[1]);
    // The bystanders connect once, before the flood: the flood's new
    // connections use up the address's connection rate, which they share
    // with the flooder here (one machine, one address).
    let mut pairs = Vec::with_capacity(a.pairs);
    for p in users[2..].chunks_exact(2) {
        pairs.push((
            connect_drained(&sut.tcp, &p[0], "abuse-alice").await?,
            connect_drained(&sut.tcp, &p[1], "abuse-bob").await?,
            p[1].clone(),
        ));
    }

    let (unloaded, pairs) = bystanders(pairs, a.rate, a.seconds).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let opened = Arc::new(AtomicU64::new(0));
    let tally = Arc::new(Mutex::new(Tally::new()));
    let mut flood = Vec::with_capacity(a.connections);
    for i in 0..a.connections {
        let f = Flooder {
            tcp: sut.tcp.clone(),
            creds: flooder.clone(),
            victim: victim.user_id.get(),
            victim_device: victim.device_id.get(),
            per_connection: a.requests_per_connection,
            window: a.window,
            stop: stop.clone(),
            requests: requests.clone(),
            opened: opened.clone(),
            tally: tally.clone(),
            seed: i as u64,
        };
        flood.push(tokio::spawn(f.run()));
    }
    // Let the flood reach its pace (and the victim's queue its quota).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (loaded, pairs) = bystanders(pairs, a.rate, a.seconds).await?;
    for (a_conn, b_conn, _) in pairs {
        drop(a_conn.close().await);
        drop(b_conn.close().await);
    }
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        f.await.context("flooder")??;
    }

    let (conn, victim_entries) = connect_drained_counting(&sut.tcp, victim).await?;
    drop(conn.close().await);
    let tally = tally.lock().await.clone();
    let refused = |code: &str| tally.iter().any(|(k, n)| k.ends_with(code) && *n > 0);
    let p99_ratio = loaded.p99_ms / unloaded.p99_ms.max(0.001);
    let passed = victim_entries as u64 <= a.queue_quota
        && refused("RATE_LIMITED")
        && refused("QUEUE_FULL")
        && p99_ratio <= 2.0;
    let report = AbuseReport {
        scenario: "abuse",
        unloaded,
        loaded,
        p99_ratio,
        flood_requests: requests.load(Ordering::Relaxed),
        flood_connections_opened: opened.load(Ordering::Relaxed),
        flood_answers: tally,
        victim_queue_entries: victim_entries,
        victim_queue_quota: a.queue_quota,
        passed,
    };
    if a.target.json {
        print_json(&report)?;
    } else {
        println!(
            "abuse: bystander send→delivered unloaded {}\n       under the flood   {}\n       p99 ratio {:.2} (target ≤ 2)",
            report.unloaded, report.loaded, report.p99_ratio
        );
        println!(
            "       flooder: {} requests over {} connections; answers {:?}",
            report.flood_requests, report.flood_connections_opened, report.flood_answers
        );
        println!(
            "       victim's queue: {} entries (quota {}); {}",
            report.victim_queue_entries,
            report.victim_queue_quota,
            if passed { "PASS" } else { "FAIL" }
        );
    }
    sut.stop().await?;
    Ok(passed)
}

/// Each pair's first user sends to its second at `rate` per second for
/// `seconds`; the receivers ack. The send→delivered latency of every
/// message.
async fn bystanders(pairs: Vec<Pair>, rate: u32, seconds: u64) -> Result<(Latency, Vec<Pair>)> {
    let mut runs = Vec::with_capacity(pairs.len());
    for p in pairs {
        runs.push(tokio::spawn(pair(p, rate, seconds)));
    }
    let mut all = histogram()?;
    let mut back = Vec::with_capacity(runs.len());
    for r in runs {
        let (p, h) = r.await.context("bystander pair")??;
        all.add(h)?;
        back.push(p);
    }
    Ok((latency(&all), back))
}

/// A bystander pair: Alice's connection, Bob's, and Bob's credentials.
type Pair = (Connection, Connection, Credentials);

/// One bystander pair: Alice sends to Bob, Bob acks; the latencies.
async fn pair(
    (mut a, mut b, bob): Pair,
    rate: u32,
    seconds: u64,
) -> Result<(Pair, Histogram<u64>)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let total = u64::from(rate) * seconds;
    let origin = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut h: Histogram<u64> = histogram()?;
        while h.len() < total {
            let f = tokio::time::timeout(Duration::from_secs(30), b.next_frame())
                .await
                .context("Bob received nothing for 30 s")??;
            if let Some(Out::Deliver(d)) = f.body {
                let now = origin.elapsed().as_micros() as u64;
                let mut seqs = Vec::with_capacity(d.entries.len());
                for e in d.entries {
                    seqs.push(e.seq);
                    if let Some(pb::queue_entry::Body::Message(m)) = e.body
                        && let Ok(sent) = <[u8; 8]>::try_from(&m.payload[..])
                    {
                        h.record(now.saturating_sub(u64::from_be_bytes(sent)).max(1))?;
                    }
                }
                b.ack(&seqs).await?;
            }
        }
        Ok::<_, anyhow::Error>((b, h))
    });
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let mut sent = 0;
    while sent < total {
        tokio::select! {
            _ = tick.tick() => {
                let id = a.next_request_id();
                let stamp = origin.elapsed().as_micros() as u64;
                a.send_frame(&pb::ClientFrame {
                    id,
                    body: Some(In::Send(pb::Send {
                        client_msg_id: format!("b{}", NEXT.fetch_add(1, Ordering::Relaxed)),
                        to_user: bob.user_id.get(),
                        payloads: vec![pb::DevicePayload {
                            device_id: bob.device_id.get(),
                            payload: stamp.to_be_bytes().to_vec().into(),
                        }],
                        first_attempt: true,
                        ..Default::default()
                    })),
                })
                .await?;
                sent += 1;
            }
            f = a.next_frame() => match f?.body {
                Some(Out::Error(e)) => anyhow::bail!("a bystander's send was refused: {e:?}"),
                Some(Out::Deliver(d)) => {
                    let seqs: Vec<u64> = d.entries.iter().map(|e| e.seq).collect();
                    a.ack(&seqs).await?;
                }
                _ => {}
            },
        }
    }
    let (b, h) = receiver.await.context("receiver")??;
    Ok(((a, b, bob), h))
}

/// One flooding connection loop: reconnects every `per_connection`
/// requests until `stop`.
struct Flooder {
    tcp: String,
    creds: Credentials,
    victim: u64,
    victim_device: u32,
    per_connection: u32,
    window: u32,
    stop: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    opened: Arc<AtomicU64>,
    tally: Arc<Mutex<Tally>>,
    seed: u64,
}

impl Flooder {
    async fn run(self) -> Result<()> {
        let endpoint: Endpoint = self.tcp.parse().context("endpoint")?;
        let mut n = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let mut conn = match Connection::connect(&endpoint, &options("abuse-flood")).await {
                Ok(c) => c,
                Err(e) => {
                    self.count("connect", &e.to_string()).await;
                    tokio::task::yield_now().await;
                    continue;
                }
            };
            self.opened.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = conn.auth(&self.creds).await {
                self.count("auth", &e.to_string()).await;
                continue;
            }
            let mut kinds = BTreeMap::new();
            let (mut sent, mut answered) = (0u32, 0u32);
            while answered < self.per_connection && !self.stop.load(Ordering::Relaxed) {
                while sent < self.per_connection && sent - answered < self.window {
                    let id = conn.next_request_id();
                    let (kind, body) = self.request(n);
                    n += 1;
                    kinds.insert(id, kind);
                    if conn
                        .send_frame(&pb::ClientFrame {
                            id,
                            body: Some(body),
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                    sent += 1;
                    self.requests.fetch_add(1, Ordering::Relaxed);
                }
                let Ok(Ok(f)) =
                    tokio::time::timeout(Duration::from_secs(10), conn.next_frame()).await
                else {
                    break;
                };
                let Some(kind) = kinds.remove(&f.id) else {
                    continue;
                };
                answered += 1;
                let answer = match f.body {
                    Some(Out::Error(e)) => e.code().as_str_name(),
                    Some(_) => "ok",
                    None => "empty",
                };
                self.count(kind, answer).await;
            }
            drop(conn.close().await);
        }
        Ok(())
    }

    /// The `n`th request: sends, READ receipts, lookups and bundle fetches
    /// in turn.
    fn request(&self, n: u64) -> (&'static str, In) {
        match n % 4 {
            0 => (
                "send",
                In::Send(pb::Send {
                    client_msg_id: format!("f{}-{n}", self.seed),
                    to_user: self.victim,
                    payloads: vec![pb::DevicePayload {
                        device_id: self.victim_device,
                        payload: vec![0x5a; 1024].into(),
                    }],
                    first_attempt: true,
                    ..Default::default()
                }),
            ),
            1 => (
                "read_receipt",
                In::SendReceipt(pb::SendReceipt {
                    to_user: self.victim,
                    kind: pb::ReceiptKind::Read as i32,
                    client_msg_ids: vec![format!("r{}-{n}", self.seed)],
                    group_id: 0,
                }),
            ),
            2 => (
                "lookup",
                In::LookupUser(pb::LookupUser {
                    phone: format!("+1999{:07}", (self.seed * 1_000_003 + n) % 10_000_000),
                }),
            ),
            _ => (
                "fetch_bundles",
                In::FetchBundles(pb::FetchBundles {
                    user_id: self.victim,
                    ..Default::default()
                }),
            ),
        }
    }

    async fn count(&self, kind: &str, answer: &str) {
        *self
            .tally
            .lock()
            .await
            .entry(format!("{kind} {answer}"))
            .or_default() += 1;
    }
}
