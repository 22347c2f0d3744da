//! The handshake's public-key cryptography, run on threads of the lowest
//! CPU priority.
//!
//! A Noise XX handshake costs the server four X25519 operations, more than
//! a hundred messages on an established connection. On the connection
//! tasks' threads, a flood of new connections (one account reconnecting in
//! a loop, a reconnect storm) would take the CPU from the users already
//! connected: the abuse scenario measured their p99 send→delivered going
//! from 5 ms to 545 ms (docs/BENCHMARKS.md). Here the handshakes get what
//! the established traffic leaves: under load new connections wait longer
//! (their handshake timeout still applies), and nobody already connected
//! notices.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

/// A job for a crypto thread.
type Job = Box<dyn FnOnce() + Send>;

/// Handle to the crypto threads. The threads end when every handle is
/// dropped (the gateway with it).
pub struct CryptoPool {
    /// Jobs waiting. Bounded by `slots`: a job is sent only with a slot,
    /// so `send` never waits on the channel itself.
    jobs: mpsc::Sender<Job>,
    slots: Arc<Semaphore>,
}

/// Nice value of the crypto threads: the lowest priority.
const CRYPTO_NICE: i32 = 19;

impl CryptoPool {
    /// Starts `threads` crypto threads taking at most `queued` jobs at once
    /// (more callers wait for a slot).
    ///
    /// # Errors
    /// If a thread cannot be spawned.
    pub fn start(threads: usize, queued: usize) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>(queued.max(1));
        // One receiver shared by the threads: each takes the next job.
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("sb-crypto-{i}"))
                .spawn(move || {
                    if let Err(e) = crate::os::lower_own_priority(CRYPTO_NICE) {
                        tracing::warn!(error = %e, "cannot lower the crypto thread's priority");
                    }
                    loop {
                        // The lock is held while waiting for a job: the
                        // threads take turns at the channel, one job each.
                        let job = rx
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .blocking_recv();
                        match job {
                            Some(job) => job(),
                            None => return,
                        }
                    }
                })?;
        }
        Ok(Self {
            jobs,
            slots: Arc::new(Semaphore::new(queued.max(1))),
        })
    }

    /// Runs `f` on a crypto thread and returns its result; `None` if the
    /// pool is gone (shutdown) or `f` panicked.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let _slot = self.slots.acquire().await.ok()?;
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                if let Ok(out) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                    let _ = tx.send(out);
                }
            }))
            .await
            .ok()?;
        rx.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_low_priority_threads_and_answer() {
        let pool = CryptoPool::start(2, 4).unwrap();
        let nice = pool
            .run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid())))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(nice, CRYPTO_NICE);
        let sums =
            futures_util::future::join_all((0..20u64).map(|i| pool.run(move || i * 2))).await;
        assert_eq!(sums.into_iter().map(Option::unwrap).sum::<u64>(), 380);
        // A panicking job answers None and the pool goes on.
        assert!(pool.run(|| panic!("boom")).await.is_none());
        assert_eq!(pool.run(|| 7).await, Some(7));
    }
}
