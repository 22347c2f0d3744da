//! Cluster mode's PostgreSQL schema against a real PostgreSQL: migrated
//! once by `switchboard migrate` or at a node's start, safely by two nodes
//! at once, and a schema newer than the build is refused; a node set up
//! for a cluster does not fall back to its embedded store.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod engines;

use std::process::{Command, Output};

use engines::Postgres;
use switchboard_server::cluster::schema;

fn switchboard(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.args(args);
    for s in switchboard_server::config::settings() {
        cmd.env_remove(&s.env);
    }
    cmd.env_remove("SWITCHBOARD_CONFIG");
    cmd.output().expect("run switchboard")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn migrate_creates_the_schema_once_and_refuses_a_newer_one() {
    let pg = Postgres::start().await;
    let url = pg.url();
    let out = switchboard(&["migrate", "--postgres-url", &url]);
    assert!(out.status.success(), "{}", text(&out));
    let latest = schema::latest();
    assert!(
        text(&out).contains(&format!("schema at version {latest} (was 0;")),
        "{}",
        text(&out)
    );
    // Again: nothing to do.
    let out = switchboard(&["migrate", "--postgres-url", &url]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("(was {latest};")),
        "{}",
        text(&out)
    );
    let client = schema::connect(&url).await.unwrap();
    assert_eq!(schema::version(&client).await.unwrap(), latest);
    for table in [
        "users",
        "phones",
        "codes",
        "link_codes",
        "device_keys",
        "one_time_keys",
        "groups",
        "group_seqs",
        "group_members",
    ] {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("table {table}: {e}"))
            .get(0);
        assert_eq!(n, 0, "{table}");
    }
    // A newer build migrated it: this one refuses, and changes nothing.
    client
        .execute(
            "INSERT INTO switchboard_schema (version, name) VALUES ($1, 'from the future')",
            &[&(latest + 1)],
        )
        .await
        .unwrap();
    let out = switchboard(&["migrate", "--postgres-url", &url]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!(
            "schema is at version {}, newer than this build knows ({latest})",
            latest + 1
        )),
        "{}",
        text(&out)
    );
    let dir = tempfile::tempdir().unwrap();
    let out = switchboard(&[
        "serve",
        "--postgres-url",
        &url,
        "--redis-url",
        "redis://127.0.0.1:1",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--tcp-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("newer than this build knows"),
        "{}",
        text(&out)
    );
    assert_eq!(schema::version(&client).await.unwrap(), latest + 1);
}

#[tokio::test]
async fn two_nodes_migrating_at_once_take_turns() {
    let pg = Postgres::start().await;
    let mut a = schema::connect(&pg.url()).await.unwrap();
    let mut b = schema::connect(&pg.url()).await.unwrap();
    let (ra, rb) = tokio::join!(schema::migrate(&mut a), schema::migrate(&mut b));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let latest = schema::latest();
    // One did the work, the other found it done.
    let mut froms = [ra.from, rb.from];
    froms.sort_unstable();
    assert_eq!(froms, [0, latest]);
    let rows: i64 = a
        .query_one("SELECT count(*) FROM switchboard_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, i64::from(latest));
}

#[tokio::test]
async fn a_node_whose_redis_is_down_migrates_then_stops_rather_than_serve_embedded() {
    let pg = Postgres::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let common = [
        "--data-dir",
        data,
        "--tcp-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ];
    // One engine alone is a configuration error.
    let mut args = vec!["serve", "--postgres-url", "host=127.0.0.1 port=1"];
    args.extend(common);
    let out = switchboard(&args);
    assert!(!out.status.success());
    assert!(
        text(&out)
            .contains("cluster mode needs both redis_url and postgres_url (redis_url is empty)"),
        "{}",
        text(&out)
    );
    // Both, with Redis unreachable: the schema is migrated, then the node
    // says clearly that it cannot reach the cluster store (rather than
    // serving from its data dir).
    let url = pg.url();
    let mut args = vec![
        "serve",
        "--postgres-url",
        &url,
        "--redis-url",
        "redis://127.0.0.1:1",
    ];
    args.extend(common);
    let out = switchboard(&args);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot open the cluster store: storage engine: Redis"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("switchboard ready"), "{}", text(&out));
    let client = schema::connect(&url).await.unwrap();
    assert_eq!(schema::version(&client).await.unwrap(), schema::latest());
}
