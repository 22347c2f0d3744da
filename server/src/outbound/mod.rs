//! Outbound HTTP calls to services the server depends on (the code-sender
//! webhook now, push notification gateways next): one [`HttpCaller`] per
//! endpoint, with a per-attempt timeout, retries with jittered backoff and
//! a circuit breaker, so a slow or dead endpoint costs callers a quick,
//! clear error instead of piling up waiting tasks.
//!
//! Plain `http://` only: TLS to a third party is left to a local relay
//! (docs/OPERATIONS.md), which keeps a TLS stack out of the server.

pub mod backoff;
pub mod breaker;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;

pub use backoff::RetryPolicy;
pub use breaker::{Breaker, BreakerState, Refused};

/// Counter of outbound attempts, labelled `target` and `outcome`
/// (`ok`, `status_4xx`, `status_5xx`, `timeout`, `connect`, `refused`).
pub const OUTBOUND_ATTEMPTS: &str = "switchboard_outbound_attempts_total";
/// Gauge: 1 while the target's circuit is open or half-open, else 0.
pub const OUTBOUND_BREAKER_OPEN: &str = "switchboard_outbound_breaker_open";

/// Every `outcome` label of [`OUTBOUND_ATTEMPTS`].
pub const OUTCOMES: [&str; 6] = [
    "ok",
    "status_4xx",
    "status_5xx",
    "timeout",
    "connect",
    "refused",
];

/// Registers `target`'s series at zero, so they are on `/metrics` from the
/// start, whether or not the target is configured.
pub fn register_metrics(target: &'static str) {
    for outcome in OUTCOMES {
        metrics::counter!(OUTBOUND_ATTEMPTS, "target" => target, "outcome" => outcome).absolute(0);
    }
    metrics::gauge!(OUTBOUND_BREAKER_OPEN, "target" => target).set(0.0);
}

/// Why an outbound call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutboundError {
    /// The circuit is open: the endpoint failed repeatedly and is being left
    /// alone for a while. Retry after `retry_after`.
    #[error("circuit open after repeated failures; retry in {retry_after:?}")]
    CircuitOpen {
        /// When a trial call will be allowed.
        retry_after: Duration,
    },
    /// The endpoint refused the request itself (4xx other than 408/429):
    /// retrying the same request will not help.
    #[error("rejected with HTTP status {0}")]
    Rejected(u16),
    /// Every attempt failed (timeout, connection error or 5xx); the last
    /// failure is given.
    #[error("failed after {attempts} attempts: {last}")]
    Exhausted {
        /// Attempts made.
        attempts: u32,
        /// The last attempt's failure.
        last: String,
    },
}

/// The configuration of an endpoint URL or header is unusable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidTarget(pub String);

/// One attempt's failure.
enum Failure {
    /// Worth retrying.
    Transient(&'static str, String),
    /// Not worth retrying.
    Permanent(u16),
}

/// Calls one HTTP endpoint with timeout, retries and a circuit breaker.
#[derive(Debug)]
pub struct HttpCaller {
    /// Metrics label.
    target: &'static str,
    uri: Uri,
    host: HeaderValue,
    authority: String,
    header: Option<(HeaderName, HeaderValue)>,
    timeout: Duration,
    retry: RetryPolicy,
    breaker: Breaker,
}

/// Parses `"Name: value"` into a header.
///
/// # Errors
/// [`InvalidTarget`] if there is no colon or the name or value is invalid.
pub fn parse_header(line: &str) -> Result<(HeaderName, HeaderValue), InvalidTarget> {
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| InvalidTarget("a header must be `Name: value`".into()))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| InvalidTarget(format!("bad header name: {e}")))?;
    let mut value = HeaderValue::from_str(value.trim())
        .map_err(|e| InvalidTarget(format!("bad header value: {e}")))?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// Checks that `url` is an `http://host[:port]/path` URL this caller can use.
///
/// # Errors
/// [`InvalidTarget`] naming what is wrong.
pub fn parse_url(url: &str) -> Result<Uri, InvalidTarget> {
    let uri: Uri = url
        .parse()
        .map_err(|e| InvalidTarget(format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(InvalidTarget(format!(
                "scheme {other} is not supported: use http:// (to a local TLS relay for \
                 a remote https endpoint)"
            )));
        }
        None => return Err(InvalidTarget("the URL needs http://".into())),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(InvalidTarget("the URL has no host".into()));
    }
    Ok(uri)
}

impl HttpCaller {
    /// A caller for `url` sending `header` (e.g. an `Authorization`) with
    /// each request; the breaker opens after `breaker` failures in a row.
    ///
    /// # Errors
    /// [`InvalidTarget`] if the URL or header is unusable.
    pub fn new(
        target: &'static str,
        url: &str,
        header: Option<&str>,
        timeout: Duration,
        retry: RetryPolicy,
        breaker: Breaker,
    ) -> Result<Self, InvalidTarget> {
        let uri = parse_url(url)?;
        let header = header.map(parse_header).transpose()?;
        let host = uri.host().unwrap_or_default();
        let port = uri.port_u16().unwrap_or(80);
        let authority = if host.contains(':') {
            format!("[{}]:{port}", host.trim_matches(['[', ']']))
        } else {
            format!("{host}:{port}")
        };
        let host_header = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let host = HeaderValue::from_str(&host_header)
            .map_err(|e| InvalidTarget(format!("bad host: {e}")))?;
        let caller = Self {
            target,
            uri,
            host,
            authority,
            header,
            timeout,
            retry,
            breaker,
        };
        // On /metrics from the start, at 0 (closed).
        caller.gauge();
        Ok(caller)
    }

