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
