//! The sweeper: one background thread where leases expire. It revokes leases when they expire, retries failed
//! revocations, and every orphan-sweep interval drops the expired marked roles no lease table holds.
//!
//! It sleeps on a condition variable until the earliest lease is due (woken early when a lease that expires
//! sooner is added, and at shutdown), claims up to one batch of due leases per connection it may use under the lock, and revokes them with
//! the lock released, so `creds` and `renew` in other threads never wait for a sweep.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::broker::Shared;
use crate::recovery::sweep_orphans;
use crate::revoke::{revoke_leases, Why, BATCH};

/// Longest sleep: bounds how long a jump of the wall clock can delay a sweep.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The sweeper thread's body; returns when the broker shuts down.
pub(crate) fn run(shared: Arc<Shared>) {
    log::debug!("sweeper started");
    // Recovery at build has just swept orphans.
    let mut next_orphan_sweep = Instant::now() + shared.orphan_interval;
    loop {
        let due = {
            let mut state = shared.state.lock();
            loop {
                if state.shutdown {
                    log::debug!("sweeper stopped");
                    return;
                }
                if Instant::now() >= next_orphan_sweep {
                    break Vec::new();
                }
                let now = SystemTime::now();
                // Enough for every connection revocation may use to drop one batch.
                let due = state
                    .table
                    .claim_due(now, BATCH * shared.revocation_workers());
                if !due.is_empty() {
                    break due;
                }
                let sleep = state
                    .table
                    .next_due()
                    .map_or(MAX_SLEEP, |t| {
                        t.duration_since(now).unwrap_or(Duration::ZERO)
                    })
                    .min(next_orphan_sweep.saturating_duration_since(Instant::now()))
                    .min(MAX_SLEEP);
                shared.wake.wait_for(&mut state, sleep);
            }
        };
        if due.is_empty() {
            sweep_orphans(&shared);
            next_orphan_sweep = Instant::now() + shared.orphan_interval;
            continue;
        }
        let (expired, retried): (Vec<_>, Vec<_>) = due.into_iter().partition(|l| l.attempts == 0);
        // Failures are recorded in the lease table and logged by revoke_leases.
        let _ = revoke_leases(&shared, &expired, Why::Expired);
        let _ = revoke_leases(&shared, &retried, Why::Retried);
    }
}