    /// The breaker's state (metrics, tests).
    #[must_use]
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Refuses at once while the circuit is open, without using a trial
    /// call, so callers can avoid work whose result could not be sent.
    ///
    /// # Errors
    /// [`OutboundError::CircuitOpen`].
    pub fn check_open(&self) -> Result<(), OutboundError> {
        self.breaker
            .peek(Instant::now())
            .map_err(|Refused { retry_after }| OutboundError::CircuitOpen { retry_after })
    }

    /// POSTs `body` as JSON; a 2xx answer is success.
    ///
    /// # Errors
    /// [`OutboundError`]: circuit open, rejected, or every attempt failed.
    pub async fn post_json(&self, body: Bytes) -> Result<(), OutboundError> {
        let attempts = self.retry.max_attempts.max(1);
        let mut last = String::new();
        for attempt in 0..attempts {
            if attempt > 0 {
                let delay = self.retry.delay(attempt - 1, &mut rand::rng());
                tokio::time::sleep(delay).await;
            }
            if let Err(Refused { retry_after }) = self.breaker.allow(Instant::now()) {
                self.count("refused");
                return Err(OutboundError::CircuitOpen { retry_after });
            }
            let outcome = tokio::time::timeout(self.timeout, self.attempt(body.clone())).await;
            let outcome = outcome.unwrap_or_else(|_| {
                Err(Failure::Transient(
                    "timeout",
                    format!("no answer within {:?}", self.timeout),
                ))
            });
            match outcome {
                Ok(()) => {
                    self.breaker.record_success();
                    self.count("ok");
                    self.gauge();
                    return Ok(());
                }
                Err(Failure::Permanent(status)) => {
                    // The endpoint is up and answering: not a breaker failure.
                    self.breaker.record_success();
                    self.count("status_4xx");
                    self.gauge();
                    return Err(OutboundError::Rejected(status));
                }
                Err(Failure::Transient(kind, why)) => {
                    self.breaker.record_failure(Instant::now());
                    self.count(kind);
                    self.gauge();
                    tracing::warn!(target_name = self.target, attempt, error = %why, "outbound call failed");
                    last = why;
                }
            }
        }
        Err(OutboundError::Exhausted { attempts, last })
    }

    async fn attempt(&self, body: Bytes) -> Result<(), Failure> {
        let connect = |e: &dyn std::fmt::Display| Failure::Transient("connect", e.to_string());
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .map_err(|e| connect(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect(&e))?;
        // Drives the connection; ends when the request is done or dropped
        // (on timeout, this future and so the task's peer are dropped).
        let driver = tokio::spawn(conn);
        let path = self
            .uri
            .path_and_query()
            .map_or("/", hyper::http::uri::PathAndQuery::as_str);
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(HOST, self.host.clone())
            .header(CONTENT_TYPE, "application/json");
        if let Some((name, value)) = &self.header {
            req = req.header(name, value.clone());
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| Failure::Transient("connect", e.to_string()))?;
        let result = sender.send_request(req).await;
        let result = match result {
            Ok(resp) => {
                let status = resp.status();
                // Read the (small) body so the exchange completes cleanly.
                let _ = resp.into_body().collect().await;
                if status.is_success() {
                    Ok(())
                } else if status.is_server_error()
                    || status.as_u16() == 408
                    || status.as_u16() == 429
                {
                    Err(Failure::Transient(
                        "status_5xx",
                        format!("HTTP status {}", status.as_u16()),
                    ))
                } else {
                    Err(Failure::Permanent(status.as_u16()))
                }
            }
            Err(e) => Err(connect(&e)),
        };
        driver.abort();
        result
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!(OUTBOUND_ATTEMPTS, "target" => self.target, "outcome" => outcome)
            .increment(1);
    }

    fn gauge(&self) {
        let open = self.breaker.state() != BreakerState::Closed;
        metrics::gauge!(OUTBOUND_BREAKER_OPEN, "target" => self.target).set(if open {
            1.0
        } else {
            0.0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_headers() {
        assert!(parse_url("http://127.0.0.1:9/sms").is_ok());
        assert!(parse_url("https://example.com/").is_err());
        assert!(parse_url("example.com/x").is_err());
        let (n, v) = parse_header("Authorization: Bearer s3cret").unwrap();
        assert_eq!(n.as_str(), "authorization");
        assert_eq!(v.to_str().unwrap(), "Bearer s3cret");
        assert!(parse_header("no colon").is_err());
    }
}
