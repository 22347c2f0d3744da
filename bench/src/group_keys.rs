//! `group-keys`: how long a new sender's first message to a big group takes
//! through the SDK, sender-key distribution included: the member list
//! (`GetGroup`), a key bundle and a new Olm session for every member device,
//! the key sealed for each and sent in `SendGroupKeys` requests of 256
//! members, then the message sealed once with Megolm and `SendGroup`. The
//! ✓ of that first message is the figure; the ✓ of the sender's second
//! message (key already out) shows what the distribution added.
//!
//! Members are registered through the SDK (so their keys are published)
//! and stay offline: their queues keep the keys and the messages.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde_json::json;
use switchboard_client::{Client, ClientConfig, Credentials, Endpoint, UserId, register};
use tokio::sync::Semaphore;

use crate::harness::{Sut, Target, options, progress};

/// Phone numbers used: +1 then this prefix then the member's index.
const PHONE_PREFIX: u32 = 7_300_000;

/// Registrations at once (each makes an Olm account and uploads its keys).
const REGISTER_CONCURRENCY: usize = 16;

/// Options of `group-keys`.
#[derive(clap::Args, Debug)]
pub struct KeysArgs {
    #[command(flatten)]
    target: Target,
    /// Members of the group (2 to 1,024), one device each.
    #[arg(long, default_value_t = 1024)]
    members: usize,
    /// New senders to time, one after another (each a member that has not
    /// sent to the group before).
    #[arg(long, default_value_t = 3)]
    senders: usize,
}

/// Registers `n` users through the SDK, each with its own state directory
/// under `root` (so its keys are published and kept).
async fn register_members(
    endpoint: &Endpoint,
    data_dir: &Path,
    root: &Path,
    n: usize,
) -> Result<Vec<(Credentials, std::path::PathBuf)>> {
    let gate = std::sync::Arc::new(Semaphore::new(REGISTER_CONCURRENCY));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (endpoint, gate) = (endpoint.clone(), gate.clone());
        let codes = data_dir.join("dev-codes");
        let state = root.join(format!("m{i:04}"));
        let phone = format!("+1{PHONE_PREFIX:07}{i:06}");
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let opts = options("group-keys");
            register::request_code(&endpoint, &opts, &phone).await?;
            let file = codes.join(&phone);
            let started = Instant::now();
            let code = loop {
                if let Ok(c) = tokio::fs::read_to_string(&file).await {
                    break c.trim().to_owned();
                }
                anyhow::ensure!(
                    started.elapsed() < Duration::from_secs(30),
                    "no code for {phone}"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            };
            let creds = register::verify_code(&endpoint, &opts, &phone, &code, &state).await?;
            Ok::<_, anyhow::Error>((creds, state))
        }));
    }
    let bar = progress(n as u64, "registering");
    let mut users = Vec::with_capacity(n);
    for t in tasks {
        users.push(t.await??);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(users)
}

/// Starts a client for a member and drains its events in the background
/// (acknowledging what needs it).
async fn start(endpoint: &Endpoint, creds: &Credentials, state: &Path) -> Result<Client> {
    let mut config = ClientConfig::new(endpoint.clone());
    config.connect = options("group-keys");
    config.state_dir = Some(state.to_path_buf());
    let (client, mut events) = Client::start(config, creds.clone()).await?;
    let acker = client.clone();
    tokio::spawn(async move {
        use switchboard_client::Event;
        while let Some(event) = events.recv().await {
            let seq = match event {
                Event::Message { seq, .. }
                | Event::GroupMessage { seq, .. }
                | Event::Receipt { seq, .. } => seq,
                Event::Closed { .. } => break,
                _ => continue,
            };
            let _ = acker.ack([seq]).await;
        }
    });
    client.keys_published().await?;
    Ok(client)
}

pub async fn group_keys(a: KeysArgs) -> Result<bool> {
    if !(2..=1024).contains(&a.members) {
        bail!("--members must be 2 to 1024");
    }
    if a.senders == 0 || a.senders >= a.members {
        bail!("--senders must be 1 to members - 1");
    }
    let sut = Sut::start(&a.target, &[]).await?;
    let endpoint: Endpoint = sut.tcp.parse().context("endpoint")?;
    let root = tempfile::tempdir()?;
    let users = register_members(&endpoint, &sut.data_dir, root.path(), a.members).await?;
    let creator = start(&endpoint, &users[0].0, &users[0].1).await?;
    let others: Vec<UserId> = users[1..].iter().map(|(c, _)| c.user_id).collect();
    let group = creator.create_group("group-keys", &others).await?.group_id;
    creator.close().await?;
    let mut firsts = Vec::new();
    let mut seconds = Vec::new();
    for (creds, state) in users.iter().skip(1).take(a.senders) {
        let sender = start(&endpoint, creds, state).await?;
        let t = Instant::now();
        sender
            .send_to_group(group, Bytes::from_static(b"first message"))
            .await?;
        firsts.push(t.elapsed());
        let t = Instant::now();
        sender
            .send_to_group(group, Bytes::from_static(b"second message"))
            .await?;
        seconds.push(t.elapsed());
        sender.close().await?;
    }
    sut.stop().await?;
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let first: Vec<f64> = firsts.iter().map(ms).collect();
    let second: Vec<f64> = seconds.iter().map(ms).collect();
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    if a.target.json {
        println!(
            "{}",
            json!({
                "scenario": "group-keys",
                "members": a.members,
                "first_message_ms": first,
                "second_message_ms": second,
                "first_message_median_ms": median(&first),
                "second_message_median_ms": median(&second),
            })
        );
    } else {
        println!(
            "group-keys: {} members, one device each; {} new senders",
            a.members, a.senders
        );
        println!(
            "  first message (member list, {} bundles and Olm sessions, sender key to {} devices in {} requests, then the message): ✓ after {:.0} ms median ({:?})",
            a.members - 1,
            a.members - 1,
            (a.members - 1).div_ceil(256),
            median(&first),
            first.iter().map(|v| v.round()).collect::<Vec<_>>(),
        );
        println!(
            "  second message (key already out): ✓ after {:.1} ms median ({:?})",
            median(&second),
            second
                .iter()
                .map(|v| (v * 10.0).round() / 10.0)
                .collect::<Vec<_>>(),
        );
    }
    Ok(true)
}
