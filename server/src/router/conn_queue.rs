//! A connection's queue (`ConnTx`/`ConnRx`; "push" is kept for push
//! notifications): what its shard sends it (queue entries,
//! notices, answers to sends) and, in the same place, whether the shard has
//! ended the connection and why.
//!
//! The connection looks at this queue on every wake-up, and with thousands
//! of connections that look is a cache miss per object it touches. So it is
//! one small allocation: a mutex over the pushes, the connection's waker and
//! the state. The futures channel it replaces kept its state, its queue's
//! nodes, a per-sender task handle and (separately) a oneshot for kicks in
//! four allocations, and polling them was about 5% of the server's CPU at
//! 10,000 msgs/s with 10,000 users.
//!
//! One producer (the owning shard) and one consumer (the connection). The
//! shard never waits: a full queue is its signal to kick a slow reader.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use super::shard::{KickReason, ToConn};

/// Room the queue keeps after it empties, so a connection's steady trickle
/// of pushes does not allocate per push, while a burst's growth is given
/// back.
const KEEP_CAPACITY: usize = 4;

struct State {
    pushes: VecDeque<ToConn>,
    /// The connection's task, to wake when something arrives.
    waker: Option<Waker>,
    /// Set when the shard ends the connection; seen before any push still
    /// queued (they are not worth writing to a connection being ended).
    kicked: Option<KickReason>,
    /// The shard let go of the queue (with or without a kick).
    sender_gone: bool,
    /// The connection is gone: pushes would go nowhere.
    receiver_gone: bool,
}

struct Shared {
    capacity: usize,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here panics while holding the lock, and every state is
        // consistent between statements.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The shard's end of a connection's push queue.
pub struct ConnTx(Arc<Shared>);

/// The connection's end of its push queue.
pub struct ConnRx(Arc<Shared>);

impl std::fmt::Debug for ConnTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTx")
            .field("capacity", &self.0.capacity)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ConnRx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnRx")
            .field("capacity", &self.0.capacity)
            .finish_non_exhaustive()
    }
}

/// A push queue holding `capacity` pushes at most.
#[must_use]
pub fn conn_queue(capacity: usize) -> (ConnTx, ConnRx) {
    let shared = Arc::new(Shared {
        capacity: capacity.max(1),
        state: Mutex::new(State {
            pushes: VecDeque::new(),
            waker: None,
            kicked: None,
            sender_gone: false,
            receiver_gone: false,
        }),
    });
    (ConnTx(shared.clone()), ConnRx(shared))
}

/// Why a push was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    /// The queue holds its capacity: the connection reads too slowly.
    Full,
    /// The connection is gone.
    Gone,
}

