//! Failover of a cluster node under its clients: N clients connected to
//! one node of a two-node cluster; that node is killed (SIGKILL, or SIGTERM
//! for a clean restart); every client notices, reconnects to the other
//! node and drains. Measures the time from the signal until each client is
//! authenticated and up to date there, and until all are.
//!
//! `--victim serving` kills the node that owns the partitions (the other
//! must take them over first: detection, then takeover, then the herd);
//! `--victim forwarding` kills a node that only holds connections (the
//! herd alone). The engines come from `SWITCHBOARD_REDIS_URL` and
//! `SWITCHBOARD_POSTGRES_URL` (`scripts/cluster.sh --nodes 0`); use fresh
//! ones.
//!
//! `--bystanders N` (with `--victim serving`) also connects N other
//! clients to a node that survives, the one that will take over
//! (`--bystander-node survivor`) or a third node started for them
//! (`third`): they must keep their connections. Each waits, on the
//! connection it had, for the drain that follows its re-attachment to the
//! new serving node (a second `UpToDate`); the bench reports how many kept
//! their connection and how long re-attaching took.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use switchboard_client::pb::server_frame::Body as Out;
use tokio::sync::Semaphore;

use crate::harness::{
    Latency, connect_drained, histogram, latency, print_json, progress, register_users,
};
use crate::server::{ServerProc, locate};

/// Which node dies.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Victim {
    /// The node owning the partitions.
    Serving,
    /// A node forwarding to it.
    Forwarding,
}

/// How it dies.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Signal {
    /// SIGKILL: a crash.
    Kill,
    /// SIGTERM: a clean restart.
    Term,
}

/// Where the bystanders connect.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BystanderNode {
    /// The node the victim's clients reconnect to.
    Survivor,
    /// A third node, started for them.
    Third,
}

/// Options of `failover`.
#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// Clients connected to the node that dies.
    #[arg(long, default_value_t = 5000)]
    clients: usize,
    /// Which node dies.
    #[arg(long, value_enum, default_value_t = Victim::Serving)]
    victim: Victim,
    /// How it dies.
    #[arg(long, value_enum, default_value_t = Signal::Kill)]
    signal: Signal,
    /// Clients on a surviving node, which must keep their connections
    /// (with `--victim serving`).
    #[arg(long, default_value_t = 0)]
    bystanders: usize,
    /// Where the bystanders connect.
    #[arg(long, value_enum, default_value_t = BystanderNode::Survivor)]
    bystander_node: BystanderNode,
    /// The nodes' `cluster_lease_ms` (default: the server's default).
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Path of the `switchboard` binary (default: next to this one).
    #[arg(long)]
    server_bin: Option<std::path::PathBuf>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

/// Registrations in flight at once.
const REGISTER_CONCURRENCY: usize = 64;
/// Connections opened at once before the kill.
const CONNECT_CONCURRENCY: usize = 256;
/// How long a client keeps trying to get back.
const GIVE_UP: Duration = Duration::from_secs(60);

#[derive(Serialize)]
struct Report {
    scenario: &'static str,
    clients: usize,
    victim: Victim,
    signal: Signal,
    lease_ms: Option<u64>,
    back: usize,
    failed: usize,
    retries: u64,
    all_back_seconds: f64,
    time_to_back: Latency,
    bystanders: usize,
    bystander_node: BystanderNode,
    /// Bystanders drained again on the connection they had.
    bystanders_kept: usize,
    /// Bystanders whose connection ended (or that never were re-attached).
    bystanders_dropped: usize,
    bystanders_all_seconds: f64,
    time_to_reattach: Latency,
}

