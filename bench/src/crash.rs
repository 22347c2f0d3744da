//! The crash test: senders and receivers run while the server is killed
//! with SIGKILL at random moments and restarted on the same data dir. At the
//! end, every message that got ✓ must have been delivered to its receiver,
//! stored only once (redeliveries of the same entry are fine and counted),
//! and per sender→receiver pair in send order.
//!
//! The cluster form (`--nodes N`, the engines named by
//! `SWITCHBOARD_REDIS_URL` and `SWITCHBOARD_POSTGRES_URL`) starts N cluster
//! nodes, spreads the clients over them (a pair's sender and receiver on
//! different nodes), and each cycle kills a random node with SIGKILL and
//! starts it again; its clients reconnect to the next node meanwhile.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng;
use serde::Serialize;
use switchboard_client::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_client::{ConnectOptions, Connection, Credentials, Endpoint};
use tokio::sync::watch;

use crate::harness::progress;
use crate::server::{ServerProc, locate};

/// Options of `switchboard-bench crash`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Kill/restart cycles.
    #[arg(long, default_value_t = 20)]
    cycles: u32,
    /// Sender→receiver pairs (each pair is two users).
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Sends each sender keeps in flight.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Shortest run between kills, in ms.
    #[arg(long, default_value_t = 50)]
    min_run_ms: u64,
    /// Longest run between kills, in ms.
    #[arg(long, default_value_t = 400)]
    max_run_ms: u64,
    /// Path of the `switchboard` binary (default: next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Cluster form: this many cluster nodes (0: one embedded server). The
    /// engines come from SWITCHBOARD_REDIS_URL and SWITCHBOARD_POSTGRES_URL
    /// (`scripts/cluster.sh --nodes 0` prints them); use fresh engines.
    #[arg(long, default_value_t = 0)]
    nodes: usize,
    /// Seconds allowed for the final delivery check.
    #[arg(long, default_value_t = 60)]
    settle_secs: u64,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    cycles: u32,
    pairs: usize,
    sent: u64,
    acknowledged: u64,
    delivered: u64,
    redeliveries: u64,
    lost: u64,
    stored_twice: u64,
    order_violations: u64,
    unexpected: u64,
    /// Cluster nodes (0: one embedded server).
    nodes: usize,
    /// Longest time from SIGKILL to the restarted server (node) taking
    /// clients.
    max_restart_seconds: f64,
    seconds: f64,
    passed: bool,
}

fn options() -> ConnectOptions {
    let mut options = ConnectOptions::default();
    options.user_agent = "switchboard-bench/crash".into();
    options.connect_timeout = Duration::from_secs(5);
    options
}

async fn connect(addr: &str, creds: &Credentials) -> Result<Connection> {
    let endpoint: Endpoint = addr.parse().context("endpoint")?;
    let mut conn = Connection::connect(&endpoint, &options()).await?;
    conn.auth(creds).await?;
    Ok(conn)
}

