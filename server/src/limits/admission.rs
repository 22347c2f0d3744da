//! Admission control for new connections: a rate (token bucket), a cap on
//! handshakes in progress, and a cap on open connections.
//!
//! Connections beyond the rate or the handshake cap wait (in the gateway's
//! accept queue, then the kernel's listen backlog, for TCP; in the upgrade
//! request for WebSocket) instead of competing with live users for CPU.
//! Connections beyond the open-connection cap are refused in the
//! handshake's second message with a clear, retryable error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{Rate, TokenBucket};

/// Admission state shared by the listeners.
pub struct Admission {
    handshakes: Arc<Semaphore>,
    rate: Rate,
    /// A std mutex: held for a few arithmetic operations, never across an
    /// await.
    bucket: Mutex<TokenBucket>,
    open: Arc<AtomicUsize>,
    max_open: usize,
}

/// One open connection's place under the cap; dropping it frees the place.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// `accepts_per_sec` new connections per second (a burst of one
    /// second's worth), `max_handshakes` in progress, `max_open` open.
    #[must_use]
    pub fn new(accepts_per_sec: u32, max_handshakes: usize, max_open: usize) -> Self {
        let rate = Rate::per_second(accepts_per_sec.max(1));
        Self {
            handshakes: Arc::new(Semaphore::new(max_handshakes.max(1))),
            rate,
            bucket: Mutex::new(TokenBucket::full(rate, Instant::now())),
            open: Arc::new(AtomicUsize::new(0)),
            max_open: max_open.max(1),
        }
    }

    /// Waits for a token and a handshake slot; `None` if the semaphore is
    /// closed.
    pub async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        loop {
            let wait = self
                .bucket
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(self.rate, Instant::now());
            match wait {
                Ok(()) => break,
                Err(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            }
        }
        self.handshakes.clone().acquire_owned().await.ok()
    }

    /// A place for one more open connection, or `None` at the cap.
    #[must_use]
    pub fn open_slot(&self) -> Option<Slot> {
        let mut n = self.open.load(Ordering::Relaxed);
        loop {
            if n >= self.max_open {
                return None;
            }
            match self
                .open
                .compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Some(Slot(self.open.clone())),
                Err(now) => n = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_connections_are_capped_and_freed_on_drop() {
        let a = Admission::new(10, 1, 2);
        let one = a.open_slot().unwrap();
        let _two = a.open_slot().unwrap();
        assert!(a.open_slot().is_none());
        drop(one);
        assert!(a.open_slot().is_some());
    }
}