/// Runs the scenario; `Ok(true)` when every client got back.
pub async fn failover(a: FailoverArgs) -> Result<bool> {
    anyhow::ensure!(
        std::env::var_os("SWITCHBOARD_REDIS_URL").is_some()
            && std::env::var_os("SWITCHBOARD_POSTGRES_URL").is_some(),
        "failover needs SWITCHBOARD_REDIS_URL and SWITCHBOARD_POSTGRES_URL (scripts/cluster.sh --nodes 0 starts engines and prints them)"
    );
    anyhow::ensure!(
        a.bystanders == 0 || a.victim == Victim::Serving,
        "--bystanders needs --victim serving (only then do the survivors' connections change node)"
    );
    let bin = locate(a.server_bin.clone())?;
    let dir = tempfile::tempdir().context("temp dir")?;
    let data_of = |i: usize| dir.path().join(format!("node{i}"));
    let args_of = |i: usize| {
        let mut v = vec!["--node-id".to_owned(), format!("failover-{i}")];
        if let Some(ms) = a.lease_ms {
            v.extend(["--cluster-lease-ms".to_owned(), ms.to_string()]);
        }
        v
    };
    // Node 0 serves (it starts first); node 1 forwards to it.
    let serving = ServerProc::start(&bin, &data_of(0), &args_of(0)).await?;
    let forwarding = ServerProc::start_node(&bin, &data_of(1), &args_of(1)).await?;
    let third = match (a.bystanders, a.bystander_node) {
        (1.., BystanderNode::Third) => {
            Some(ServerProc::start_node(&bin, &data_of(2), &args_of(2)).await?)
        }
        _ => None,
    };
    let mut users = register_users(
        &serving.tcp,
        &data_of(0),
        // Fresh numbers per run: the engines may hold earlier runs'.
        7_000_000 + rand::random::<u32>() % 1_000_000,
        a.clients + a.bystanders,
        REGISTER_CONCURRENCY,
    )
    .await?;
    let bystander_users = users.split_off(a.clients);
    let (victim, survivor) = match a.victim {
        Victim::Serving => (serving, forwarding),
        Victim::Forwarding => (forwarding, serving),
    };
    let (victim_tcp, survivor_tcp) = (victim.tcp.clone(), survivor.tcp.clone());

    let killed_at = Arc::new(OnceLock::<Instant>::new());
    let connected = Arc::new(Semaphore::new(0));
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let mut tasks = Vec::with_capacity(users.len());
    for u in users {
        let (victim_tcp, survivor_tcp) = (victim_tcp.clone(), survivor_tcp.clone());
        let (killed_at, connected, gate) = (killed_at.clone(), connected.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let conn = {
                let _permit = gate.acquire().await?;
                connect_drained(&victim_tcp, &u, "failover").await?
            };
            connected.add_permits(1);
            let mut conn = conn;
            // Until the node ends the connection.
            loop {
                match conn.next_frame().await {
                    Ok(f) if matches!(f.body, Some(Out::Goodbye(_))) => break,
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            drop(conn);
            let mut retries = 0u64;
            loop {
                match connect_drained(&survivor_tcp, &u, "failover").await {
                    Ok(c) => {
                        let at = killed_at.get().map_or(Duration::ZERO, Instant::elapsed);
                        return Ok::<_, anyhow::Error>((Some(c), retries, at));
                    }
                    Err(_) if killed_at.get().is_some_and(|k| k.elapsed() < GIVE_UP) => {
                        retries += 1;
                        // Clients back off with jitter, as the SDK does.
                        let pause = 50 + rand::random::<u64>() % 200;
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                    Err(_) => return Ok((None, retries, GIVE_UP)),
                }
            }
        }));
    }
    let bystander_tcp = match &third {
        Some(t) => t.tcp.clone(),
        None => survivor_tcp.clone(),
    };
    let mut watchers = Vec::with_capacity(bystander_users.len());
    for u in bystander_users {
        let tcp = bystander_tcp.clone();
        let (killed_at, connected, gate) = (killed_at.clone(), connected.clone(), gate.clone());
        watchers.push(tokio::spawn(async move {
            let mut conn = {
                let _permit = gate.acquire().await?;
                connect_drained(&tcp, &u, "failover-bystander").await?
            };
            connected.add_permits(1);
            // On the same connection: the drain after re-attachment.
            let kept = tokio::time::timeout(GIVE_UP, async {
                loop {
                    match conn.next_frame().await {
                        Ok(f) => match f.body {
                            Some(Out::UpToDate(_)) if killed_at.get().is_some() => return true,
                            Some(Out::Deliver(d)) => {
                                let seqs: Vec<u64> = d.entries.iter().map(|e| e.seq).collect();
                                if conn.ack(&seqs).await.is_err() {
                                    return false;
                                }
                            }
                            Some(Out::Goodbye(_)) => return false,
                            _ => {}
                        },
                        Err(_) => return false,
                    }
                }
            })
            .await
            .unwrap_or(false);
            let at = killed_at.get().map_or(Duration::ZERO, Instant::elapsed);
            Ok::<_, anyhow::Error>((kept.then_some(conn), at))
        }));
    }
    let n = u32::try_from(a.clients + a.bystanders).context("too many clients")?;
    connected
        .acquire_many(n)
        .await
        .context("connecting the clients")?
        .forget();

    // The signal; the clock starts.
    let _ = killed_at.set(Instant::now());
    match a.signal {
        Signal::Kill => victim.kill().await?,
        Signal::Term => victim.stop().await?,
    }
    let mut h = histogram()?;
    let (mut back, mut failed, mut retries) = (0usize, 0usize, 0u64);
    let mut conns = Vec::with_capacity(a.clients);
    let bar = progress(a.clients as u64, "failover");
    for t in tasks {
        let (c, r, at) = t.await.context("client task")??;
        bar.inc(1);
        retries += r;
        let _ = h.record(at.as_micros().max(1) as u64);
        match c {
            Some(c) => {
                back += 1;
                conns.push(c);
            }
            None => failed += 1,
        }
    }
    bar.finish_and_clear();
    let all_back_seconds = h.max() as f64 / 1e6;
    let mut reattach = histogram()?;
    let (mut kept, mut dropped) = (0usize, 0usize);
    for t in watchers {
        let (c, at) = t.await.context("bystander task")??;
        match c {
            Some(c) => {
                kept += 1;
                let _ = reattach.record(at.as_micros().max(1) as u64);
                conns.push(c);
            }
            None => dropped += 1,
        }
    }
    let report = Report {
        scenario: "failover",
        clients: a.clients,
        victim: a.victim,
        signal: a.signal,
        lease_ms: a.lease_ms,
        back,
        failed,
        retries,
        all_back_seconds,
        time_to_back: latency(&h),
        bystanders: a.bystanders,
        bystander_node: a.bystander_node,
        bystanders_kept: kept,
        bystanders_dropped: dropped,
        bystanders_all_seconds: reattach.max() as f64 / 1e6,
        time_to_reattach: latency(&reattach),
    };
    drop(conns);
    survivor.stop().await?;
    if let Some(t) = third {
        t.stop().await?;
    }
    if a.json {
        print_json(&report)?;
    } else {
        println!(
            "failover: {} clients on the {:?} node, {:?} → {} back on the other node and drained, all within {:.2}s ({} failed, {} retries); per client {}",
            a.clients,
            a.victim,
            a.signal,
            back,
            all_back_seconds,
            failed,
            retries,
            report.time_to_back
        );
        if a.bystanders > 0 {
            println!(
                "bystanders: {} on the {:?} node → {} kept their connection and were drained again on it, all within {:.2}s ({} dropped); per client {}",
                a.bystanders,
                a.bystander_node,
                kept,
                report.bystanders_all_seconds,
                dropped,
                report.time_to_reattach
            );
        }
    }
    Ok(failed == 0 && dropped == 0)
}
