//! The table's writer lock: a robust futex that survives a holder being killed.
//!
//! Writers of the channel table (the supervisor, `balance -i`/`-c` as root) serialise on one
//! 32-bit word inside the shared file. The word holds the owner's thread id, the kernel's
//! `FUTEX_WAITERS` bit and, after a holder died, `FUTEX_OWNER_DIED`.
//!
//! Robustness comes from the kernel's robust-futex protocol, used through the `list_op_pending`
//! slot of a per-thread robust list only (see `sys`): while a thread takes or holds the lock,
//! that slot points at the word, and if the thread dies the kernel marks the word
//! `FUTEX_OWNER_DIED` and wakes a waiter. Unlike a glibc robust mutex, nothing in shared
//! memory is ever a pointer, so a process that can write the file cannot aim a write at
//! another process's memory.
//!
//! Waits are bounded: a holder that is alive but stopped (SIGSTOP) makes others fail with
//! [`LockError::Timeout`] rather than hang. A holder whose thread no longer exists is treated
//! as dead even without the kernel's mark.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::sys;

const FUTEX_WAITERS: u32 = 0x8000_0000;
pub(crate) const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// How long one futex wait sleeps before re-checking that the holder still exists.
const WAIT_SLICE: Duration = Duration::from_millis(50);

#[derive(Debug, PartialEq, Eq)]
pub enum LockError {
    /// The lock stayed held by a live thread for the whole timeout.
    Timeout { holder: u32 },
    /// This thread already holds the lock.
    Recursive,
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Timeout { holder } => write!(
                f,
                "the table lock is held by thread {holder} (stopped or hung?); gave up waiting"
            ),
            LockError::Recursive => write!(f, "the table lock is already held by this thread"),
        }
    }
}

impl std::error::Error for LockError {}

/// Proof that the lock is held; unlocks on drop.
#[derive(Debug)]
pub struct Guard<'a> {
    word: &'a AtomicU32,
    /// The previous holder died while holding the lock: what it protected may be half-updated.
    pub owner_died: bool,
}

/// Takes the lock stored in `word`, waiting at most `timeout`.
pub fn lock(word: &AtomicU32, timeout: Duration) -> Result<Guard<'_>, LockError> {
    let tid = sys::gettid() & FUTEX_TID_MASK;
    let deadline = Instant::now() + timeout;
    let mut waited = false;
    sys::robust_set_pending(word);
    loop {
        let v = word.load(Ordering::Relaxed);
        let holder = v & FUTEX_TID_MASK;
        if holder == 0 {
            // After a wait, other waiters may still sleep: keep the WAITERS bit so our unlock
            // wakes one of them.
            let keep = if waited {
                FUTEX_WAITERS
            } else {
                v & FUTEX_WAITERS
            };
            if word
                .compare_exchange(v, tid | keep, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(Guard {
                    word,
                    owner_died: v & FUTEX_OWNER_DIED != 0,
                });
            }
            continue;
        }
        if holder == tid {
            // The marker stays: it is the outer guard's, which still holds the word.
            return Err(LockError::Recursive);
        }
        if !sys::thread_exists(holder) {
            // Died without the kernel's mark (it never registered the word): take over.
            if word
                .compare_exchange(v, tid | FUTEX_WAITERS, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(Guard {
                    word,
                    owner_died: true,
                });
            }
            continue;
        }
        let now = Instant::now();
        if now >= deadline {
            sys::robust_clear_pending();
            return Err(LockError::Timeout { holder });
        }
        if v & FUTEX_WAITERS == 0
            && word
                .compare_exchange(v, v | FUTEX_WAITERS, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            continue;
        }
        let slice = (deadline - now).min(WAIT_SLICE);
        // Errors other than a timeout (EFAULT cannot happen on a valid reference) just loop.
        let _ = sys::futex_wait(word, v | FUTEX_WAITERS, slice);
        waited = true;
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let old = self.word.swap(0, Ordering::Release);
        if old & FUTEX_WAITERS != 0 {
            sys::futex_wake(self.word, 1);
        }
        sys::robust_clear_pending();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn lock_and_unlock() {
        let w = AtomicU32::new(0);
        {
            let g = lock(&w, Duration::from_millis(10)).expect("free lock");
            assert!(!g.owner_died);
            assert_eq!(w.load(Ordering::Relaxed) & FUTEX_TID_MASK, sys::gettid());
            assert_eq!(
                lock(&w, Duration::from_millis(10)).unwrap_err(),
                LockError::Recursive
            );
        }
        assert_eq!(w.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_recursive_attempt_leaves_the_holder_marked_for_the_kernel() {
        let w = Arc::new(AtomicU32::new(0));
        let w2 = Arc::clone(&w);
        std::thread::spawn(move || {
            let g = lock(&w2, Duration::from_millis(10)).expect("free lock");
            assert_eq!(
                lock(&w2, Duration::from_millis(10)).unwrap_err(),
                LockError::Recursive
            );
            // The thread ends holding the lock.
            std::mem::forget(g);
        })
        .join()
        .expect("join");
        // The kernel marked the word as the thread exited: no holder, owner died.
        assert_eq!(
            w.load(Ordering::Relaxed) & (FUTEX_TID_MASK | FUTEX_OWNER_DIED),
            FUTEX_OWNER_DIED
        );
    }

    #[test]
    fn owner_died_is_reported() {
        let w = AtomicU32::new(FUTEX_OWNER_DIED);
        let g = lock(&w, Duration::from_millis(10)).expect("dead owner's lock");
        assert!(g.owner_died);
    }

    #[test]
    fn vanished_holder_is_taken_over() {
        // A tid that cannot exist (above pid_max's hard limit of 2^22).
        let w = AtomicU32::new(0x3fff_fff0);
        let g = lock(&w, Duration::from_millis(100)).expect("stale lock");
        assert!(g.owner_died);
    }

    #[test]
    fn live_holder_times_out_then_hands_over() {
        let w = Arc::new(AtomicU32::new(0));
        let (tx, rx) = std::sync::mpsc::channel();
        let (tx2, rx2) = std::sync::mpsc::channel::<()>();
        let w2 = Arc::clone(&w);
        let t = std::thread::spawn(move || {
            let _g = lock(&w2, Duration::from_secs(1)).expect("first");
            tx.send(()).expect("send");
            rx2.recv().expect("release signal");
        });
        rx.recv().expect("holder ready");
        let start = Instant::now();
        assert!(matches!(
            lock(&w, Duration::from_millis(120)),
            Err(LockError::Timeout { .. })
        ));
        assert!(start.elapsed() >= Duration::from_millis(120));
        tx2.send(()).expect("send");
        let g = lock(&w, Duration::from_secs(5)).expect("released lock");
        assert!(!g.owner_died);
        drop(g);
        t.join().expect("join");
    }
}
