//! The sweeper: one background thread that revokes leases when they expire, and retries failed revocations.
//!
//! It sleeps on a condition variable until the earliest lease is due (woken early when a lease that expires
//! sooner is added, and at shutdown), claims the due leases under the lock, and revokes them with the lock
//! released, so `creds` and `renew` in other threads never wait for a sweep.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::broker::Shared;
use crate::revoke::revoke_lease;

/// Most leases claimed per wake-up; the rest are claimed on the next turn of the loop.
const BATCH: usize = 256;
/// Longest sleep: bounds how long a jump of the wall clock can delay a sweep.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The sweeper thread's body; returns when the broker shuts down.
pub(crate) fn run(shared: Arc<Shared>) {
    log::debug!("sweeper started");
    loop {
        let due = {
            let mut state = shared.state.lock();
            loop {
                if state.shutdown {
                    log::debug!("sweeper stopped");
                    return;
                }
                let now = SystemTime::now();
                let due = state.table.claim_due(now, BATCH);
                if !due.is_empty() {
                    break due;
                }
                let sleep = state
                    .table
                    .next_due()
                    .map_or(MAX_SLEEP, |t| {
                        t.duration_since(now).unwrap_or(Duration::ZERO)
                    })
                    .min(MAX_SLEEP);
                shared.wake.wait_for(&mut state, sleep);
            }
        };
        for lease in &due {
            if shared.state.lock().shutdown {
                return;
            }
            let why = if lease.attempts == 0 {
                "expired"
            } else {
                "retried"
            };
            // Failures are recorded in the lease table and logged by revoke_lease.
            let _ = revoke_lease(&shared, lease, why);
        }
    }
}
