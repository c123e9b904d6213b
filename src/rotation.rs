//! Rotation: the thread each pool ([`RolePool`](crate::RolePool), and the sqlx and deadpool pools) runs to keep
//! its credential valid. What differs between pool kinds (how a connection's credential is known, how idle ones
//! are closed, how a retired credential is known to have no connection left) is behind [`Rotating`].
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
//! Failures (the database down, say) are logged and retried after 1 s, doubling up to 30 s, with equal jitter (half of
//! each delay random, so that the pools of a fleet do not retry together after a restart); the pool keeps serving
//! connections of the current credential meanwhile.

use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Condvar, Mutex};

use crate::credential::Credential;
use crate::error::{Error, ErrorKind};
use crate::events::RevokeCause;
use crate::leases::LeaseEnd;
use crate::shared::Shared;

/// Longest sleep while all is well (so a lease revoked from outside, or the broker's shutdown, is noticed within
/// it), and the first delay before retrying a failed renewal or rotation.
const TICK: Duration = Duration::from_secs(1);
/// Shortest sleep.
const SOON: Duration = Duration::from_millis(100);
/// Longest delay between retries of a renewal or rotation that keeps failing (it doubles from [`TICK`]).
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// What the rotation thread needs of a pool, whatever its kind.
pub(crate) trait Rotating: Sync {
    /// The broker role the pool's credentials are issued for.
    fn role(&self) -> &str;
    /// The current credential's lease id, and how long renewals extend it.
    fn current_lease(&self) -> (String, Duration);
    /// Makes `credential` current: new connections log in with it. Returns the lease id and username of the
    /// credential it replaces, now retired.
    fn rotate(&self, credential: Credential) -> (String, String);
    /// Closes the idle connections of retired credentials now, rather than when they are next checked out.
    fn close_idle(&self);
    /// Takes the retired credentials none of whose connections remain out of the pool's list; returns their
    /// lease ids.
    fn take_drained(&self, shared: &Shared) -> Vec<String>;
    /// Wakes the thread, or tells it to stop.
    fn wake(&self) -> &Wake;
    /// Whether the pool is gone (for pools the thread does not keep alive).
    fn is_closed(&self) -> bool {
        false
    }
}

/// Wakes a rotation thread: a retired credential lost its last connection, or the pool is closing.
#[derive(Debug, Default)]
pub(crate) struct Wake {
    signal: Mutex<Signal>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct Signal {
    stop: bool,
    drained: bool,
}

impl Wake {
    /// A retired credential may have no connection left: look now.
    pub(crate) fn poke(&self) {
        self.signal.lock().drained = true;
        self.cond.notify_all();
    }

    /// The pool is closing: the thread returns at its next look.
    pub(crate) fn stop(&self) {
        self.signal.lock().stop = true;
        self.cond.notify_all();
    }

    /// Whether the pool has been told to stop.
    #[cfg(feature = "sqlx")]
    pub(crate) fn stopped(&self) -> bool {
        self.signal.lock().stop
    }

    /// Waits up to `timeout` for a poke or stop; returns whether to stop.
    fn wait(&self, timeout: Duration) -> bool {
        let mut signal = self.signal.lock();
        if !signal.stop && !signal.drained {
            self.cond.wait_for(&mut signal, timeout);
        }
        signal.drained = false;
        signal.stop
    }
}

/// Revokes lease `id` of a pool of `role`, unless it is already gone (the sweeper revoked it at its end). A
/// failure is logged and left to the sweeper, which retries it.
pub(crate) fn revoke(shared: &Shared, role: &str, id: &str, cause: RevokeCause) {
    match crate::revoke::revoke(shared, id, LeaseEnd::Revoked(cause)) {
        Ok(()) => {}
        // Gone already: the sweeper revoked it at its end, or a failover lost its role.
        Err(e) if matches!(e.kind(), ErrorKind::UnknownLease | ErrorKind::LeaseLost) => {}
        Err(e) => log::warn!("pool of role {role}: {e}"),
    }
}

/// Starts the rotation thread of `pool`; once the pool is closed or the broker has shut down, it calls `finish`.
pub(crate) fn spawn<P: Rotating + Send + 'static>(
    shared: &Arc<Shared>,
    pool: P,
    rotate_before: Duration,
    finish: impl FnOnce(&Shared, &P) + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, Error> {
    let shared = shared.clone();
    std::thread::Builder::new()
        .name(format!("credbroker-pool-{}", pool.role()))
        .spawn(move || {
            run(&shared, &pool, rotate_before);
            finish(&shared, &pool);
        })
        .map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                "could not start the pool's rotation thread",
            )
            .with_source(e)
        })
}

