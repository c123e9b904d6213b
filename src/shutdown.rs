//! Shutdown: what happens to this instance's leases when the broker stops.

use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::drop_role::BATCH;
use crate::error::{Error, ErrorKind};
use crate::events::RevokeCause;
use crate::leases::later;
use crate::leases::LeaseEnd;
use crate::revoke::revoke_leases;
use crate::shared::Shared;

/// What [`Broker::shutdown`](crate::Broker::shutdown), and dropping a [`Broker`](crate::Broker), do with the
/// leases still in the table. Set the default for `Drop` with
/// [`BrokerBuilder::shutdown_mode`](crate::BrokerBuilder::shutdown_mode).
///
/// More modes may come: match with a `_` arm.
///
/// # Examples
///
/// A broker whose credentials must not outlive the process, even when it is dropped without an explicit
/// shutdown:
///
/// ```no_run
/// use credbroker::{Broker, ShutdownMode};
/// use std::time::Duration;
///
/// let broker = Broker::builder()
///     .connection("host=localhost user=username password=password")
///     .shutdown_mode(ShutdownMode::Revoke { timeout: Duration::from_secs(10) })
///     .build()?;
/// # Ok::<(), credbroker::Error>(())
/// ```
///
/// Choosing at the moment of stopping instead: keep the leases for a restart that adopts them, or revoke them
/// when the service is being taken down for good.
///
/// ```no_run
/// use credbroker::{ErrorKind, ShutdownMode};
/// use std::time::Duration;
///
/// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
/// # let decommissioning = false;
/// let mode = if decommissioning {
///     ShutdownMode::Revoke { timeout: Duration::from_secs(30) }
/// } else {
///     ShutdownMode::Keep
/// };
/// match broker.shutdown(mode) {
///     Ok(()) => {}
///     // Some roles could not be dropped in time: they stay fenced by VALID UNTIL for the next start.
///     Err(e) if e.kind() == ErrorKind::Revocation => eprintln!("{e}"),
///     Err(e) => return Err(e),
/// }
/// # Ok::<(), credbroker::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ShutdownMode {
    /// Leave the roles in place: they keep working until their `VALID UNTIL`, and the next start of the same
    /// instance adopts them (or any instance drops them once expired). Stopping waits at most 2 seconds for
    /// revocations already in flight.
    #[default]
    Keep,
    /// Revoke every lease this instance holds, giving up after `timeout`: roles not dropped by then stay marked,
    /// fenced by `VALID UNTIL`, for the next start or another instance's orphan sweep. Stopping returns within
    /// `timeout` even if the server is down or a revocation is stuck on a lock; any `Duration` is accepted
    /// (`Duration::MAX` waits as long as revocations keep failing).
    Revoke {
        /// How long revoking may take in all.
        timeout: Duration,
    },
}

/// Revokes every lease in the table, in batches, retrying failures, until the table is empty or `deadline`.
/// The work runs on a thread of its own, so that the caller returns at `deadline` even while a statement is
/// blocked; what is left running then stops at its next connection checkout. The sweeper must be stopped.
pub(crate) fn revoke_all(
    shared: &Arc<Shared>,
    timeout: Duration,
    deadline: Instant,
) -> Result<usize, Error> {
    let (done, outcome) = mpsc::channel();
    let worker = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("credbroker-shutdown".into())
            .spawn(move || {
                let _ = done.send(revoke_until(&shared, deadline));
            })
    };
    let revoked = match worker {
        Ok(_) => outcome
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok(),
        // No thread to spare: revoke on this one (each wait is still bounded by the deadline or the timeouts).
        Err(_) => Some(revoke_until(shared, deadline)),
    };
    let left = shared.leases.len();
    match revoked {
        Some(revoked) if left == 0 => {
            log::info!("shutdown: revoked {revoked} leases");
            Ok(revoked)
        }
        _ => Err(Error::new(
            ErrorKind::Revocation,
            format!(
                "shutdown: {left} leases could not be revoked within {timeout:?}; their roles are NOLOGIN where \
                 revocation started, fenced by VALID UNTIL, and dropped by the next start or another instance's \
                 orphan sweep"
            ),
        )),
    }
}

/// The loop of [`revoke_all`]; returns how many leases it revoked.
fn revoke_until(shared: &Shared, deadline: Instant) -> usize {
    let limit = BATCH * shared.revocation_workers();
    let mut revoked = 0;
    loop {
        // Waits for revocations in flight (the sweeper's workers) when nothing else is left.
        let claimed = shared.leases.claim_all(limit, deadline);
        if claimed.is_empty() {
            return revoked;
        }
        revoked += revoke_leases(shared, &claimed, LeaseEnd::Revoked(RevokeCause::Shutdown))
            .iter()
            .filter(|r| r.is_ok())
            .count();
        if claimed.len() < limit && shared.leases.len() > 0 {
            // Everything left just failed: give the cause a moment before the next round (jittered: a fleet
            // shutting down together does not retry together).
            std::thread::sleep(
                crate::backoff::equal_jitter(Duration::from_millis(200))
                    .min(deadline.saturating_duration_since(Instant::now())),
            );
        }
    }
}

/// How long stopping the broker with [`ShutdownMode::Keep`] waits for revocations in flight before leaving
/// them to finish in the background.
const KEEP_SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// Stops the broker, on this thread: stops and joins the sweeper, then keeps or revokes the leases as `mode`
/// says. The calls after the first return `Ok` at once.
pub(crate) fn stop(
    shared: &Arc<Shared>,
    sweeper: &Mutex<Option<JoinHandle<()>>>,
    mode: ShutdownMode,
) -> Result<(), Error> {
    let Some(sweeper) = sweeper.lock().take() else {
        return Ok(());
    };
    let deadline = match mode {
        ShutdownMode::Keep => later(KEEP_SHUTDOWN_WAIT),
        ShutdownMode::Revoke { timeout } => later(timeout),
    };
    shared.leases.begin_shutdown(deadline);
    // The sweeper only waits and hands out work, so it returns at once; its workers are waited for below.
    if sweeper.join().is_err() {
        log::error!("the sweeper thread panicked");
    }
    match mode {
        ShutdownMode::Keep => {
            let running = shared.leases.wait_for_workers(deadline);
            if running > 0 {
                log::warn!(
                    "shut down while {running} revocations were still running (blocked or slow); they go on in \
                     the background, each bounded by the statement and lock timeouts"
                );
            }
            let left = shared.leases.len();
            log::info!(
                "shut down; kept {left} leases: their roles work until VALID UNTIL, and the next start of \
                 instance {} adopts them",
                shared.instance
            );
            Ok(())
        }
        ShutdownMode::Revoke { timeout } => revoke_all(shared, timeout, deadline).map(|_| ()),
    }
}
