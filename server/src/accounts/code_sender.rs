//! Delivery of verification codes. A trait, so the delivery channel is
//! chosen by config (`code_sender`): the development sender writes the code
//! to `<data dir>/dev-codes/<phone>` so scripts can finish registration; the
//! webhook sender POSTs it to an SMS gateway of the operator's.
//!
//! No sender ever logs a code: logs are read by more people, and kept longer,
//! than a code may be known.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

use crate::outbound::{HttpCaller, OutboundError};

/// Failure to deliver a code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodeSendError {
    /// The delivery channel failed (I/O, gateway error).
    #[error("code delivery failed: {0}")]
    Delivery(String),
    /// The delivery channel is failing and is being left alone for a while
    /// (circuit open): retry after this many milliseconds.
    #[error("code delivery unavailable; retry in {retry_after_ms} ms")]
    Unavailable {
        /// When to retry.
        retry_after_ms: u64,
    },
}

/// Sends a verification code to a phone number.
pub trait CodeSender: Send + Sync + 'static {
    /// Delivers `code` to `phone`; `locale` (BCP 47, if the client gave
    /// one) lets the gateway word the message.
    fn send<'a>(
        &'a self,
        phone: &'a str,
        code: &'a str,
        locale: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<(), CodeSendError>> + Send + 'a>>;

    /// Whether a send could be attempted now. Checked before a code is
    /// issued, so a dead channel does not use up the number's hourly codes.
    ///
    /// # Errors
    /// [`CodeSendError::Unavailable`] while the channel is known to be down.
    fn check_available(&self) -> Result<(), CodeSendError> {
        Ok(())
    }
}

/// The development sender: writes the code to a file, and logs only that
/// it did (never the code).
#[derive(Debug, Clone)]
pub struct DevCodeSender {
    dir: PathBuf,
}

impl DevCodeSender {
    /// Writes codes under `dir` (created on first use).
    #[must_use]
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }
}

impl CodeSender for DevCodeSender {
    fn send<'a>(
        &'a self,
        phone: &'a str,
        code: &'a str,
        _locale: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<(), CodeSendError>> + Send + 'a>> {
        Box::pin(async move {
            let err = |e: std::io::Error| CodeSendError::Delivery(e.to_string());
            tokio::fs::create_dir_all(&self.dir).await.map_err(err)?;
            // Write then rename, so a reader never sees a half-written code.
            let tmp = self.dir.join(format!(".{phone}.tmp"));
            tokio::fs::write(&tmp, format!("{code}\n"))
                .await
                .map_err(err)?;
            let path = self.dir.join(phone);
            tokio::fs::rename(&tmp, &path).await.map_err(err)?;
            tracing::info!(%phone, file = %path.display(), "verification code written (development sender)");
            Ok(())
        })
    }
}

/// The webhook sender: POSTs `{"phone", "code", "locale"}` as JSON to the
/// operator's SMS gateway, through an [`HttpCaller`] (timeout, retries,
/// circuit breaker).
#[derive(Debug)]
pub struct WebhookCodeSender {
    caller: HttpCaller,
}

impl WebhookCodeSender {
    /// Sends through `caller`.
    #[must_use]
    pub fn new(caller: HttpCaller) -> Self {
        Self { caller }
    }
}

fn send_error(e: OutboundError) -> CodeSendError {
    match e {
        OutboundError::CircuitOpen { retry_after } => CodeSendError::Unavailable {
            retry_after_ms: u64::try_from(retry_after.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        },
        other => CodeSendError::Delivery(other.to_string()),
    }
}

impl CodeSender for WebhookCodeSender {
    fn send<'a>(
        &'a self,
        phone: &'a str,
        code: &'a str,
        locale: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<(), CodeSendError>> + Send + 'a>> {
        Box::pin(async move {
            let body = serde_json::json!({ "phone": phone, "code": code, "locale": locale });
            let body =
                serde_json::to_vec(&body).map_err(|e| CodeSendError::Delivery(e.to_string()))?;
            self.caller
                .post_json(body.into())
                .await
                .map_err(send_error)?;
            tracing::info!(%phone, "verification code sent (webhook)");
            Ok(())
        })
    }

    fn check_available(&self) -> Result<(), CodeSendError> {
        self.caller.check_open().map_err(send_error)
    }
}