/// The rotation thread's body; returns when the pool is dropped or the broker shuts down.
///
/// Retired leases are revoked on a second thread: a revocation can take a while (it waits up to 5 s for each
/// ended session to exit), and a renewal of the current lease must never wait behind it. With a 2-second lease,
/// a renewal is due 1 s before the lease ends; a rotation thread busy revoking for that long let the current
/// lease expire, and the sweeper ended every connection of the pool (seen once in a dozen benchmark runs).
fn run(shared: &Arc<Shared>, pool: &impl Rotating, rotate_before: Duration) {
    let (drained, revocations) = std::sync::mpsc::channel::<String>();
    std::thread::scope(|scope| {
        let revoker = std::thread::Builder::new()
            .name(format!("credbroker-pool-{}-revoke", pool.role()))
            .spawn_scoped(scope, || {
                for id in revocations {
                    revoke(shared, pool.role(), &id, RevokeCause::Rotated);
                }
            });
        if let Err(e) = revoker {
            log::error!(
                "pool of role {}: could not start its revocation thread ({e}); retired leases are left to \
                 expire",
                pool.role()
            );
        }
        keep_valid(shared, pool, rotate_before, &drained);
        // Dropping the sender ends the revocation thread once it has revoked what it was given.
        drop(drained);
    });
}

/// Renews and rotates until the pool is dropped or the broker shuts down; hands each retired lease whose last
/// connection has closed to `drained`.
fn keep_valid(
    shared: &Shared,
    pool: &impl Rotating,
    rotate_before: Duration,
    drained: &Sender<String>,
) {
    let mut failures = 0;
    loop {
        // At least SOON between two looks: a lease of a second or two must not turn this into a busy loop.
        let next = match keep_current(shared, pool, rotate_before) {
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
        for id in pool.take_drained(shared) {
            // Fails only if the revocation thread is gone; the sweeper revokes the lease at its end then.
            let _ = drained.send(id);
        }
        if pool.wake().wait(next) || pool.is_closed() {
            return;
        }
        if shared.leases.is_shut_down() {
            log::info!(
                "the broker has shut down: pool of role {} stops renewing and rotating; its connections work until \
                 the lease ends",
                pool.role()
            );
            return;
        }
    }
}

/// Renews or rotates the current credential if it is time; returns when to look again, or `None` if renewing or
/// rotating failed (it is logged).
fn keep_current(
    shared: &Shared,
    pool: &impl Rotating,
    rotate_before: Duration,
) -> Option<SystemTime> {
    let (lease_id, lease_duration) = pool.current_lease();
    let now = SystemTime::now();
    let times = shared.leases.live_times(&lease_id);
    let renew_at = |expires: SystemTime| expires.checked_sub(lease_duration / 2).unwrap_or(expires);
    // No lease means it is gone: revoked by hand, or expired while renewals failed.
    let Some((expires, max)) = times else {
        return rotate(shared, pool).then_some(now);
    };
    let rotate_at = max.checked_sub(rotate_before).unwrap_or(max);
    if now >= rotate_at {
        return rotate(shared, pool).then_some(now);
    }
    if expires >= max {
        return Some(rotate_at);
    }
    if now < renew_at(expires) {
        return Some(renew_at(expires).min(rotate_at));
    }
    match crate::renew::renew(shared, &lease_id, Some(lease_duration)) {
        Ok(lease) => Some(renew_at(lease.expires_at).min(rotate_at)),
        Err(e) => {
            log::warn!("pool of role {}: {e}; retrying", pool.role());
            None
        }
    }
}

/// Obtains a new credential, makes it current, extends the old lease to its max and closes idle connections of
/// the old credential. Returns whether it rotated.
fn rotate(shared: &Shared, pool: &impl Rotating) -> bool {
    let credential = match crate::issue::creds(shared, pool.role()) {
        Ok(credential) => credential,
        Err(e) => {
            log::warn!(
                "pool of role {} could not rotate: {e}; it keeps the current credential and retries",
                pool.role()
            );
            return false;
        }
    };
    let new_id = credential.lease_id().to_owned();
    let (old_id, old_user) = pool.rotate(credential);
    // Connections checked out before the rotation keep their role until the old lease's max.
    if let Err(e) = crate::renew::renew(shared, &old_id, Some(crate::lease::MAX_LEASE)) {
        log::debug!("rotation could not extend the old lease: {e}");
    }
    log::info!(
        "pool of role {} rotated from lease {old_id} (user {old_user}) to lease {new_id}",
        pool.role()
    );
    shared.leases.rotated(&old_id, &new_id);
    pool.close_idle();
    true
}
