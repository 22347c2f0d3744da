//! Load scenarios against the real server over the real protocol: idle
//! memory, steady traffic, offline drain and the reconnect herd.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;
use switchboard_client::pb::{self, client_frame::Body as In, server_frame::Body as Out};
use switchboard_client::{Connection, Credentials};

use crate::harness::{
    CpuMeter, CpuUse, Latency, Sut, Target, connect_drained, histogram, latency, pin_load,
    print_json, progress, register_users, rss_of, start_relay, tcp_mem_bytes,
};
use crate::link::{Link, Plain};
use crate::plot;
use crate::server::ServerProc;

/// Concurrent registrations while setting up users.
const REGISTER_CONCURRENCY: usize = 64;

// ------------------------------------------------------------------ idle

/// Options of `idle`.
#[derive(clap::Args, Debug)]
pub struct IdleArgs {
    #[command(flatten)]
    target: Target,
    /// Authenticated connections to open (mind the open-file limit: this
    /// process holds one descriptor per connection).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Seconds to sit idle before measuring.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// First digits of the users' phone numbers, so that two runs against
    /// one server (one holding its connections while the other measures
    /// the memory each further connection adds) register different users.
    #[arg(long, default_value_t = 2_000_000)]
    phone_prefix: u32,
    /// Also measure these processes (repeatable): with `--server` pointed
    /// at a cluster's forwarding node, the node serving the partitions
    /// (and the forwarding node itself, which this tool did not start).
    #[arg(long = "rss-pid")]
    rss_pids: Vec<u32>,
}

#[derive(Serialize)]
struct IdleReport {
    scenario: &'static str,
    connections: usize,
    server_rss_before_bytes: Option<u64>,
    server_rss_after_bytes: Option<u64>,
    server_rss_per_connection_bytes: Option<f64>,
    kernel_tcp_mem_per_connection_bytes: Option<f64>,
    connect_seconds: f64,
    /// The processes named by `--rss-pid`: RSS before and after, and per
    /// connection.
    other_processes: Vec<ProcessRss>,
}

#[derive(Serialize)]
struct ProcessRss {
    pid: u32,
    rss_before_bytes: Option<u64>,
    rss_after_bytes: Option<u64>,
    rss_per_connection_bytes: Option<f64>,
}

