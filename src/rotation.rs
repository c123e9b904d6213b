//! Rotation: the thread each [`RolePool`](crate::RolePool) runs to keep its credential valid.
//!
//! - **Renewal.** Once half of the current lease's duration has passed, the lease is renewed by its duration
//!   (capped at its max), so `VALID UNTIL` stays ahead of the logins the pool makes.
//! - **Make before break.** `rotate_before` ahead of the lease's max, the pool obtains a new credential and makes
//!   it current: new connections log in with it. The old lease is renewed to its max, so connections still
//!   checked out keep a role to run as; idle connections of the old credential are closed at once, checked-out
//!   ones when they are returned.
//! - **Revocation.** The old lease is revoked as soon as its last connection is closed (on a second thread, so
//!   renewals never wait behind it), or, if one is held longer, by the sweeper at the lease's end (which also ends
//!   that connection's session).
//!
//! Failures (the database down, say) are logged and retried after 1 s, doubling up to 30 s, with equal jitter
//! (half of each delay random, so that the pools of a fleet do not retry together after a restart); the pool keeps serving
//! connections of the current credential meanwhile.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::broker::Shared;
use crate::events::RevokeCause;
use crate::pool::{Credentials, Generation, LeaseManager};

/// Longest sleep while all is well (so a lease revoked from outside, or the broker's shutdown, is noticed within
/// it), and the first delay before retrying a failed renewal or rotation.
const TICK: Duration = Duration::from_secs(1);
/// Shortest sleep.
const SOON: Duration = Duration::from_millis(100);
/// Longest delay between retries of a renewal or rotation that keeps failing (it doubles from [`TICK`]).
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// The rotation thread's body; returns when the pool is dropped or the broker shuts down.
///
/// Retired leases are revoked on a second thread: a revocation can take a while (it waits up to 5 s for each
/// ended session to exit), and a renewal of the current lease must never wait behind it. With a 2-second lease,
/// a renewal is due 1 s before the lease ends; a rotation thread busy revoking for that long let the current
/// lease expire, and the sweeper ended every connection of the pool (seen once in a dozen benchmark runs).
pub(crate) fn run(
    shared: &Arc<Shared>,
    credentials: &Credentials,
    pool: &r2d2::Pool<LeaseManager>,
    rotate_before: Duration,
) {
    let (drained, revocations) = std::sync::mpsc::channel::<String>();
    std::thread::scope(|scope| {
        let revoker = std::thread::Builder::new()
            .name(format!("credbroker-pool-{}-revoke", credentials.role))
            .spawn_scoped(scope, || {
                for id in revocations {
                    credentials.revoke(shared, &id, RevokeCause::Rotated);
                }
            });
        if let Err(e) = revoker {
            log::error!(
                "pool of role {}: could not start its revocation thread ({e}); retired leases are left to \
                 expire",
                credentials.role
            );
        }
        keep_valid(shared, credentials, pool, rotate_before, &drained);
        // Dropping the sender ends the revocation thread once it has revoked what it was given.
        drop(drained);
    });
}

/// Renews and rotates until the pool is dropped or the broker shuts down; hands each retired lease whose last
/// connection has closed to `drained`.
fn keep_valid(
    shared: &Shared,
    credentials: &Credentials,
    pool: &r2d2::Pool<LeaseManager>,
    rotate_before: Duration,
    drained: &std::sync::mpsc::Sender<String>,
) {
    let mut failures = 0;
    loop {
        // At least SOON between two looks: a lease of a second or two must not turn this into a busy loop.
        let next = match keep_current(shared, credentials, pool, rotate_before) {
            Some(at) => {
                failures = 0;
                at.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .clamp(SOON, TICK)
            }
            None => {
                failures += 1;
                crate::backoff::retry_delay(failures, TICK, MAX_RETRY_DELAY)
            }
        };
        for generation in take_drained(credentials) {
            // Fails only if the revocation thread is gone; the sweeper revokes the lease at its end then.
            let _ = drained.send(generation.lease_id.clone());
        }
        let mut signal = credentials.signal.lock();
        if !signal.stop && !signal.drained {
            credentials.wake.wait_for(&mut signal, next);
        }
        signal.drained = false;
        if signal.stop {
            return;
        }
        drop(signal);
        if shared.leases.is_shut_down() {
            log::info!(
                "the broker has shut down: pool of role {} stops renewing and rotating; its connections work until \
                 the lease ends",
                credentials.role
            );
            return;
        }
    }
}

/// Renews or rotates the current credential if it is time; returns when to look again, or `None` if renewing or
/// rotating failed (it is logged).
fn keep_current(
    shared: &Shared,
    credentials: &Credentials,
    pool: &r2d2::Pool<LeaseManager>,
    rotate_before: Duration,
) -> Option<SystemTime> {
    let current = credentials.current();
    let now = SystemTime::now();
    let times = shared.leases.live_times(&current.lease_id);
    let renew_at = |expires: SystemTime| {
        expires
            .checked_sub(current.lease_duration / 2)
            .unwrap_or(expires)
    };
    // No lease means it is gone: revoked by hand, or expired while renewals failed.
    let Some((expires, max)) = times else {
        return rotate(shared, credentials, pool).then_some(now);
    };
    let rotate_at = max.checked_sub(rotate_before).unwrap_or(max);
    if now >= rotate_at {
        return rotate(shared, credentials, pool).then_some(now);
    }
    if expires >= max {
        return Some(rotate_at);
    }
    if now < renew_at(expires) {
        return Some(renew_at(expires).min(rotate_at));
    }
    match shared.renew(&current.lease_id, Some(current.lease_duration)) {
        Ok(lease) => Some(renew_at(lease.expires_at).min(rotate_at)),
        Err(e) => {
            log::warn!("pool of role {}: {e}; retrying", credentials.role);
            None
        }
    }
}

/// Obtains a new credential, makes it current, extends the old lease to its max and closes idle connections of
/// the old credential. Returns whether it rotated.
fn rotate(shared: &Shared, credentials: &Credentials, pool: &r2d2::Pool<LeaseManager>) -> bool {
    let credential = match shared.creds(&credentials.role) {
        Ok(credential) => credential,
        Err(e) => {
            log::warn!(
                "pool of role {} could not rotate: {e}; it keeps the current credential and retries",
                credentials.role
            );
            return false;
        }
    };
    let new_id = credential.lease_id().to_owned();
    let old = credentials.rotate(credential);
    // Connections checked out before the rotation keep their role until the old lease's max.
    if let Err(e) = shared.renew(&old.lease_id, Some(crate::lease::MAX_LEASE)) {
        log::debug!("rotation could not extend the old lease: {e}");
    }
    log::info!(
        "pool of role {} rotated from lease {} (user {}) to lease {new_id}",
        credentials.role,
        old.lease_id,
        old.username
    );
    shared.leases.rotated(&old.lease_id, &new_id);
    close_idle(pool);
    true
}

/// Closes the idle connections of retired credentials now rather than at their next checkout: checks out every
/// idle connection (r2d2 closes the retired ones as it goes) and returns the rest at once.
fn close_idle(pool: &r2d2::Pool<LeaseManager>) {
    let idle = pool.state().idle_connections;
    let held: Vec<_> = (0..idle).map_while(|_| pool.try_get()).collect();
    drop(held);
}

/// Takes the retired credentials whose last connection has closed out of the pool's list.
fn take_drained(credentials: &Credentials) -> Vec<Arc<Generation>> {
    let mut retired = credentials.retired.lock();
    let (drained, busy): (Vec<_>, Vec<_>) = retired.drain(..).partition(|g| g.connections() == 0);
    *retired = busy;
    drained
}
