//! The client task's own keys: publishing this device's identity and
//! one-time keys (one upload at a time, again when the server reports the
//! stock low), answering `keys_published` callers, and persisting the
//! crypto state the keys live in.

use std::sync::Arc;

use switchboard_proto::pb::{self, client_frame, server_frame};
use tracing::{debug, warn};

use super::{Actor, Down, InFlight, Link};
use crate::ErrorCode;
use crate::client::Event;
use crate::connection::unexpected;
use crate::crypto::ONE_TIME_KEY_LOW;
use crate::error::{CloseReason, CryptoError, ServerError, StorageError};

impl Actor {
    pub(super) fn answer_key_waiters(&mut self) {
        if self.keys.has_keys {
            for waiter in self.keys.waiters.drain(..) {
                let _ = waiter.send(Ok(()));
            }
        }
    }

    /// Uploads keys when the server lacks this device's identity or its
    /// one-time keys run low (one upload at a time).
    pub(super) fn maybe_upload(&mut self, link: &mut Link) {
        if self.keys.uploading || (self.keys.has_keys && self.keys.stock >= ONE_TIME_KEY_LOW) {
            return;
        }
        let upload = self.crypto.upload(self.keys.stock, !self.keys.has_keys);
        debug!(
            one_time_keys = upload.one_time_keys.len(),
            fallback = upload.fallback_key.is_some(),
            "uploading keys"
        );
        let id = link.next_id();
        link.session.queue(&pb::ClientFrame {
            id,
            body: Some(client_frame::Body::UploadKeys(upload)),
        });
        link.in_flight.insert(id, InFlight::Upload);
        self.keys.uploading = true;
    }

    /// The answer to a key upload; `Some` stops the client.
    pub(super) fn on_upload_answer(
        &mut self,
        link: &mut Link,
        body: Option<server_frame::Body>,
    ) -> Option<Down> {
        self.keys.uploading = false;
        match body {
            Some(server_frame::Body::KeysUploaded(k)) => {
                self.crypto.published();
                self.keys.has_keys = true;
                self.keys.stock = k.one_time_keys_remaining;
                debug!(stock = k.one_time_keys_remaining, "keys published");
                self.emit(Event::KeysPublished {
                    one_time_keys_remaining: k.one_time_keys_remaining,
                });
                self.answer_key_waiters();
                // Keys fetched meanwhile may have brought the stock low again.
                self.maybe_upload(link);
                None
            }
            Some(server_frame::Body::Error(e)) => {
                let error = ServerError::from(e);
                if error.code == ErrorCode::InvalidKeys {
                    warn!(%error, "the server refused this device's keys");
                    let why = CryptoError::KeysRejected(error.to_string());
                    return Some(Down::Stop(CloseReason::Fatal(why.to_string())));
                }
                // Retried on the next connection or KeysLow.
                warn!(%error, "key upload failed");
                None
            }
            other => Some(Down::retry(unexpected("KeysUploaded", other.as_ref()))),
        }
    }

    /// Persists the crypto state if it changed.
    pub(super) async fn save_crypto(&mut self) {
        if !self.crypto.take_dirty() {
            return;
        }
        let Some(file) = &self.state_file else {
            return;
        };
        let bytes = match self.crypto.snapshot() {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "cannot serialize the crypto state");
                return;
            }
        };
        let file = Arc::clone(file);
        let saved = tokio::task::spawn_blocking(move || file.save(&bytes))
            .await
            .unwrap_or_else(|e| Err(StorageError::Task(e.to_string())));
        if let Err(e) = saved {
            // Kept in memory and retried at the next change; a crash before
            // then may reuse message keys the peer then cannot decrypt.
            warn!(error = %e, "cannot persist the crypto state");
            self.crypto.mark_dirty();
        }
    }
}
