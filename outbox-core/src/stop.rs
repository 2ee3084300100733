//! The one handle that stops (or wakes) a relay or a consumer loop from another thread.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Stops or wakes a running [`Relay`](crate::Relay) or a transport's consumer loop from another
/// thread. Cheap to clone: every clone controls the same loop(s).
///
/// ```
/// use std::time::Duration;
/// use waybill_outbox_core::StopHandle;
///
/// let handle = StopHandle::default();
/// let worker = handle.clone();
/// handle.stop();
/// assert!(worker.is_stopped());
/// // A stopped handle's pauses end at once.
/// assert!(worker.wait(Duration::from_secs(60)));
/// ```
#[derive(Clone, Debug, Default)]
pub struct StopHandle {
    inner: Arc<HandleInner>,
}

/// The name this handle had before consumers shared it.
pub type RelayHandle = StopHandle;

#[derive(Debug, Default)]
struct HandleInner {
    state: Mutex<HandleState>,
    signal: Condvar,
}

#[derive(Debug, Default)]
struct HandleState {
    stopped: bool,
    woken: bool,
}

impl StopHandle {
    /// A handle not yet stopped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the loop to stop: a relay finishes the batch in hand, hands back what it has not
    /// sent and returns from `run`; a consumer settles the delivery in hand and returns.
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.inner.signal.notify_all();
    }

    /// Wakes an idle loop at once, e.g. a relay right after the writer in the same process
    /// committed.
    pub fn wake(&self) {
        self.lock().woken = true;
        self.inner.signal.notify_all();
    }

    /// `true` once [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.lock().stopped
    }

    /// Pauses up to `timeout`, ending early on [`stop`](Self::stop) or [`wake`](Self::wake);
    /// returns whether one of them came (a wake is used up by the wait it ends).
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut state = self.lock();
        if !state.stopped && !state.woken {
            state = self
                .inner
                .signal
                .wait_timeout_while(state, timeout, |s| !s.stopped && !s.woken)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let signalled = state.stopped || state.woken;
        state.woken = false;
        signalled
    }

    fn lock(&self) -> MutexGuard<'_, HandleState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_ends_one_wait_and_a_stop_ends_every_wait() {
        let handle = StopHandle::new();
        handle.wake();
        assert!(handle.wait(Duration::from_secs(60)));
        assert!(!handle.wait(Duration::ZERO));
        let other = handle.clone();
        let waiter = std::thread::spawn(move || other.wait(Duration::from_secs(600)));
        handle.stop();
        assert!(waiter.join().is_ok_and(|signalled| signalled));
        assert!(handle.wait(Duration::from_secs(60)) && handle.is_stopped());
    }
}