impl ConnTx {
    /// Queues `push` and wakes the connection, without waiting.
    ///
    /// # Errors
    /// [`TrySendError::Full`] or [`TrySendError::Gone`]; `push` is dropped.
    pub fn try_send(&self, push: ToConn) -> Result<(), TrySendError> {
        let waker = {
            let mut state = self.0.lock();
            if state.receiver_gone {
                return Err(TrySendError::Gone);
            }
            if state.pushes.len() >= self.0.capacity {
                return Err(TrySendError::Full);
            }
            state.pushes.push_back(push);
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Whether the connection is gone (nothing pushed would be read).
    #[must_use]
    pub fn is_gone(&self) -> bool {
        self.0.lock().receiver_gone
    }

    /// Ends the connection: it receives [`Received::Kicked`] next, before
    /// anything still queued.
    pub fn kick(self, reason: KickReason) {
        self.0.lock().kicked = Some(reason);
        // Dropping wakes the connection.
    }
}

impl Drop for ConnTx {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.0.lock();
            state.sender_gone = true;
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// What a connection receives from its shard.
#[derive(Debug)]
pub enum Received {
    /// A push, in the order queued.
    Item(ToConn),
    /// The shard ended the connection.
    Kicked(KickReason),
    /// The shard let go without a reason (it stopped).
    Closed,
}

impl ConnRx {
    /// The next push, kick or end; registers the task's waker when there
    /// is none yet.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Received> {
        let mut state = self.0.lock();
        if let Some(reason) = state.kicked {
            return Poll::Ready(Received::Kicked(reason));
        }
        if let Some(push) = pop(&mut state) {
            return Poll::Ready(Received::Item(push));
        }
        if state.sender_gone {
            return Poll::Ready(Received::Closed);
        }
        match &mut state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// Waits for the next push, kick or end.
    pub async fn recv(&mut self) -> Received {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// A push queued now, if any. A kick is left for [`ConnRx::recv`].
    pub fn try_recv(&mut self) -> Option<ToConn> {
        let mut state = self.0.lock();
        if state.kicked.is_some() {
            return None;
        }
        pop(&mut state)
    }
}

impl Drop for ConnRx {
    fn drop(&mut self) {
        let pushes = {
            let mut state = self.0.lock();
            state.receiver_gone = true;
            state.waker = None;
            std::mem::take(&mut state.pushes)
        };
        // Dropped outside the lock.
        drop(pushes);
    }
}

/// Takes the first push; an emptied queue gives back what a burst grew.
fn pop(state: &mut State) -> Option<ToConn> {
    let push = state.pushes.pop_front()?;
    if state.pushes.is_empty() && state.pushes.capacity() > KEEP_CAPACITY {
        state.pushes.shrink_to(KEEP_CAPACITY);
    }
    Some(push)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::router::Notice;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn notice(n: u32) -> ToConn {
        ToConn::Notice(Notice::KeysLow(n))
    }

    fn received_keys_low(r: Poll<Received>) -> Option<u32> {
        match r {
            Poll::Ready(Received::Item(ToConn::Notice(Notice::KeysLow(n)))) => Some(n),
            _ => None,
        }
    }

    #[test]
    fn pushes_arrive_in_order_and_wake_the_waiting_connection() {
        let (tx, mut rx) = conn_queue(8);
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_recv(&mut cx).is_pending());
        tx.try_send(notice(1)).unwrap();
        tx.try_send(notice(2)).unwrap();
        // Woken once: the first push took the waker.
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(received_keys_low(rx.poll_recv(&mut cx)), Some(1));
        assert!(matches!(
            rx.try_recv(),
            Some(ToConn::Notice(Notice::KeysLow(2)))
        ));
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn a_full_queue_refuses_and_an_emptied_one_gives_back_its_growth() {
        let (tx, mut rx) = conn_queue(100);
        for n in 0..100 {
            tx.try_send(notice(n)).unwrap();
        }
        assert_eq!(tx.try_send(notice(100)), Err(TrySendError::Full));
        for n in 0..100 {
            assert!(matches!(rx.try_recv(), Some(ToConn::Notice(Notice::KeysLow(m))) if m == n));
        }
        assert!(rx.0.lock().pushes.capacity() <= KEEP_CAPACITY);
        tx.try_send(notice(7)).unwrap();
    }

    #[test]
    fn a_kick_comes_before_what_is_queued_and_an_end_after_it() {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let (tx, mut rx) = conn_queue(8);
        tx.try_send(notice(1)).unwrap();
        tx.kick(KickReason::SlowReader);
        assert!(rx.try_recv().is_none());
        assert!(matches!(
            rx.poll_recv(&mut cx),
            Poll::Ready(Received::Kicked(KickReason::SlowReader))
        ));

        let (tx, mut rx) = conn_queue(8);
        tx.try_send(notice(1)).unwrap();
        drop(tx);
        assert_eq!(received_keys_low(rx.poll_recv(&mut cx)), Some(1));
        assert!(matches!(
            rx.poll_recv(&mut cx),
            Poll::Ready(Received::Closed)
        ));
    }

    #[test]
    fn pushes_to_a_gone_connection_are_refused() {
        let (tx, rx) = conn_queue(8);
        drop(rx);
        assert_eq!(tx.try_send(notice(1)), Err(TrySendError::Gone));
    }
}
