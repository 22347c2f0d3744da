//! Delivery of verification codes. A trait, so an operator can plug an SMS
//! gateway in; the default development sender logs the code and writes it
//! to `<data dir>/dev-codes/<phone>` so scripts can finish registration.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// Failure to deliver a code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodeSendError {
    /// The delivery channel failed (I/O, gateway error).
    #[error("code delivery failed: {0}")]
    Delivery(String),
}

/// Sends a verification code to a phone number.
pub trait CodeSender: Send + Sync + 'static {
    /// Delivers `code` to `phone`.
    fn send<'a>(
        &'a self,
        phone: &'a str,
        code: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), CodeSendError>> + Send + 'a>>;
}

/// The development sender: logs the code and writes it to a file.
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
    ) -> Pin<Box<dyn Future<Output = Result<(), CodeSendError>> + Send + 'a>> {
        Box::pin(async move {
            tracing::info!(%phone, %code, "verification code (development sender)");
            let err = |e: std::io::Error| CodeSendError::Delivery(e.to_string());
            tokio::fs::create_dir_all(&self.dir).await.map_err(err)?;
            // Write then rename, so a reader never sees a half-written code.
            let tmp = self.dir.join(format!(".{phone}.tmp"));
            tokio::fs::write(&tmp, format!("{code}\n"))
                .await
                .map_err(err)?;
            tokio::fs::rename(&tmp, self.dir.join(phone))
                .await
                .map_err(err)?;
            Ok(())
        })
    }
}
