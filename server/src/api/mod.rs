//! The HTTP side: the WebSocket endpoint for browsers (`/ws`, carrying the
//! same Noise stream as TCP) and health checks. Accounts, keys, groups and
//! metrics endpoints join it as their issues land.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router as HttpRouter;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gateway::{Gateway, WS_MAX_OUT_MESSAGE_BYTES, WsLink};

/// Largest HTTP request body accepted.
const MAX_HTTP_BODY_BYTES: usize = 64 * 1024;

/// Slack over the frame limit for one WebSocket message: a message carries a
/// frame plus its record headers and tags.
const WS_MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

/// The WebSocket codec's read buffer. tungstenite allocates (and zeroes) it
/// up front for every connection, 128 KiB by default: 130 KiB of RSS per
/// idle browser connection against 4 KiB for TCP. Larger messages still
/// arrive whole; the buffer only grows while one does.
const WS_READ_BUFFER_BYTES: usize = 4 * 1024;

/// Hard cap on the WebSocket codec's write buffer (tungstenite's default is
/// unbounded). Every message is flushed before the next (`write_buffer_size`
/// 0) and none is larger than [`WS_MAX_OUT_MESSAGE_BYTES`], so the buffer
/// holds at most one message and its header; the cap leaves room to spare.
/// A slow reader is cut off by the write timeout, not by this.
const WS_MAX_WRITE_BUFFER_BYTES: usize = 4 * WS_MAX_OUT_MESSAGE_BYTES;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct ApiState {
    /// Connection machinery shared with the TCP listener.
    pub gateway: Arc<Gateway>,
    /// Fires at shutdown; WebSocket connections watch it too.
    pub shutdown: CancellationToken,
    /// Tracks WebSocket connection tasks so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// True once the server is fully started and until it stops.
    pub ready: Arc<AtomicBool>,
    /// Renders the Prometheus metrics (`None` if no recorder is installed).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

/// The HTTP routes.
pub fn routes(state: ApiState) -> HttpRouter {
    HttpRouter::new()
        .route("/ws", get(ws))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        // No endpoint takes a body yet; refuse big ones before reading them.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_HTTP_BODY_BYTES))
        .with_state(state)
}

async fn ws(
    State(state): State<ApiState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let max = state.gateway.cfg.max_frame_bytes + WS_MESSAGE_OVERHEAD_BYTES;
    let gateway = state.gateway.clone();
    let shutdown = state.shutdown.clone();
    let tracker = state.tracker.clone();
    if let Err(refused) = gateway.limits.connection(peer.ip()) {
        let retry_after_secs = refused.retry_after_ms.div_ceil(1000).to_string();
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(axum::http::header::RETRY_AFTER, retry_after_secs)],
            "too many new connections from this address\n",
        )
            .into_response();
    }
    let Some(permit) = gateway.admit().await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    };
    upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .write_buffer_size(0)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER_BYTES)
        .on_upgrade(move |socket| async move {
            tracker
                .spawn(gateway.serve_link(WsLink(socket), peer.ip(), permit, shutdown))
                .await
                .ok();
        })
}

async fn metrics_text(State(state): State<ApiState>) -> Response {
    match &state.metrics {
        Some(handle) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            handle.render(),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n",
        )
            .into_response(),
    }
}

/// Unknown paths: a JSON error body, like every future JSON endpoint.
async fn not_found(uri: axum::http::Uri) -> Response {
    let body = serde_json::json!({
        "error": {"code": "NOT_FOUND", "message": format!("no such endpoint: {}", uri.path())}
    });
    (
        StatusCode::NOT_FOUND,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if state.ready.load(Ordering::Relaxed) && !state.shutdown.is_cancelled() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}