async fn register(addr: &str, data_dir: &Path, phone: &str) -> Result<Credentials> {
    let endpoint: Endpoint = addr.parse().context("endpoint")?;
    let mut conn = Connection::connect(&endpoint, &options()).await?;
    conn.request_code(phone).await?;
    let code_file = data_dir.join("dev-codes").join(phone);
    let started = Instant::now();
    let code = loop {
        if let Ok(c) = tokio::fs::read_to_string(&code_file).await {
            break c.trim().to_owned();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "no dev code for {phone}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    Ok(conn.verify_code(phone, &code).await?)
}

/// Addresses of the servers (one, or the cluster's nodes); `None` while
/// one is down.
type Servers = watch::Receiver<Vec<Option<String>>>;

/// The address of server `prefer` (modulo their number), or of the next
/// one up; waits while none is.
async fn current(servers: &mut Servers, prefer: usize) -> Option<String> {
    loop {
        {
            let list = servers.borrow_and_update();
            let n = list.len().max(1);
            if let Some(a) = (0..n).find_map(|i| list.get((prefer + i) % n).cloned().flatten()) {
                return Some(a);
            }
        }
        if servers.changed().await.is_err() {
            return None;
        }
    }
}

/// A pause before registering again (a cluster node not yet linked to the
/// serving node answers STORAGE_UNAVAILABLE).
async fn registration_pause() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

fn msg_id(pair: usize, seq: u64) -> String {
    format!("p{pair}-{seq}")
}

fn parse_id(id: &str) -> Option<(usize, u64)> {
    let (p, s) = id.strip_prefix('p')?.split_once('-')?;
    Some((p.parse().ok()?, s.parse().ok()?))
}

struct SenderOut {
    sent: u64,
    acked: Vec<u64>,
}

/// Sends numbered messages, resending everything unacknowledged (in order,
/// same ids) after every reconnect.
async fn sender(
    pair: usize,
    creds: Credentials,
    to: Credentials,
    window: usize,
    mut servers: Servers,
    mut prefer: usize,
    stop: Arc<AtomicBool>,
) -> SenderOut {
    let mut next: u64 = 0;
    let mut pending: BTreeSet<u64> = BTreeSet::new();
    let mut acked = Vec::new();
    // `first` for a number's first frame; resends after a reconnect are not
    // (the server then looks for the original).
    let send = |seq: u64, first: bool| pb::ClientFrame {
        id: 0,
        body: Some(In::Send(pb::Send {
            client_msg_id: msg_id(pair, seq),
            to_user: to.user_id.get(),
            payloads: vec![pb::DevicePayload {
                device_id: to.device_id.get(),
                payload: seq.to_be_bytes().to_vec().into(),
            }],
            first_attempt: first,
            ..Default::default()
        })),
    };
    'connections: loop {
        if stop.load(Ordering::SeqCst) && pending.is_empty() {
            break;
        }
        let Some(addr) = current(&mut servers, prefer).await else {
            break;
        };
        let mut conn = match connect(&addr, &creds).await {
            Ok(c) => c,
            Err(_) => {
                // The server is down or restarting: try the next one.
                prefer += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let mut inflight: HashMap<u32, u64> = HashMap::new();
        let resend: Vec<u64> = pending.iter().copied().collect();
        for seq in resend {
            let mut f = send(seq, false);
            f.id = conn.next_request_id();
            inflight.insert(f.id, seq);
            if conn.send_frame(&f).await.is_err() {
                continue 'connections;
            }
        }
        loop {
            while !stop.load(Ordering::SeqCst) && inflight.len() < window {
                let seq = next;
                next += 1;
                pending.insert(seq);
                let mut f = send(seq, true);
                f.id = conn.next_request_id();
                inflight.insert(f.id, seq);
                if conn.send_frame(&f).await.is_err() {
                    continue 'connections;
                }
            }
            if stop.load(Ordering::SeqCst) && pending.is_empty() {
                break 'connections;
            }
            tokio::select! {
                frame = conn.next_frame() => {
                    let Ok(frame) = frame else { continue 'connections };
                    match frame.body {
                        Some(Out::SendOk(_)) => {
                            if let Some(seq) = inflight.remove(&frame.id) && pending.remove(&seq) {
                                acked.push(seq);
                            }
                        }
                        Some(Out::Error(e)) => {
                            // Retryable refusal: reconnect and resend in order.
                            tokio::time::sleep(Duration::from_millis(e.retry_after_ms.clamp(10, 1000))).await;
                            continue 'connections;
                        }
                        Some(Out::Deliver(d)) => {
                            let seqs: Vec<u64> = d.entries.iter().map(|e| e.seq).collect();
                            if conn.ack(&seqs).await.is_err() {
                                continue 'connections;
                            }
                        }
                        _ => {}
                    }
                }
                changed = servers.changed() => {
                    if changed.is_err() { break 'connections; }
                    continue 'connections;
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    }
    SenderOut { sent: next, acked }
}

#[derive(Default)]
struct ReceiverOut {
    /// Message numbers in first-arrival order.
    order: Vec<u64>,
    /// Message number → the queue seq it was stored under.
    stored_as: HashMap<u64, u64>,
    redeliveries: u64,
    stored_twice: u64,
    unexpected: u64,
}

/// Receives, acks, and records; returns once it has every number in
/// `expect` (sent by the orchestrator when the senders are done).
async fn receiver(
    pair: usize,
    creds: Credentials,
    mut servers: Servers,
    mut prefer: usize,
    mut expect: watch::Receiver<Option<Arc<BTreeSet<u64>>>>,
) -> ReceiverOut {
    let mut out = ReceiverOut::default();
    let done = |out: &ReceiverOut, expect: &Option<Arc<BTreeSet<u64>>>| {
        expect
            .as_ref()
            .is_some_and(|want| want.iter().all(|s| out.stored_as.contains_key(s)))
    };
    loop {
        if done(&out, &expect.borrow()) {
            return out;
        }
        let Some(addr) = current(&mut servers, prefer).await else {
            return out;
        };
        let Ok(mut conn) = connect(&addr, &creds).await else {
            prefer += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        loop {
            if done(&out, &expect.borrow()) {
                return out;
            }
            tokio::select! {
                frame = conn.next_frame() => {
                    let Ok(frame) = frame else { break };
                    if let Some(Out::Deliver(d)) = frame.body {
                        let mut seqs = Vec::with_capacity(d.entries.len());
                        for e in d.entries {
                            seqs.push(e.seq);
                            let Some(pb::queue_entry::Body::Message(m)) = e.body else { continue };
                            match parse_id(&m.client_msg_id) {
                                Some((p, n)) if p == pair => match out.stored_as.get(&n) {
                                    Some(q) if *q == e.seq => out.redeliveries += 1,
                                    Some(_) => out.stored_twice += 1,
                                    None => {
                                        out.stored_as.insert(n, e.seq);
                                        out.order.push(n);
                                    }
                                },
                                _ => out.unexpected += 1,
                            }
                        }
                        if conn.ack(&seqs).await.is_err() {
                            break;
                        }
                    }
                }
                changed = servers.changed() => {
                    if changed.is_err() { return out; }
                    break;
                }
                changed = expect.changed() => {
                    if changed.is_err() { return out; }
                }
            }
        }
    }
}

/// Runs the crash test; `Ok(true)` if every check passed.
pub async fn run(args: Args) -> Result<bool> {
    let started = Instant::now();
    let bin = locate(args.server_bin.clone())?;
    let dir = tempfile::tempdir().context("temp dir")?;
    let cluster = args.nodes > 0;
    if cluster {
        anyhow::ensure!(
            std::env::var_os("SWITCHBOARD_REDIS_URL").is_some()
                && std::env::var_os("SWITCHBOARD_POSTGRES_URL").is_some(),
            "--nodes needs SWITCHBOARD_REDIS_URL and SWITCHBOARD_POSTGRES_URL (scripts/cluster.sh --nodes 0 starts engines and prints them)"
        );
    }
    let data_of = |i: usize| dir.path().join(format!("data{i}"));
    let node_args = |i: usize| -> Vec<String> {
        vec![
            "--node-id".into(),
            format!("crash-{i}"),
            "--cluster-lease-ms".into(),
            "1000".into(),
        ]
    };
    let start = async |i: usize| {
        if cluster {
            ServerProc::start_node(&bin, &data_of(i), &node_args(i)).await
        } else {
            ServerProc::start(&bin, &data_of(i), &[]).await
        }
    };
    let mut servers = Vec::new();
    for i in 0..args.nodes.max(1) {
        servers.push(start(i).await?);
    }

    // Registered at the first server (a cluster node forwards once linked).
    let mut pairs = Vec::with_capacity(args.pairs);
    let registering = Instant::now();
    for p in 0..args.pairs {
        let (s, r) = loop {
            let first = &servers[0].tcp;
            let pair = async {
                let s = register(first, &data_of(0), &format!("+1555100{p:04}")).await?;
                let r = register(first, &data_of(0), &format!("+1555200{p:04}")).await?;
                Ok::<_, anyhow::Error>((s, r))
            };
            match pair.await {
                Ok(pair) => break pair,
                Err(_) if registering.elapsed() < Duration::from_secs(30) => {
                    registration_pause().await;
                }
                Err(e) => return Err(e).context("registration"),
            }
        };
        pairs.push((s, r));
    }
    let (servers_tx, servers_rx) = watch::channel(
        servers
            .iter()
            .map(|s| Some(s.tcp.clone()))
            .collect::<Vec<_>>(),
    );
    let (expect_txs, mut receivers, mut senders) = (Vec::new(), Vec::new(), Vec::new());
    let mut expect_txs = expect_txs;
    let stop = Arc::new(AtomicBool::new(false));
    for (p, (s, r)) in pairs.into_iter().enumerate() {
        let (etx, erx) = watch::channel(None);
        expect_txs.push(etx);
        // A pair's two ends on different nodes.
        receivers.push(tokio::spawn(receiver(
            p,
            r.clone(),
            servers_rx.clone(),
            p + 1,
            erx,
        )));
        senders.push(tokio::spawn(sender(
            p,
            s,
            r,
            args.window,
            servers_rx.clone(),
            p,
            stop.clone(),
        )));
    }

    let mut max_restart = Duration::ZERO;
    let bar = progress(u64::from(args.cycles), "kill/restart");
    for cycle in 0..args.cycles {
        let run_ms =
            rand::rng().random_range(args.min_run_ms..=args.max_run_ms.max(args.min_run_ms));
        tokio::time::sleep(Duration::from_millis(run_ms)).await;
        let victim = rand::rng().random_range(0..servers.len());
        servers_tx.send_modify(|list| list[victim] = None);
        let killed_at = Instant::now();
        let dead = servers.remove(victim);
        dead.kill().await?;
        let restarted = match start(victim).await {
            Ok(s) => s,
            Err(e) => {
                // Keep the evidence.
                let kept = dir.keep();
                return Err(e).with_context(|| {
                    format!(
                        "restart after kill {} (data dir kept at {})",
                        cycle + 1,
                        kept.display()
                    )
                });
            }
        };
        servers_tx.send_modify(|list| list[victim] = Some(restarted.tcp.clone()));
        servers.insert(victim, restarted);
        max_restart = max_restart.max(killed_at.elapsed());
        bar.inc(1);
    }
    bar.finish_and_clear();

    // Stop sending; let every pending send get its ✓.
    stop.store(true, Ordering::SeqCst);
    let settle = Duration::from_secs(args.settle_secs);
    let mut report = Report {
        cycles: args.cycles,
        pairs: args.pairs,
        nodes: args.nodes,
        max_restart_seconds: max_restart.as_secs_f64(),
        ..Report::default()
    };
    let mut acked_sets = Vec::new();
    for s in senders {
        let out = tokio::time::timeout(settle, s)
            .await
            .context("senders did not finish")??;
        report.sent += out.sent;
        report.acknowledged += out.acked.len() as u64;
        acked_sets.push(out.acked);
    }
    for (etx, acked) in expect_txs.iter().zip(&acked_sets) {
        let _ = etx.send(Some(Arc::new(acked.iter().copied().collect())));
    }
    for (r, acked) in receivers.into_iter().zip(&acked_sets) {
        let out = match tokio::time::timeout(settle, r).await {
            Ok(Ok(out)) => out,
            _ => {
                report.lost += acked.len() as u64;
                continue;
            }
        };
        report.delivered += out.order.len() as u64;
        report.redeliveries += out.redeliveries;
        report.stored_twice += out.stored_twice;
        report.unexpected += out.unexpected;
        report.lost += acked
            .iter()
            .filter(|n| !out.stored_as.contains_key(n))
            .count() as u64;
        report.order_violations += out.order.windows(2).filter(|w| w[0] > w[1]).count() as u64;
    }
    for server in servers {
        server.stop().await?;
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.passed = report.lost == 0
        && report.stored_twice == 0
        && report.order_violations == 0
        && report.unexpected == 0
        && report.acknowledged > 0;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "crash test{}: {} cycles, {} pairs, {} sent, {} acknowledged, {} delivered ({} redeliveries), lost {}, stored twice {}, order violations {}, unexpected {}, slowest restart {:.2}s — {} in {:.1}s",
            if cluster {
                format!(" ({} cluster nodes)", report.nodes)
            } else {
                String::new()
            },
            report.cycles,
            report.pairs,
            report.sent,
            report.acknowledged,
            report.delivered,
            report.redeliveries,
            report.lost,
            report.stored_twice,
            report.order_violations,
            report.unexpected,
            report.max_restart_seconds,
            if report.passed { "PASSED" } else { "FAILED" },
            report.seconds
        );
    }
    Ok(report.passed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_roundtrip() {
        assert_eq!(parse_id(&msg_id(3, 42)), Some((3, 42)));
        assert_eq!(parse_id("x"), None);
        assert_eq!(parse_id("p1-x"), None);
    }
}
