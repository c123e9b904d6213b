//! The blocking API inside a tokio runtime.
//!
//! The `postgres` crate's `Client` runs a runtime of its own: every query, every login and its `Drop` call
//! `Runtime::block_on`, which panics on a thread that is already running a tokio runtime ("Cannot start a
//! runtime from within a runtime"). So every public method that reaches PostgreSQL runs its work through
//! [`off_runtime`], and everything that may close a connection when dropped is wrapped in [`OffRuntime`]: on a
//! runtime's thread the work moves to a scoped thread of its own, which the caller waits for (the caller's worker
//! thread is blocked for the round trip, as it would be by any blocking call). Everywhere else (the broker's own
//! threads, `spawn_blocking`'s, plain threads) it runs in place.
//!
//! A scoped thread works in both runtime flavours; `tokio::task::block_in_place` would panic on the
//! current-thread one.

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};

use crate::error::{Error, ErrorKind};

/// Whether this thread is inside a tokio runtime's context, where the `postgres` crate cannot block.
///
/// `spawn_blocking`'s threads are inside the context too, though blocking is allowed there: work called from
/// them takes the detour through a thread of its own, which costs a thread's start (tens of microseconds).
/// The async API avoids it by calling the broker's internals directly.
pub(crate) fn in_runtime() -> bool {
    tokio::runtime::Handle::try_current().is_ok()
}

/// Runs `work` where blocking is allowed: here, or inside a tokio runtime on a scoped thread, waited for. A panic
/// in `work` continues in the caller, as it would have without the detour.
pub(crate) fn off_runtime<T: Send>(
    work: impl FnOnce() -> Result<T, Error> + Send,
) -> Result<T, Error> {
    if !in_runtime() {
        return work();
    }
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("credbroker-blocking".into())
            .spawn_scoped(scope, work)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Connection,
                    "could not start a thread for the database work of a call made inside a tokio runtime; \
                     call the broker from spawn_blocking, or use its async API (feature `tokio`)",
                )
                .with_source(e)
            })?;
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A value whose drop may block on the `postgres` crate's runtime (a `Client`, a pool of them): dropped on a
/// runtime's thread, it is dropped on a scoped thread instead.
pub(crate) struct OffRuntime<T: Send>(ManuallyDrop<T>);

impl<T: Send> OffRuntime<T> {
    pub(crate) fn new(value: T) -> OffRuntime<T> {
        OffRuntime(ManuallyDrop::new(value))
    }
}

impl<T: Send> Deref for OffRuntime<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Send> DerefMut for OffRuntime<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: Send> Drop for OffRuntime<T> {
    fn drop(&mut self) {
        // SAFETY: `self.0` is taken once, here, and never used again: `self` is being dropped.
        let value = unsafe { ManuallyDrop::take(&mut self.0) };
        if !in_runtime() {
            drop(value);
            return;
        }
        // Should the thread not start, the closure is dropped with `value` still inside its ManuallyDrop: leaked
        // (its connections close when the process exits), which beats a panic in a destructor.
        let value = ManuallyDrop::new(value);
        std::thread::scope(|scope| {
            let dropped = std::thread::Builder::new()
                .name("credbroker-blocking".into())
                .spawn_scoped(scope, move || drop(ManuallyDrop::into_inner(value)));
            match dropped {
                Ok(thread) => {
                    if thread.join().is_err() {
                        log::error!("closing a PostgreSQL connection panicked");
                    }
                }
                Err(e) => log::error!(
                    "could not start a thread to close PostgreSQL connections dropped inside a tokio runtime \
                     ({e}); they stay open until the process exits"
                ),
            }
        });
    }
}