pub async fn idle(a: IdleArgs) -> Result<bool> {
    let sut = Sut::start(&a.target, &[]).await?;
    let users = register_users(
        &sut.tcp,
        &sut.data_dir,
        a.phone_prefix,
        a.connections,
        REGISTER_CONCURRENCY,
    )
    .await
    .context("registering users")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = sut.rss_bytes();
    let others_before: Vec<Option<u64>> = a.rss_pids.iter().map(|p| rss_of(*p)).collect();
    let tcp_before = tcp_mem_bytes();
    let started = Instant::now();
    let mut conns = Vec::with_capacity(users.len());
    let bar = progress(users.len() as u64, "connecting");
    for chunk in users.chunks(500) {
        let mut tasks = Vec::new();
        for u in chunk {
            let (tcp, u) = (sut.tcp.clone(), u.clone());
            tasks.push(tokio::spawn(async move {
                connect_drained(&tcp, &u, "idle").await
            }));
        }
        for t in tasks {
            conns.push(t.await?.context("connecting")?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
    let rss_after = sut.rss_bytes();
    let tcp_after = tcp_mem_bytes();
    let n = conns.len() as f64;
    let per_connection = |before: Option<u64>, after: Option<u64>| {
        before
            .zip(after)
            .map(|(b, a)| a.saturating_sub(b) as f64 / n)
    };
    let other_processes: Vec<ProcessRss> = a
        .rss_pids
        .iter()
        .zip(others_before)
        .map(|(&pid, before)| {
            let after = rss_of(pid);
            ProcessRss {
                pid,
                rss_before_bytes: before,
                rss_after_bytes: after,
                rss_per_connection_bytes: per_connection(before, after),
            }
        })
        .collect();
    let report = IdleReport {
        scenario: "idle",
        connections: conns.len(),
        server_rss_before_bytes: rss_before,
        server_rss_after_bytes: rss_after,
        server_rss_per_connection_bytes: per_connection(rss_before, rss_after),
        // Both ends of each connection are on this machine: halve it.
        kernel_tcp_mem_per_connection_bytes: tcp_before
            .zip(tcp_after)
            .map(|(b, a)| a.saturating_sub(b) as f64 / n / 2.0),
        connect_seconds,
        other_processes,
    };
    if a.target.json {
        print_json(&report)?;
    } else {
        println!(
            "idle: {} connections in {:.2}s; server RSS {:?} -> {:?} = {:.0} bytes/connection; kernel TCP {:.0} bytes/connection",
            report.connections,
            connect_seconds,
            rss_before,
            rss_after,
            report.server_rss_per_connection_bytes.unwrap_or(f64::NAN),
            report
                .kernel_tcp_mem_per_connection_bytes
                .unwrap_or(f64::NAN)
        );
        for p in &report.other_processes {
            println!(
                "  process {}: RSS {:?} -> {:?} = {:.0} bytes/connection",
                p.pid,
                p.rss_before_bytes,
                p.rss_after_bytes,
                p.rss_per_connection_bytes.unwrap_or(f64::NAN)
            );
        }
    }
    drop(conns);
    sut.stop().await?;
    Ok(true)
}

// ------------------------------------------------------------------ steady

/// Options of `steady`, `ramp` and `baseline`.
#[derive(clap::Args, Debug)]
pub struct SteadyArgs {
    #[command(flatten)]
    target: Target,
    /// Online users, each on its own connection.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Offered load in messages per second, over all users (`steady`), or
    /// the first step (`ramp`, `baseline`).
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Seconds per measurement (per step for `ramp`).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    size: usize,
    /// Skip the baseline relay. By default `steady` and `ramp` also run the
    /// same load against the trivial relay after the server, and report the
    /// server's throughput as a ratio of it.
    #[arg(long)]
    no_baseline: bool,
    /// `ramp`, `baseline`: extra steps after the first failed one, each
    /// halving (on a log scale) the gap between the highest rate that held
    /// and the lowest that failed, so the knee is found within a factor of
    /// 1.5^(1/2^N) instead of 1.5.
    #[arg(long, default_value_t = 2)]
    refine: u32,
    /// Run the baseline relay with `--receipts`: it also turns each ack of a
    /// forwarded message into a delivery receipt for the sender, so it
    /// writes and reads as many frames per message as the server (✓, the
    /// message, ✓✓ and two acks). Reported as target "baseline+receipts".
    #[arg(long)]
    baseline_receipts: bool,
    /// `steady`: also print send→delivered per window of this many
    /// milliseconds of the run (by delivery time): count, p99 and max, to
    /// find when a latency spike happened (and match it with the server's
    /// log, `BENCH_SERVER_LOG`).
    #[arg(long)]
    timeline_ms: Option<u64>,
}

#[derive(Serialize, Clone)]
struct SteadyReport {
    scenario: &'static str,
    /// "switchboard" or "baseline".
    target: &'static str,
    users: usize,
    offered_per_sec: u64,
    sent: u64,
    acked: u64,
    delivered: u64,
    delivered_per_sec: f64,
    /// Delivery receipts (✓✓) the senders got.
    receipts: u64,
    errors: u64,
    send_to_ack: Latency,
    send_to_delivered: Latency,
    /// CPU used while the traffic ran.
    cpu: CpuUse,
}

/// One step's report and its histograms (µs), for plots.
struct Step {
    report: SteadyReport,
    acks: Histogram<u64>,
    deliveries: Histogram<u64>,
    /// (µs since the step began, send→delivered µs) of every delivery.
    delivered_at: Vec<(u64, u64)>,
    /// When the step began.
    began: std::time::SystemTime,
}

/// send→delivered in one window of a step.
#[derive(Debug, PartialEq, Serialize)]
struct Window {
    start_ms: u64,
    count: u64,
    p99_us: u64,
    max_us: u64,
}

/// Deliveries grouped by `window_ms` of delivery time, in time order
/// (windows with no delivery left out).
fn timeline(delivered_at: &[(u64, u64)], window_ms: u64) -> Vec<Window> {
    let width = window_ms.max(1) * 1000;
    let mut by_window: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for &(at, latency) in delivered_at {
        by_window.entry(at / width).or_default().push(latency);
    }
    by_window
        .into_iter()
        .map(|(w, mut v)| {
            v.sort_unstable();
            let n = v.len();
            // Nearest rank.
            let rank = (n * 99).div_ceil(100).clamp(1, n);
            Window {
                start_ms: w * window_ms.max(1),
                count: n as u64,
                p99_us: v.get(rank - 1).copied().unwrap_or(0),
                max_us: v.last().copied().unwrap_or(0),
            }
        })
        .collect()
}

/// Where the users connect: the real server or the baseline relay.
enum Driver {
    Server {
        tcp: String,
        users: Vec<Credentials>,
        /// The server's process id, if this tool started it.
        pid: Option<u32>,
    },
    Relay {
        tcp: String,
        users: usize,
        pid: Option<u32>,
        /// The relay sends delivery receipts.
        receipts: bool,
    },
}

impl Driver {
    fn target(&self) -> &'static str {
        match self {
            Self::Server { .. } => "switchboard",
            Self::Relay {
                receipts: false, ..
            } => "baseline",
            Self::Relay { receipts: true, .. } => "baseline+receipts",
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Self::Server { pid, .. } | Self::Relay { pid, .. } => *pid,
        }
    }

    fn users(&self) -> usize {
        match self {
            Self::Server { users, .. } => users.len(),
            Self::Relay { users, .. } => *users,
        }
    }

    /// Every user's (user id, device id).
    fn peers(&self) -> Arc<Vec<(u64, u32)>> {
        Arc::new(match self {
            Self::Server { users, .. } => users
                .iter()
                .map(|u| (u.user_id.get(), u.device_id.get()))
                .collect(),
            Self::Relay { users, .. } => (1..=*users as u64).map(|u| (u, 1)).collect(),
        })
    }

    /// One link per user, connected (and for the server, drained).
    async fn connect_all(&self) -> Result<Vec<Link>> {
        let n = self.users();
        let mut links = Vec::with_capacity(n);
        for start in (0..n).step_by(256) {
            let mut tasks = Vec::new();
            for i in start..(start + 256).min(n) {
                tasks.push(match self {
                    Self::Server { tcp, users, .. } => {
                        let (tcp, u) = (tcp.clone(), users[i].clone());
                        tokio::spawn(async move {
                            let c = connect_drained(&tcp, &u, "steady").await?;
                            Ok::<_, anyhow::Error>(Link::Server(Box::new(c)))
                        })
                    }
                    Self::Relay { tcp, .. } => {
                        let tcp = tcp.clone();
                        tokio::spawn(async move {
                            Ok(Link::Relay(
                                Plain::connect(&tcp, i as u64 + 1, false).await?,
                            ))
                        })
                    }
                });
            }
            for t in tasks {
                links.push(t.await??);
            }
        }
        Ok(links)
    }
}

/// Counters the user loops bump for the progress bar.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    delivered: AtomicU64,
}

/// What one user's loop measured. Latencies are raw samples (µs), merged
/// into histograms at the end: a histogram per user would cost ~100 KB
/// each, gigabytes for 10,000 users.
struct UserResult {
    acks: Vec<u64>,
    /// (µs since the step began, send→delivered µs).
    deliveries: Vec<(u64, u64)>,
    sent: u64,
    acked: u64,
    delivered: u64,
    receipts: u64,
    errors: u64,
}

/// One user's loop: send at its share of the rate to random peers, ack
/// everything delivered, time ✓ and delivery.
#[allow(clippy::too_many_arguments)]
async fn user_loop(
    mut link: Link,
    me: usize,
    peers: Arc<Vec<(u64, u32)>>,
    per_user_rate: f64,
    size: usize,
    epoch: Instant,
    until: Instant,
    counters: Arc<Counters>,
) -> Result<UserResult> {
    let mut r = UserResult {
        acks: Vec::new(),
        deliveries: Vec::new(),
        sent: 0,
        acked: 0,
        delivered: 0,
        receipts: 0,
        errors: 0,
    };
    let mut pending: HashMap<u32, Instant> = HashMap::new();
    let period = Duration::from_secs_f64(1.0 / per_user_rate.max(0.001));
    // Spread the users' first sends over one period.
    let offset = period.mul_f64(rand::rng().random::<f64>());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut counter = 0u64;
    let drain_until = until + Duration::from_secs(2);
    loop {
        let now = Instant::now();
        if now >= drain_until || (now >= until && pending.is_empty()) {
            break;
        }
        tokio::select! {
            _ = tick.tick(), if now < until => {
                // The tick may have fired after `until` while waiting.
                if Instant::now() >= until { continue; }
                let mut to = rand::rng().random_range(0..peers.len());
                if to == me { to = (to + 1) % peers.len(); }
                let (to_user, to_device) = peers[to];
                let mut payload = vec![0u8; size.max(8)];
                let t = epoch.elapsed().as_micros() as u64;
                payload[..8].copy_from_slice(&t.to_be_bytes());
                counter += 1;
                let id = link.next_request_id();
                pending.insert(id, Instant::now());
                link.send_frame(&pb::ClientFrame {
                    id,
                    body: Some(In::Send(pb::Send {
                        client_msg_id: format!("{me}-{counter}"),
                        to_user,
                        payloads: vec![pb::DevicePayload { device_id: to_device, payload: payload.into() }],
                        // Each id goes out once, as from the SDK.
                        first_attempt: true,
                        ..Default::default()
                    })),
                }).await?;
                r.sent += 1;
                counters.sent.fetch_add(1, Ordering::Relaxed);
            }
            frame = link.next_frame() => {
                let frame = frame?;
                match frame.body {
                    Some(Out::SendOk(_)) => {
                        if let Some(t0) = pending.remove(&frame.id) {
                            r.acks.push(t0.elapsed().as_micros().max(1) as u64);
                            r.acked += 1;
                        }
                    }
                    Some(Out::Error(_)) => {
                        pending.remove(&frame.id);
                        r.errors += 1;
                    }
                    Some(Out::Deliver(d)) => {
                        let now_us = epoch.elapsed().as_micros() as u64;
                        let mut seqs = Vec::with_capacity(d.entries.len());
                        for e in d.entries {
                            seqs.push(e.seq);
                            if let Some(pb::queue_entry::Body::Receipt(_)) = e.body {
                                r.receipts += 1;
                            } else if let Some(pb::queue_entry::Body::Message(m)) = e.body
                                && let Some(ts) = m.payload.get(..8)
                            {
                                let sent_us = u64::from_be_bytes(ts.try_into().unwrap_or([0; 8]));
                                r.deliveries.push((now_us, now_us.saturating_sub(sent_us).max(1)));
                                r.delivered += 1;
                                counters.delivered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        link.ack(&seqs).await?;
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(r)
}

/// Connects every user, runs the offered `rate` for `seconds`, and reports.
async fn steady_step(
    driver: &Driver,
    rate: u64,
    seconds: u64,
    size: usize,
    scenario: &'static str,
) -> Result<Step> {
    let links = driver.connect_all().await?;
    let peers = driver.peers();
    let n = links.len();
    let began = std::time::SystemTime::now();
    let epoch = Instant::now();
    let until = epoch + Duration::from_secs(seconds);
    let per_user = rate as f64 / n as f64;
    let counters = Arc::new(Counters::default());
    let cpu = CpuMeter::start(driver.pid());
    let mut tasks = Vec::with_capacity(n);
    for (i, link) in links.into_iter().enumerate() {
        tasks.push(tokio::spawn(user_loop(
            link,
            i,
            peers.clone(),
            per_user,
            size,
            epoch,
            until,
            counters.clone(),
        )));
    }
    let bar = progress(seconds, &format!("{} {rate}/s", driver.target()));
    let ticker = {
        let (bar, counters) = (bar.clone(), counters.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(250));
            loop {
                every.tick().await;
                bar.set_position(epoch.elapsed().as_secs().min(seconds));
                bar.set_message(format!(
                    "sent {} delivered {}",
                    counters.sent.load(Ordering::Relaxed),
                    counters.delivered.load(Ordering::Relaxed)
                ));
            }
        })
    };
    let mut step = Step {
        report: SteadyReport {
            scenario,
            target: driver.target(),
            users: n,
            offered_per_sec: rate,
            sent: 0,
            acked: 0,
            delivered: 0,
            delivered_per_sec: 0.0,
            receipts: 0,
            errors: 0,
            send_to_ack: Latency::default(),
            send_to_delivered: Latency::default(),
            cpu: CpuUse::default(),
        },
        acks: histogram()?,
        deliveries: histogram()?,
        delivered_at: Vec::new(),
        began,
    };
    for t in tasks {
        let u = t.await.context("user task")??;
        for v in u.acks {
            step.acks.saturating_record(v);
        }
        for (at, v) in u.deliveries {
            step.deliveries.saturating_record(v);
            step.delivered_at.push((at, v));
        }
        step.report.sent += u.sent;
        step.report.acked += u.acked;
        step.report.delivered += u.delivered;
        step.report.receipts += u.receipts;
        step.report.errors += u.errors;
    }
    step.report.cpu = cpu.finish();
    ticker.abort();
    bar.finish_and_clear();
    step.report.delivered_per_sec = step.report.delivered as f64 / seconds as f64;
    step.report.send_to_ack = latency(&step.acks);
    step.report.send_to_delivered = latency(&step.deliveries);
    Ok(step)
}

/// Registers `a.users` users on a fresh server (or the given one).
async fn server_driver(a: &SteadyArgs, prefix: u32) -> Result<(Sut, Driver)> {
    let sut = Sut::start(&a.target, &[]).await?;
    let users = register_users(
        &sut.tcp,
        &sut.data_dir,
        prefix,
        a.users,
        REGISTER_CONCURRENCY,
    )
    .await?;
    let driver = Driver::Server {
        tcp: sut.tcp.clone(),
        users,
        pid: sut.pid(),
    };
    Ok((sut, driver))
}

pub async fn steady(a: SteadyArgs) -> Result<bool> {
    let (sut, server) = server_driver(&a, 3_000_000).await?;
    let step = steady_step(&server, a.rate, a.seconds, a.size, "steady").await?;
    sut.stop().await?;
    let baseline = if a.no_baseline {
        None
    } else {
        let (relay, driver) = relay_driver(&a).await?;
        let b = steady_step(&driver, a.rate, a.seconds, a.size, "steady").await?;
        relay.stop().await?;
        Some(b)
    };
    #[derive(Serialize)]
    struct SteadyOutcome {
        #[serde(flatten)]
        run: SteadyReport,
        baseline: Option<SteadyReport>,
        /// Delivered msgs/s of the server over the relay's at the same rate.
        ratio_to_baseline: Option<f64>,
        /// With `--timeline-ms`: the server's send→delivered per window.
        #[serde(skip_serializing_if = "Option::is_none")]
        timeline: Option<Vec<Window>>,
    }
    let out = SteadyOutcome {
        run: step.report.clone(),
        ratio_to_baseline: baseline
            .as_ref()
            .map(|b| step.report.delivered_per_sec / b.report.delivered_per_sec.max(1e-9)),
        baseline: baseline.as_ref().map(|b| b.report.clone()),
        timeline: a.timeline_ms.map(|ms| timeline(&step.delivered_at, ms)),
    };
    if let Some(path) = &a.target.plot {
        let mut series = vec![
            ("send→✓".to_owned(), &step.acks),
            ("send→delivered".to_owned(), &step.deliveries),
        ];
        if let Some(b) = &baseline {
            series.push(("baseline send→delivered".to_owned(), &b.deliveries));
        }
        plot::percentiles(
            path,
            &format!("steady: {} users, {}/s offered", a.users, a.rate),
            &series,
        )?;
    }
    if a.target.json {
        print_json(&out)?;
    } else {
        print_steady(&out.run);
        if let Some(ms) = a.timeline_ms {
            print_timeline(&step, ms);
        }
        if let (Some(b), Some(ratio)) = (&out.baseline, out.ratio_to_baseline) {
            print_steady(b);
            if let (Some(ms), Some(step)) = (a.timeline_ms, &baseline) {
                print_timeline(step, ms);
            }
            println!("ratio to baseline (delivered/s): {ratio:.2}");
        }
    }
    Ok(out.run.errors == 0 || out.run.acked > 0)
}

fn print_timeline(step: &Step, window_ms: u64) {
    let began = step
        .began
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    println!(
        "  send→delivered per {window_ms} ms (from the step's start, unix time {}.{:03} s):",
        began.as_secs(),
        began.subsec_millis()
    );
    for w in timeline(&step.delivered_at, window_ms) {
        println!(
            "    +{:>6}ms n={:<6} p99={:.2}ms max={:.2}ms",
            w.start_ms,
            w.count,
            w.p99_us as f64 / 1000.0,
            w.max_us as f64 / 1000.0
        );
    }
}

fn print_steady(r: &SteadyReport) {
    println!(
        "{} [{}]: {} users, offered {}/s, delivered {:.0}/s ({} sent, {} ✓, {} delivered, {} ✓✓, {} errors)\n  {}\n  {}\n  send→✓         {}\n  send→delivered {}",
        r.scenario,
        r.target,
        r.users,
        r.offered_per_sec,
        r.delivered_per_sec,
        r.sent,
        r.acked,
        r.delivered,
        r.receipts,
        r.errors,
        r.cpu,
        r.cpu.per_message_us(r.delivered_per_sec),
        r.send_to_ack,
        r.send_to_delivered
    );
}

/// The knee of a ramp: where it stopped and every step on the way.
#[derive(Serialize)]
struct RampReport {
    scenario: &'static str,
    target: &'static str,
    /// The highest offered rate that was sustained (delivered ≥ 95% of it
    /// and p99 send→delivered ≤ 100 ms); none if the first step failed.
    knee_per_sec: Option<u64>,
    /// True if the ramp ran out of steps before failing: the real knee is
    /// higher.
    knee_is_lower_bound: bool,
    steps: Vec<SteadyReport>,
}

/// Raises the rate step by step until p99 send→delivered exceeds 100 ms or
/// delivery falls behind the offered rate.
async fn ramp_on(
    driver: &Driver,
    a: &SteadyArgs,
    scenario: &'static str,
) -> Result<(RampReport, Vec<Step>)> {
    const STEP: f64 = 1.5;
    const MAX_STEPS: usize = 12;
    let mut rate = a.rate;
    let mut report = RampReport {
        scenario,
        target: driver.target(),
        knee_per_sec: None,
        knee_is_lower_bound: false,
        steps: Vec::new(),
    };
    let mut steps = Vec::new();
    let mut failed = None;
    for i in 0..MAX_STEPS {
        let (ok, step) = ramp_step(driver, a, rate, scenario).await?;
        report.steps.push(step.report.clone());
        steps.push(step);
        if !ok {
            failed = Some(rate);
            break;
        }
        report.knee_per_sec = Some(rate);
        report.knee_is_lower_bound = i + 1 == MAX_STEPS;
        rate = (rate as f64 * STEP) as u64;
    }
    // Bisect (geometrically) between the knee and the first failed rate.
    // Each step follows an overloaded one: a pause first lets the target
    // work off that step's debt (queued entries, receipts, compaction) so
    // it is not charged to the next rate.
    const SETTLE: Duration = Duration::from_secs(5);
    if let (Some(mut good), Some(mut bad)) = (report.knee_per_sec, failed) {
        for _ in 0..a.refine {
            let mid = ((good as f64) * (bad as f64)).sqrt() as u64;
            if mid <= good || mid >= bad {
                break;
            }
            tokio::time::sleep(SETTLE).await;
            let (ok, step) = ramp_step(driver, a, mid, scenario).await?;
            report.steps.push(step.report.clone());
            steps.push(step);
            if ok {
                good = mid;
            } else {
                bad = mid;
            }
        }
        report.knee_per_sec = Some(good);
    }
    Ok((report, steps))
}

/// One ramp step: whether the rate held (p99 send→delivered within the
/// limit and delivery keeping up), and its report.
async fn ramp_step(
    driver: &Driver,
    a: &SteadyArgs,
    rate: u64,
    scenario: &'static str,
) -> Result<(bool, Step)> {
    const P99_LIMIT_MS: f64 = 100.0;
    const KEEP_UP: f64 = 0.95;
    let step = steady_step(driver, rate, a.seconds, a.size, scenario).await?;
    if !a.target.json {
        print_steady(&step.report);
    }
    let r = &step.report;
    let ok =
        r.send_to_delivered.p99_ms <= P99_LIMIT_MS && r.delivered_per_sec >= KEEP_UP * rate as f64;
    Ok((ok, step))
}

fn plot_ramp(path: &std::path::Path, title: &str, steps: &[Step]) -> Result<()> {
    let series: Vec<(String, &Histogram<u64>)> = steps
        .iter()
        .map(|s| {
            (
                format!("{} {}/s", s.report.target, s.report.offered_per_sec),
                &s.deliveries,
            )
        })
        .collect();
    plot::percentiles(path, title, &series)
}

fn print_knee(r: &RampReport) {
    println!(
        "{} [{}]: knee (max sustained rate, p99 send→delivered ≤ 100 ms) = {}{}",
        r.scenario,
        r.target,
        r.knee_per_sec.map_or_else(
            || "none (the first step failed)".to_owned(),
            |k| format!("{k}/s")
        ),
        if r.knee_is_lower_bound {
            " or more"
        } else {
            ""
        }
    );
}

pub async fn ramp(a: SteadyArgs) -> Result<bool> {
    let (sut, server) = server_driver(&a, 4_000_000).await?;
    let (report, mut steps) = ramp_on(&server, &a, "ramp").await?;
    sut.stop().await?;
    let baseline = if a.no_baseline {
        None
    } else {
        let (relay, driver) = relay_driver(&a).await?;
        let (b, b_steps) = ramp_on(&driver, &a, "ramp").await?;
        relay.stop().await?;
        steps.extend(b_steps);
        Some(b)
    };
    #[derive(Serialize)]
    struct RampOutcome {
        #[serde(flatten)]
        run: RampReport,
        baseline: Option<RampReport>,
        /// The server's knee over the relay's, measured in the same run.
        ratio_to_baseline: Option<f64>,
    }
    let ratio = match (
        report.knee_per_sec,
        baseline.as_ref().map(|b| b.knee_per_sec),
    ) {
        (Some(k), Some(Some(b))) => Some(k as f64 / b as f64),
        (None, Some(Some(_))) => Some(0.0),
        _ => None,
    };
    let out = RampOutcome {
        run: report,
        baseline,
        ratio_to_baseline: ratio,
    };
    if let Some(path) = &a.target.plot {
        plot_ramp(
            path,
            &format!("ramp: {} users, send→delivered per step", a.users),
            &steps,
        )?;
    }
    if a.target.json {
        print_json(&out)?;
    } else {
        print_knee(&out.run);
        if let Some(b) = &out.baseline {
            print_knee(b);
        }
        if let Some(r) = out.ratio_to_baseline {
            println!("ratio to baseline (knee): {r:.2}");
        }
    }
    Ok(true)
}

/// Starts the baseline relay and a driver for `a.users` users on it.
async fn relay_driver(a: &SteadyArgs) -> Result<(ServerProc, Driver)> {
    let relay = start_relay(&a.target, a.baseline_receipts).await?;
    let driver = Driver::Relay {
        tcp: relay.tcp.clone(),
        users: a.users,
        pid: relay.pid(),
        receipts: a.baseline_receipts,
    };
    Ok((relay, driver))
}

/// The ramp against the trivial relay alone.
pub async fn baseline(a: SteadyArgs) -> Result<bool> {
    pin_load(&a.target)?;
    let (relay, driver) = relay_driver(&a).await?;
    let (report, steps) = ramp_on(&driver, &a, "baseline").await?;
    relay.stop().await?;
    if let Some(path) = &a.target.plot {
        plot_ramp(
            path,
            &format!("baseline relay: {} users, send→delivered per step", a.users),
            &steps,
        )?;
    }
    if a.target.json {
        print_json(&report)?;
    } else {
        print_knee(&report);
    }
    Ok(true)
}

// ------------------------------------------------------------------ offline drain

/// Options of `offline-drain`.
#[derive(clap::Args, Debug)]
pub struct DrainArgs {
    #[command(flatten)]
    target: Target,
    /// Messages queued for the offline device.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    size: usize,
}

pub async fn offline_drain(a: DrainArgs) -> Result<bool> {
    const WINDOW: usize = 1000;
    let sut = Sut::start(&a.target, &[]).await?;
    let users = register_users(&sut.tcp, &sut.data_dir, 5_000_000, 2, 2).await?;
    let (alice, bob) = (&users[0], &users[1]);
    let mut conn = connect_drained(&sut.tcp, alice, "drain").await?;
    let queue_started = Instant::now();
    let (mut sent, mut acked) = (0usize, 0usize);
    let bar = progress(a.messages as u64, "queueing");
    while acked < a.messages {
        bar.set_position(acked as u64);
        while sent < a.messages && sent - acked < WINDOW {
            let id = conn.next_request_id();
            conn.send_frame(&pb::ClientFrame {
                id,
                body: Some(In::Send(pb::Send {
                    client_msg_id: format!("d{sent}"),
                    to_user: bob.user_id.get(),
                    payloads: vec![pb::DevicePayload {
                        device_id: bob.device_id.get(),
                        payload: vec![7u8; a.size].into(),
                    }],
                    first_attempt: true,
                    ..Default::default()
                })),
            })
            .await?;
            sent += 1;
        }
        match conn.next_frame().await?.body {
            Some(Out::SendOk(_)) => acked += 1,
            Some(Out::Error(e)) => anyhow::bail!("send refused: {e:?}"),
            _ => {}
        }
    }
    let queue_seconds = queue_started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let started = Instant::now();
    let b = connect_drained_counting(&sut.tcp, bob).await?;
    let drain_seconds = started.elapsed().as_secs_f64();
    let received = b.1;
    drop(b.0.close().await);
    #[derive(Serialize)]
    struct DrainReport {
        scenario: &'static str,
        messages: usize,
        received: usize,
        queue_seconds: f64,
        drain_seconds: f64,
        drain_per_sec: f64,
    }
    let report = DrainReport {
        scenario: "offline-drain",
        messages: a.messages,
        received,
        queue_seconds,
        drain_seconds,
        drain_per_sec: received as f64 / drain_seconds,
    };
    if a.target.json {
        print_json(&report)?;
    } else {
        println!(
            "offline-drain: queued {} in {:.2}s; connect → up to date with all {} acked in {:.3}s ({:.0}/s)",
            a.messages, queue_seconds, received, drain_seconds, report.drain_per_sec
        );
    }
    sut.stop().await?;
    Ok(received == a.messages)
}

/// Connects, drains and counts every queued entry.
pub async fn connect_drained_counting(
    tcp: &str,
    creds: &Credentials,
) -> Result<(Connection, usize)> {
    let endpoint: switchboard_client::Endpoint = tcp.parse().context("endpoint")?;
    let mut conn = Connection::connect(&endpoint, &crate::harness::options("drain")).await?;
    conn.auth(creds).await?;
    let mut n = 0;
    loop {
        match conn.next_frame().await?.body {
            Some(Out::Deliver(d)) => {
                n += d.entries.len();
                let seqs: Vec<u64> = d.entries.iter().map(|e| e.seq).collect();
                conn.ack(&seqs).await?;
            }
            Some(Out::UpToDate(_)) => return Ok((conn, n)),
            _ => {}
        }
    }
}

// ------------------------------------------------------------------ herd

/// Options of `herd`.
#[derive(clap::Args, Debug)]
pub struct HerdArgs {
    #[command(flatten)]
    target: Target,
    /// Clients connecting at once.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
}

pub async fn herd(a: HerdArgs) -> Result<bool> {
    const ATTEMPTS: u32 = 5;
    let sut = Sut::start(&a.target, &[]).await?;
    let users = register_users(
        &sut.tcp,
        &sut.data_dir,
        6_000_000,
        a.clients,
        REGISTER_CONCURRENCY,
    )
    .await?;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(users.len());
    for u in users {
        let tcp = sut.tcp.clone();
        tasks.push(tokio::spawn(async move {
            let mut retries = 0u32;
            loop {
                match connect_drained(&tcp, &u, "herd").await {
                    Ok(c) => return (Some(c), retries, started.elapsed()),
                    Err(_) if retries + 1 < ATTEMPTS => {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(50 * u64::from(retries))).await;
                    }
                    Err(_) => return (None, retries, started.elapsed()),
                }
            }
        }));
    }
    let mut h = histogram()?;
    let (mut ok, mut failed, mut retries) = (0usize, 0usize, 0u32);
    let mut conns = Vec::new();
    let bar = progress(a.clients as u64, "herd");
    for t in tasks {
        let (c, r, at) = t.await.context("herd task")?;
        bar.inc(1);
        retries += r;
        let _ = h.record(at.as_micros().max(1) as u64);
        match c {
            Some(c) => {
                ok += 1;
                conns.push(c);
            }
            None => failed += 1,
        }
    }
    let all_seconds = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    if let Some(path) = &a.target.plot {
        let title = format!(
            "herd: {} clients at once, time to authenticated and drained",
            a.clients
        );
        plot::percentiles(path, &title, &[("time to ready".to_owned(), &h)])?;
    }
    #[derive(Serialize)]
    struct HerdReport {
        scenario: &'static str,
        clients: usize,
        authenticated: usize,
        failed: usize,
        retries: u32,
        all_done_seconds: f64,
        time_to_ready: Latency,
    }
    let report = HerdReport {
        scenario: "herd",
        clients: a.clients,
        authenticated: ok,
        failed,
        retries,
        all_done_seconds: all_seconds,
        time_to_ready: latency(&h),
    };
    if a.target.json {
        print_json(&report)?;
    } else {
        println!(
            "herd: {} clients at once → {} authenticated and drained in {:.2}s ({} failed, {} retries); per client {}",
            a.clients, ok, all_seconds, failed, retries, report.time_to_ready
        );
    }
    drop(conns);
    sut.stop().await?;
    Ok(failed == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeline_groups_deliveries_by_window_with_p99_and_max() {
        // 100 deliveries in the first 100 ms window (1..=100 ms late), none
        // in the second, one in the third.
        let mut at: Vec<(u64, u64)> = (1..=100).map(|i| (i * 900, i * 1000)).collect();
        at.push((250_000, 7_000));
        let t = timeline(&at, 100);
        assert_eq!(
            t,
            vec![
                Window {
                    start_ms: 0,
                    count: 100,
                    p99_us: 99_000,
                    max_us: 100_000,
                },
                Window {
                    start_ms: 200,
                    count: 1,
                    p99_us: 7_000,
                    max_us: 7_000,
                },
            ]
        );
    }
}
