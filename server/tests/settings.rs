//! Every setting works from the config file, its `SWITCHBOARD_*`
//! environment variable and its flag. The walk covers every key of the
//! default configuration, so settings added later are covered too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

use switchboard_server::config::settings;

fn switchboard(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.args(args);
    for s in settings() {
        cmd.env_remove(&s.env);
    }
    cmd.env_remove("SWITCHBOARD_CONFIG");
    cmd.envs(env.iter().copied());
    cmd.output().expect("run switchboard")
}

fn effective(args: &[&str], env: &[(&str, &str)]) -> toml::Table {
    let out = switchboard(args, env);
    assert!(
        out.status.success(),
        "switchboard {args:?} {env:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    toml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("config prints TOML")
}

/// A valid value different from the default, as text and as the TOML
/// value `switchboard config` should then print.
fn other_value(key: &str, default: &toml::Value) -> (String, toml::Value) {
    match default {
        toml::Value::Integer(i) => {
            let v = if *i > 1 { i - 1 } else { i + 1 };
            (v.to_string(), toml::Value::Integer(v))
        }
        toml::Value::Boolean(b) => (format!("{}", !b), toml::Value::Boolean(!b)),
        toml::Value::Float(f) => {
            let v = f * 2.0 + 1.0;
            (v.to_string(), toml::Value::Float(v))
        }
        toml::Value::String(s) => {
            let v = if let Ok(mut addr) = s.parse::<std::net::SocketAddr>() {
                addr.set_port(addr.port().wrapping_add(1).max(1));
                addr.to_string()
            } else if key == "log_format" {
                "json".to_owned()
            } else if key == "code_sender" {
                // Another valid choice on the loopback defaults.
                "dev".to_owned()
            } else {
                format!("{s}-other")
            };
            (v.clone(), toml::Value::String(v))
        }
        other => panic!("setting {key}: add a test value for {other:?}"),
    }
}

#[test]
fn every_setting_works_from_env_and_flag() {
    let defaults = effective(&["config"], &[]);
    assert_eq!(defaults.len(), settings().len(), "{defaults:?}");
    for s in settings() {
        let default = &defaults[&s.key];
        let (text, want) = other_value(&s.key, default);
        let from_env = effective(&["config"], &[(&s.env, &text)]);
        assert_eq!(from_env[&s.key], want, "env {}={text}", s.env);
        let flag = format!("--{}", s.flag);
        let from_flag = effective(&["config", &flag, &text], &[]);
        assert_eq!(from_flag[&s.key], want, "{flag} {text}");
        // Nothing else moved.
        for (k, v) in &defaults {
            if *k != s.key {
                assert_eq!(&from_flag[k], v, "{flag} changed {k}");
                assert_eq!(&from_env[k], v, "{} changed {k}", s.env);
            }
        }
    }
}

#[test]
fn help_describes_every_setting() {
    let out = switchboard(&["serve", "--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in settings() {
        assert!(
            help.contains(&format!("--{} ", s.flag)),
            "no --{} in help",
            s.flag
        );
        assert!(help.contains(&s.env), "no {} in help", s.env);
    }
    assert!(help.contains("--config"), "{help}");
}

#[test]
fn flags_beat_env_beat_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("switchboard.toml");
    std::fs::write(&file, "drain_batch = 10\nmax_unacked = 500\nshards = 2\n").unwrap();
    let path = file.to_str().unwrap();
    let c = effective(
        &["config", "--config", path, "--drain-batch", "30"],
        &[
            ("SWITCHBOARD_DRAIN_BATCH", "20"),
            ("SWITCHBOARD_MAX_UNACKED", "600"),
        ],
    );
    assert_eq!(c["drain_batch"].as_integer(), Some(30));
    assert_eq!(c["max_unacked"].as_integer(), Some(600));
    assert_eq!(c["shards"].as_integer(), Some(2));
    // The config file also comes from the environment.
    let c = effective(&["config"], &[("SWITCHBOARD_CONFIG", path)]);
    assert_eq!(c["drain_batch"].as_integer(), Some(10));
}

#[test]
fn bad_values_name_the_setting_and_where_it_came_from() {
    let out = switchboard(&["config"], &[("SWITCHBOARD_MAX_UNACKED", "lots")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SWITCHBOARD_MAX_UNACKED"), "{err}");
    let out = switchboard(&["config", "--tcp-listen", "nowhere"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--tcp-listen"), "{err}");
    // Out-of-range values are still caught by validation.
    let out = switchboard(&["config"], &[("SWITCHBOARD_DRAIN_BATCH", "500")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("drain_batch"), "{err}");
}

#[test]
fn text_logs_to_a_file_have_no_colour_codes() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--tcp-listen", "127.0.0.1:0"])
        .args(["--http-listen", "127.0.0.1:0", "--log-format", "text"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    // The ready line comes after the startup log lines; EOF means the
    // server exited, which the assertion reports.
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(line.starts_with("switchboard ready "), "{line:?}");
    let text = std::fs::read(&log_path).unwrap();
    assert!(!text.is_empty(), "no log lines were written");
    assert!(
        !text.contains(&0x1b),
        "escape codes in a log file: {}",
        String::from_utf8_lossy(&text)
    );
}
