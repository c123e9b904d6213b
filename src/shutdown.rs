//! Shutdown: what happens to this instance's leases when the broker stops.

use std::time::{Duration, Instant};

use crate::broker::Shared;
use crate::error::{Error, ErrorKind};
use crate::events::RevokeCause;
use crate::revoke::{revoke_leases, Why, BATCH};

/// What [`Broker::shutdown`](crate::Broker::shutdown), and dropping a [`Broker`](crate::Broker), do with the
/// leases still in the table. Set the default for `Drop` with
/// [`BrokerBuilder::shutdown_mode`](crate::BrokerBuilder::shutdown_mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShutdownMode {
    /// Leave the roles in place: they keep working until their `VALID UNTIL`, and the next start of the same
    /// instance adopts them (or any instance drops them once expired).
    #[default]
    Keep,
    /// Revoke every lease this instance holds, giving up after `timeout`: roles not dropped by then stay marked,
    /// fenced by `VALID UNTIL`, for the next start or another instance's orphan sweep.
    Revoke {
        /// How long revoking may take in all.
        timeout: Duration,
    },
}

/// Revokes every lease in the table, in batches, retrying failures until `timeout` has passed. The sweeper must
/// already be stopped.
pub(crate) fn revoke_all(shared: &Shared, timeout: Duration) -> Result<usize, Error> {
    let deadline = Instant::now() + timeout;
    let mut revoked = 0;
    loop {
        let claimed = shared
            .state
            .lock()
            .table
            .claim_all(BATCH * shared.revocation_workers());
        if claimed.is_empty() {
            log::info!("shutdown: revoked {revoked} leases");
            return Ok(revoked);
        }
        revoked += revoke_leases(shared, &claimed, Why::Revoke(RevokeCause::Shutdown))
            .iter()
            .filter(|r| r.is_ok())
            .count();
        let left = shared.state.lock().table.len();
        if left > 0 && Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::Revocation,
                format!(
                    "shutdown: revoked {revoked} leases, {left} could not be revoked within {timeout:?}; their roles \
                     are NOLOGIN where revocation started, fenced by VALID UNTIL, and dropped by the next start or \
                     another instance's orphan sweep"
                ),
            ));
        }
        if claimed.len() < BATCH * shared.revocation_workers() && left > 0 {
            // Everything left just failed: give the cause a moment before the next round.
            std::thread::sleep(Duration::from_millis(200).min(deadline - Instant::now()));
        }
    }
}
