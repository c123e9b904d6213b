//! Shutdown: what happens to this instance's leases when the broker stops.

use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::broker::Shared;
use crate::error::{Error, ErrorKind};
use crate::events::RevokeCause;
use crate::leases::Why;
use crate::revoke::{revoke_leases, BATCH};

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
        revoked += revoke_leases(shared, &claimed, Why::Revoke(RevokeCause::Shutdown))
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
