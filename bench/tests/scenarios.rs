//! Smoke runs of every load scenario: the tool works end to end against the
//! real server binary and prints its figures. Timings are not asserted here;
//! they are measured in release builds and written to docs/BENCHMARKS.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn run(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .args(args)
        .arg("--json")
        .output()
        .expect("run switchboard-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("one JSON report")
}

#[test]
fn idle_reports_memory_per_connection() {
    // `--rss-pid` measures another process too (a cluster's other node;
    // here this test's own process, which is surely alive).
    let me = std::process::id().to_string();
    let r = run(&[
        "idle",
        "--connections",
        "50",
        "--settle-secs",
        "1",
        "--phone-prefix",
        "2100000",
        "--rss-pid",
        &me,
    ]);
    assert_eq!(r["scenario"], "idle");
    assert_eq!(r["connections"], 50);
    assert!(r["server_rss_per_connection_bytes"].as_f64().is_some());
    let other = &r["other_processes"][0];
    assert_eq!(other["pid"].as_u64(), Some(u64::from(std::process::id())));
    assert!(other["rss_before_bytes"].as_u64().is_some_and(|b| b > 0));
    assert!(other["rss_per_connection_bytes"].as_f64().is_some());
}

#[test]
fn steady_delivers_measures_latency_and_compares_with_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("steady.svg");
    let r = run(&[
        "steady",
        "--users",
        "20",
        "--rate",
        "200",
        "--seconds",
        "2",
        "--plot",
        svg.to_str().unwrap(),
        "--timeline-ms",
        "500",
    ]);
    assert_eq!(r["scenario"], "steady");
    // Every delivery falls in one window of the timeline.
    let windows = r["timeline"].as_array().unwrap();
    assert!(!windows.is_empty());
    let in_windows: u64 = windows.iter().map(|w| w["count"].as_u64().unwrap()).sum();
    assert_eq!(in_windows, r["delivered"].as_u64().unwrap());
    assert_eq!(r["target"], "switchboard");
    assert!(r["acked"].as_u64().unwrap() > 0);
    assert!(r["delivered"].as_u64().unwrap() > 0);
    assert!(r["send_to_ack"]["p99_ms"].as_f64().unwrap() > 0.0);
    assert!(r["send_to_delivered"]["count"].as_u64().unwrap() > 0);
    // The server turns every acked delivery into a ✓✓ for its sender.
    assert!(r["receipts"].as_u64().unwrap() > 0, "{r}");
    // The same load against the relay, in the same run.
    assert_eq!(r["baseline"]["target"], "baseline");
    assert!(r["baseline"]["delivered"].as_u64().unwrap() > 0);
    assert!(r["ratio_to_baseline"].as_f64().unwrap() > 0.0);
    // Both processes worked while the traffic ran, and each step says so.
    for report in [&r, &r["baseline"]] {
        let cpu = &report["cpu"];
        assert!(cpu["target_cores"].as_f64().unwrap() > 0.0, "{cpu}");
        assert!(cpu["load_cores"].as_f64().unwrap() > 0.0, "{cpu}");
        assert!(cpu["load_cores_available"].as_u64().unwrap() >= 1, "{cpu}");
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg"), "{plot}");
    assert!(
        plot.contains("send→delivered"),
        "the legend names each line"
    );
}

#[test]
fn ramp_reports_a_knee_or_its_steps() {
    let r = run(&[
        "ramp",
        "--users",
        "10",
        "--rate",
        "50",
        "--seconds",
        "1",
        "--no-baseline",
    ]);
    assert_eq!(r["scenario"], "ramp");
    assert!(!r["steps"].as_array().unwrap().is_empty());
    assert!(r["baseline"].is_null());
}

