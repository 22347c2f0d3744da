//! Every metric docs/OPERATIONS.md documents is on /metrics of a fresh
//! server, before anything happened: an alert on a missing series never
//! fires. The test reads the doc's tables, so it follows the doc.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

/// The series names in the first column of the tables under "## Metrics".
fn documented_metrics() -> Vec<String> {
    let doc = include_str!("../../docs/OPERATIONS.md");
    let start = doc
        .find("\n## Metrics")
        .expect("OPERATIONS.md has a Metrics section");
    let section = &doc[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let mut names = Vec::new();
    for line in section[..end].lines() {
        let Some(row) = line.strip_prefix("| `") else {
            continue;
        };
        let first_cell = row.split(" |").next().unwrap_or_default();
        for name in format!("`{first_cell}").split('`').skip(1).step_by(2) {
            let base = name.split('{').next().unwrap_or_default().trim();
            if !base.is_empty() {
                names.push(format!("switchboard_{base}"));
            }
        }
    }
    names
}

fn has_series(text: &str, name: &str) -> bool {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .any(|series| {
            series == name
                || ["_bucket", "_count", "_sum"]
                    .iter()
                    .any(|s| series.strip_suffix(s) == Some(name))
        })
}

#[tokio::test]
async fn every_documented_metric_is_present_from_the_start() {
    let documented = documented_metrics();
    assert!(
        documented.len() >= 20,
        "doc parse found only {documented:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let p = spawn_server(dir.path(), &[]).await;
    let (status, text) = http_get(&p.http, "/metrics").await;
    assert_eq!(status, 200);
    let missing: Vec<&String> = documented
        .iter()
        .filter(|n| !has_series(&text, n))
        .collect();
    assert!(missing.is_empty(), "missing {missing:?} from:\n{text}");
}
