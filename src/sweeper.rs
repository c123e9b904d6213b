//! The sweeper: the background thread where leases expire. It revokes leases when they expire, retries failed
//! revocations, and every orphan-sweep interval drops the expired marked roles no lease table holds.
//!
//! It sleeps until the earliest lease is due (woken early when a lease that expires sooner is added or
//! renewed to an earlier end, when a worker finishes, and at shutdown), claims up to one batch of due leases,
//! and hands it to a worker thread. Up to one worker per connection revocation may use runs at once, so a
//! revocation stuck on a lock (for at most the lock timeout) never keeps other leases from being dropped on
//! time; `creds` and `renew` in other threads never wait for a sweep.

use std::sync::Arc;

use crate::drop_role::BATCH;
use crate::failover::PROBE_INTERVAL;
use crate::lease_table::DueLease;
use crate::leases::{later, LeaseEnd, SweeperWork};
use crate::reconcile;
use crate::recovery::sweep_orphans;
use crate::revoke::revoke_leases_unflushed;
use crate::shared::Shared;

/// The sweeper thread's body; returns when the broker shuts down.
pub(crate) fn run(shared: Arc<Shared>) {
    log::debug!("sweeper started");
    // Recovery at build has just swept orphans.
    // Spread ±25%: instances started together (a fleet after a restart) would otherwise all connect for the
    // sweep's lock at the same moments.
    let mut next_orphan_sweep = later(crate::backoff::spread(shared.orphan_interval));
    let mut next_probe = later(PROBE_INTERVAL);
    loop {
        shared.leases.set_gauges();
        let work = shared.leases.next_sweeper_work(
            BATCH,
            shared.revocation_workers(),
            next_orphan_sweep.min(next_probe),
        );
        let job = match work {
            SweeperWork::Stop => {
                log::debug!("sweeper stopped");
                return;
            }
            SweeperWork::Revoke(due) => Job::Revoke(due),
            SweeperWork::Reconcile => Job::Reconcile,
            // One timer for two jobs: whichever was due first, so a short orphan interval never starves the
            // failover probe.
            SweeperWork::Orphans if next_probe <= next_orphan_sweep => {
                next_probe = later(PROBE_INTERVAL);
                Job::Probe
            }
            SweeperWork::Orphans => {
                next_orphan_sweep = later(crate::backoff::spread(shared.orphan_interval));
                Job::Orphans
            }
        };
        // If no thread can be started, the work is done on this one: it must never be lost, its leases are
        // claimed.
        let slot = Arc::new(parking_lot::Mutex::new(Some(job)));
        let spawned = {
            let (shared, slot) = (shared.clone(), slot.clone());
            std::thread::Builder::new()
                .name("credbroker-revoke".into())
                .spawn(move || {
                    if let Some(work) = slot.lock().take() {
                        work_on(&shared, work);
                    }
                })
        };
        if let Err(e) = spawned {
            log::warn!("could not start a revocation thread ({e}); revoking on the sweeper's own");
            if let Some(work) = slot.lock().take() {
                work_on(&shared, work);
            }
        }
    }
}

/// One piece of the sweeper's work, done on a worker thread.
enum Job {
    Revoke(Vec<DueLease>),
    Orphans,
    Probe,
    Reconcile,
}

/// Does one piece of the sweeper's work on a worker thread, then releases the worker.
fn work_on(shared: &Shared, job: Job) {
    /// Releases the worker even if the work panics.
    struct Release<'a>(&'a Shared);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            self.0.leases.worker_done();
        }
    }
    let _release = Release(shared);
    match job {
        Job::Revoke(due) => {
            let (expired, retried): (Vec<_>, Vec<_>) =
                due.into_iter().partition(|l| l.attempts == 0);
            // Failures are recorded in the lease table and logged by revoke_leases. Events go out once both
            // groups are settled, so a handler revoking a lease of either never waits for this thread.
            let _ = revoke_leases_unflushed(shared, &expired, LeaseEnd::Expired);
            let _ = revoke_leases_unflushed(shared, &retried, LeaseEnd::Retried);
            shared.leases.flush();
        }
        Job::Orphans => {
            sweep_orphans(shared);
        }
        Job::Probe => reconcile::probe(shared),
        Job::Reconcile => reconcile::reconcile(shared),
    }
}