#[test]
fn the_baseline_relay_forwards_and_finds_a_knee() {
    let r = run(&[
        "baseline",
        "--users",
        "10",
        "--rate",
        "50",
        "--seconds",
        "1",
    ]);
    assert_eq!(r["scenario"], "baseline");
    assert_eq!(r["target"], "baseline");
    let first = &r["steps"][0];
    assert!(first["delivered"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(first["errors"], 0);
    // 50/s for 1 s is far below any relay's limit: the first step holds.
    assert!(r["knee_per_sec"].as_u64().unwrap() >= 50, "{r}");
    // Without --baseline-receipts the relay sends no ✓✓.
    assert_eq!(first["receipts"], 0, "{r}");
}

#[test]
fn the_baseline_relay_with_receipts_answers_each_delivery_with_one() {
    let r = run(&[
        "baseline",
        "--users",
        "10",
        "--rate",
        "50",
        "--seconds",
        "1",
        "--refine",
        "0",
        "--baseline-receipts",
    ]);
    assert_eq!(r["target"], "baseline+receipts");
    let first = &r["steps"][0];
    let delivered = first["delivered"].as_u64().unwrap();
    assert!(delivered > 0, "{r}");
    // Every message delivered and acked within the step came back to its
    // sender as a receipt; the last few may still be on their way.
    let receipts = first["receipts"].as_u64().unwrap();
    assert!(receipts > 0 && receipts <= delivered, "{r}");
}

#[test]
fn offline_drain_delivers_everything() {
    let r = run(&["offline-drain", "--messages", "500"]);
    assert_eq!(r["received"], 500);
    assert!(r["drain_seconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn herd_authenticates_everyone() {
    let r = run(&["herd", "--clients", "100"]);
    assert_eq!(r["authenticated"], 100);
    assert_eq!(r["failed"], 0);
}

/// A tiny group-fanout: 8 members, short phases, two ramp steps.
const FANOUT_SMOKE: &[&str] = &[
    "group-fanout",
    "--members",
    "8",
    "--rate",
    "5",
    "--seconds",
    "2",
    "--ramp-from",
    "20",
    "--step-seconds",
    "1",
    "--max-steps",
    "2",
    "--refine",
    "0",
    "--disk-messages",
    "10",
    "--disk-rate",
    "20",
];

#[test]
fn group_fanout_reaches_every_member_and_compares_with_the_baseline() {
    let r = run(FANOUT_SMOKE);
    assert_eq!(r["scenario"], "group-fanout");
    assert_eq!(r["target"], "switchboard");
    assert_eq!(r["members"], 8);
    let latency = &r["latency"];
    let complete = latency["complete"].as_u64().unwrap();
    assert!(complete > 0, "{latency}");
    assert_eq!(latency["errors"], 0, "{latency}");
    // Each complete message reached the 7 other members.
    assert!(
        latency["deliveries"].as_u64().unwrap() >= 7 * complete,
        "{latency}"
    );
    assert!(latency["send_to_last_member"]["count"].as_u64().unwrap() > 0);
    assert!(latency["send_to_last_member"]["p50_ms"].as_f64().unwrap() > 0.0);
    assert!(latency["send_to_ack"]["count"].as_u64().unwrap() > 0);
    // The server turns each member's ack into a receipt for the sender.
    assert!(latency["receipts"].as_u64().unwrap() > 0, "{latency}");
    let disk = &r["disk"];
    assert!(disk["deliveries"].as_u64().unwrap() > 0, "{disk}");
    assert!(disk["bytes_per_delivery"].as_f64().is_some(), "{disk}");
    assert!(!r["ramp"]["steps"].as_array().unwrap().is_empty());
    // The relay, in the same run, fans out the same way.
    let b = &r["baseline"];
    assert_eq!(b["target"], "baseline");
    assert!(b["latency"]["deliveries"].as_u64().unwrap() > 0, "{b}");
    assert!(b["disk"].is_null());
    assert!(
        b["ramp"]["knee_msgs_per_sec"].as_f64().unwrap() >= 20.0,
        "{b}"
    );
    assert!(r["ratio_to_baseline"].as_f64().is_some(), "{r}");
}

#[test]
fn group_fanout_prints_its_summary() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .args(FANOUT_SMOKE)
        .arg("--no-baseline")
        .output()
        .expect("run switchboard-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "group-fanout [switchboard]: 8 members",
        "send→last member p50",
        "sustained fan-out (p99 send→last member ≤ 100 ms)",
        "bytes per member delivery",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("[baseline]"), "{stdout}");
    // The latency phase's line: "... reached every member, N deliveries".
    let deliveries: u64 = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("latency [switchboard]"))
        .and_then(|l| l.split("every member, ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("the latency phase's deliveries");
    assert!(deliveries > 0, "{stdout}");
}
