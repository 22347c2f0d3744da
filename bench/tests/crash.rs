//! The crash test in its short form (CI): at least 20 SIGKILL/restart
//! cycles of the real server binary, zero acknowledged messages lost.
//! The long form (≥ 500 cycles) is documented in docs/BENCHMARKS.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn twenty_kill_restart_cycles_lose_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .args(["crash", "--cycles", "20", "--pairs", "6", "--json"])
        .output()
        .expect("run switchboard-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "crash test failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON report");
    assert_eq!(report["cycles"], 20);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["stored_twice"], 0);
    assert_eq!(report["order_violations"], 0);
    assert!(report["acknowledged"].as_u64().unwrap() > 0);
}

#[path = "../../server/tests/engines/mod.rs"]
mod engines;

/// The cluster form in short (issue #21): 3 nodes on a real PostgreSQL and
/// a real 3+3 Redis Cluster, clients spread over them, 10 cycles each
/// killing a random node with SIGKILL; the long form is in
/// docs/BENCHMARKS.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_cluster_nodes_loses_nothing() {
    let pg = engines::Postgres::start().await;
    let redis = tokio::task::spawn_blocking(engines::RedisCluster::start)
        .await
        .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard-bench"))
        .args([
            "crash",
            "--nodes",
            "3",
            "--cycles",
            "10",
            "--pairs",
            "4",
            "--min-run-ms",
            "300",
            "--max-run-ms",
            "1000",
            "--json",
        ])
        .env("SWITCHBOARD_REDIS_URL", redis.url())
        .env("SWITCHBOARD_POSTGRES_URL", pg.url())
        .output()
        .await
        .expect("run switchboard-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cluster crash test failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON report");
    assert_eq!(report["nodes"], 3);
    assert_eq!(report["cycles"], 10);
    assert_eq!(report["lost"], 0);
    assert_eq!(report["stored_twice"], 0);
    assert_eq!(report["order_violations"], 0);
    assert!(report["acknowledged"].as_u64().unwrap() > 0);
}
