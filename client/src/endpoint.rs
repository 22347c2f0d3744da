//! Where a server listens: a TCP address or a WebSocket URL.
//!
//! Accepted forms: `host:port`, `host` (port [`DEFAULT_TCP_PORT`]),
//! `tcp://host[:port]`, `ws://host[:port][/path]` (path [`DEFAULT_WS_PATH`]
//! when empty). IPv6 hosts go in brackets: `[::1]:5222`. `wss://` is refused
//! for now: put a TLS-terminating proxy in front and use `ws://` to it, or TCP.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, UsageError};

/// Port of the native TCP listener when none is given.
pub const DEFAULT_TCP_PORT: u16 = 5222;

/// Port of a `ws://` URL when none is given (the scheme's standard port).
pub const DEFAULT_WS_PORT: u16 = 80;

/// Path of the WebSocket endpoint when the URL has none.
pub const DEFAULT_WS_PATH: &str = "/ws";

/// A server address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// Native TCP.
    Tcp {
        /// Host name or IP (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// Binary WebSocket messages carrying the same byte stream.
    WebSocket {
        /// Host name or IP (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
        /// Path, starting with `/`.
        path: String,
    },
}

impl Endpoint {
    /// The `ws://` URL of a WebSocket endpoint, or `None` for TCP.
    #[must_use]
    pub fn ws_url(&self) -> Option<String> {
        match self {
            Self::Tcp { .. } => None,
            Self::WebSocket { host, port, path } => {
                Some(format!("ws://{}:{port}{path}", bracket(host)))
            }
        }
    }
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } => write!(f, "tcp://{}:{port}", bracket(host)),
            Self::WebSocket { host, port, path } => {
                write!(f, "ws://{}:{port}{path}", bracket(host))
            }
        }
    }
}

fn invalid(input: &str, reason: &'static str) -> Error {
    Error::Usage(UsageError::InvalidEndpoint {
        input: input.to_owned(),
        reason,
    })
}

/// Splits `host[:port]` (with `[v6]` brackets) into host and optional port.
fn split_authority<'a>(input: &str, authority: &'a str) -> Result<(&'a str, Option<u16>), Error> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid(input, "unclosed '[' in IPv6 host"))?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| invalid(input, "expected ':' after ']'"))?,
                ),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(invalid(input, "IPv6 hosts must be written in brackets"));
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(invalid(input, "missing host"));
    }
    if host.contains(['/', '?', '#', '@', ' ']) {
        return Err(invalid(input, "invalid character in host"));
    }
    let port = match port {
        None => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| invalid(input, "port must be 1..=65535"))?,
        ),
    };
    Ok((host, port))
}

impl FromStr for Endpoint {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        let s = input.trim();
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("wss://") {
            return Err(invalid(
                input,
                "wss:// is not supported yet; use ws:// behind a TLS proxy, or TCP",
            ));
        }
        if lower.starts_with("ws://") {
            let rest = s.get("ws://".len()..).unwrap_or_default();
            let (authority, path) = match rest.find(['/', '?']) {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let (host, port) = split_authority(input, authority)?;
            let path = if path.is_empty() || path == "/" {
                DEFAULT_WS_PATH.to_owned()
            } else if path.starts_with('/') {
                path.to_owned()
            } else {
                format!("/{path}")
            };
            return Ok(Self::WebSocket {
                host: host.to_owned(),
                port: port.unwrap_or(DEFAULT_WS_PORT),
                path,
            });
        }
        let authority = if lower.starts_with("tcp://") {
            s.get("tcp://".len()..).unwrap_or_default()
        } else if lower.contains("://") {
            return Err(invalid(input, "unknown scheme; use tcp:// or ws://"));
        } else {
            s
        };
        let authority = authority.strip_suffix('/').unwrap_or(authority);
        if authority.contains('/') {
            return Err(invalid(input, "a TCP address has no path"));
        }
        let (host, port) = split_authority(input, authority)?;
        Ok(Self::Tcp {
            host: host.to_owned(),
            port: port.unwrap_or(DEFAULT_TCP_PORT),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    fn ws(host: &str, port: u16, path: &str) -> Endpoint {
        Endpoint::WebSocket {
            host: host.into(),
            port,
            path: path.into(),
        }
    }

    #[test]
    fn parses_tcp_forms() {
        assert_eq!(
            "127.0.0.1:5222".parse::<Endpoint>().unwrap(),
            tcp("127.0.0.1", 5222)
        );
        assert_eq!(
            "localhost".parse::<Endpoint>().unwrap(),
            tcp("localhost", 5222)
        );
        assert_eq!(
            "tcp://example.org:7000".parse::<Endpoint>().unwrap(),
            tcp("example.org", 7000)
        );
        assert_eq!("TCP://h".parse::<Endpoint>().unwrap(), tcp("h", 5222));
        assert_eq!("[::1]:6000".parse::<Endpoint>().unwrap(), tcp("::1", 6000));
        assert_eq!("tcp://[::1]".parse::<Endpoint>().unwrap(), tcp("::1", 5222));
    }

    #[test]
    fn parses_ws_forms() {
        assert_eq!(
            "ws://127.0.0.1:8080/ws".parse::<Endpoint>().unwrap(),
            ws("127.0.0.1", 8080, "/ws")
        );
        assert_eq!(
            "ws://h:8080".parse::<Endpoint>().unwrap(),
            ws("h", 8080, "/ws")
        );
        assert_eq!("ws://h/".parse::<Endpoint>().unwrap(), ws("h", 80, "/ws"));
        assert_eq!(
            "ws://h:1/a/b".parse::<Endpoint>().unwrap(),
            ws("h", 1, "/a/b")
        );
        assert_eq!(
            "ws://[::1]:9/ws".parse::<Endpoint>().unwrap(),
            ws("::1", 9, "/ws")
        );
    }

    #[test]
    fn refuses_bad_input() {
        for bad in [
            "",
            ":5222",
            "host:0",
            "host:70000",
            "host:abc",
            "::1",
            "[::1",
            "[::1]x",
            "http://h",
            "wss://h/ws",
            "tcp://h:1/path",
            "ws://:80/ws",
        ] {
            let err = bad.parse::<Endpoint>().unwrap_err();
            assert!(
                matches!(err, Error::Usage(UsageError::InvalidEndpoint { .. })),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "tcp://h:1",
            "tcp://[::1]:5222",
            "ws://h:8080/ws",
            "ws://[::1]:80/x",
        ] {
            let e: Endpoint = s.parse().unwrap();
            assert_eq!(e.to_string(), s);
            assert_eq!(e.to_string().parse::<Endpoint>().unwrap(), e);
        }
        assert_eq!(
            ws("::1", 8080, "/ws").ws_url().as_deref(),
            Some("ws://[::1]:8080/ws")
        );
        assert_eq!(tcp("h", 1).ws_url(), None);
    }
}
