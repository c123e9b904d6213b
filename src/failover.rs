//! Failover: noticing that the admin connections reach a different primary, and remembering what
//! [`reconcile`](crate::reconcile) needs to put the catalog of the new one back in line with the lease table.
//!
//! With asynchronous replication a failover loses the last transactions the old primary committed. For the broker
//! that means two things: a role it **dropped** a moment before can exist again on the promoted replica, with
//! its password (a revoked credential that works again), and a role it **created** (or a renewal) can be missing.
//!
//! - **Detection.** Every new admin connection ([`Failover::check_new`]) and a probe every [`PROBE_INTERVAL`] on an
//!   idle one (see [`probe`](crate::reconcile::probe)) read
//!   the server's *identity*: the system identifier (`pg_control_system()`, copied by a base backup, so the same
//!   on a replica) and the current timeline, which promotion increments. The timeline is read from the name of
//!   the current WAL file (`pg_walfile_name(pg_current_wal_lsn())`): `pg_control_checkpoint().timeline_id` still
//!   shows the old timeline on a just-promoted primary until its first checkpoint completes (measured: 1 right
//!   after `pg_ctl promote` returned, 2 about two seconds later, on 15). A restart of the same server keeps both,
//!   so it is no failover. A standby (no `target_session_attrs=read-write`) reports no identity.
//! - **Memory.** Every role the broker drops is remembered for [`failover_window`] (bounded by
//!   [`RECENT_CAP`] entries): lease id, username, role definition, when.
//! - **Reconciliation**, on the sweeper's workers once the identity changed: every remembered role that exists on
//!   the new primary is dropped again, with the same revocation as before (sessions ended, objects handed to the
//!   owner); every live lease whose role does not exist there is taken out of the table and reported
//!   ([`HandleEvent::handle_lost`](crate::HandleEvent::handle_lost), and [`ErrorKind::LeaseLost`] from `renew`
//!   and `revoke`), so a [`RolePool`](crate::RolePool) holding it rotates to a new credential; a live lease whose
//!   `VALID UNTIL` went back (a renewal lost) gets it again.
//!
//! [`failover_window`]: crate::BrokerBuilder::failover_window

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use postgres::{Client, SimpleQueryMessage};

use crate::error::{describe, Error, ErrorKind};
use crate::lease::{pg_timestamp, Lease};
use crate::role::CompiledRole;
use crate::sql;

/// Default [`BrokerBuilder::failover_window`](crate::BrokerBuilder::failover_window).
pub(crate) const DEFAULT_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Longest failover window.
pub(crate) const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Most dropped roles remembered; the oldest are forgotten first (logged when one younger than the window goes).
pub(crate) const RECENT_CAP: usize = 100_000;
/// Most lost leases remembered, so that `renew` of one says why it fails.
const LOST_CAP: usize = 10_000;
/// How often the sweeper checks the server's identity, so that an idle broker notices a failover too.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Which server, and which history of it, the admin connections reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Identity {
    system_identifier: i64,
    timeline: u32,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "system {} timeline {}",
            self.system_identifier, self.timeline
        )
    }
}

/// Reads the identity of the server `client` is connected to; `None` on a standby (it has no current WAL).
pub(crate) fn identity(client: &mut Client) -> Result<Option<Identity>, postgres::Error> {
    for message in client.simple_query(sql::SERVER_IDENTITY)? {
        if let SimpleQueryMessage::Row(row) = message {
            // `try_get`: this runs on background threads, where a panic is not allowed.
            let system = row.try_get(0)?.and_then(|s| s.parse().ok());
            let timeline = row
                .try_get(1)?
                .and_then(|t| u32::from_str_radix(t, 16).ok());
            if let (Some(system_identifier), Some(timeline)) = (system, timeline) {
                return Ok(Some(Identity {
                    system_identifier,
                    timeline,
                }));
            }
        }
    }
    Ok(None)
}

/// A role the broker dropped, remembered for the failover window.
#[derive(Clone)]
pub(crate) struct Dropped {
    at: Instant,
    pub(crate) revoked_at: SystemTime,
    pub(crate) lease_id: String,
    pub(crate) username: String,
    pub(crate) role: Arc<CompiledRole>,
}

/// What the broker remembers for failovers; shared by the admin pool's connection hook and the broker.
pub(crate) struct Failover {
    window: Duration,
    /// Set when a new identity was seen and the sweeper has not been told yet (read at every checkout: one
    /// atomic load).
    unannounced: AtomicBool,
    /// Whether a reconciliation is running (the probe and a reconciliation request may both start one).
    reconciling: AtomicBool,
    /// Whether reading the identity failed once (logged once).
    unreadable: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The identity the broker last reconciled with (or first saw).
    known: Option<Identity>,
    /// A different identity seen since, to reconcile with (kept until reconciliation succeeds).
    seen: Option<Identity>,
    /// Failovers reconciled.
    reconciled: u64,
    recent: VecDeque<Dropped>,
    /// Whether an entry younger than the window was forgotten because of the cap (logged once).
    cap_warned: bool,
    lost: HashMap<String, (Lease, SystemTime)>,
    lost_order: VecDeque<String>,
}

impl Failover {
    pub(crate) fn new(window: Duration) -> Failover {
        Failover {
            window,
            unannounced: AtomicBool::new(false),
            reconciling: AtomicBool::new(false),
            unreadable: AtomicBool::new(false),
            state: Mutex::new(State::default()),
        }
    }

    /// Records the identity a connection reported. The first one is the reference; a different one later is a
    /// failover, reconciled by the sweeper.
    pub(crate) fn observe(&self, identity: Identity) {
        let mut state = self.state.lock();
        match state.known {
            None => state.known = Some(identity),
            Some(known) if known == identity => {}
            Some(_) => {
                if state.seen != Some(identity) {
                    state.seen = Some(identity);
                    self.unannounced.store(true, Ordering::Release);
                }
            }
        }
    }

    /// Whether a failover was seen since the last call: the caller wakes the sweeper.
    pub(crate) fn take_announcement(&self) -> bool {
        self.unannounced.load(Ordering::Acquire) && self.unannounced.swap(false, Ordering::AcqRel)
    }

    /// Whether there is a failover to reconcile (a new one, or one whose reconciliation failed).
    pub(crate) fn pending(&self) -> bool {
        self.state.lock().seen.is_some()
    }

    /// How many failovers were reconciled.
    pub(crate) fn reconciled(&self) -> u64 {
        self.state.lock().reconciled
    }

    /// Remembers a role the broker dropped.
    pub(crate) fn dropped(&self, lease_id: &str, username: &str, role: &Arc<CompiledRole>) {
        let now = Instant::now();
        let mut state = self.state.lock();
        state.recent.push_back(Dropped {
            at: now,
            revoked_at: SystemTime::now(),
            lease_id: lease_id.to_owned(),
            username: username.to_owned(),
            role: role.clone(),
        });
        let mut evicted_young = false;
        while let Some(oldest) = state.recent.front() {
            let expired = now.duration_since(oldest.at) > self.window;
            if !expired && state.recent.len() <= RECENT_CAP {
                break;
            }
            evicted_young |= !expired;
            state.recent.pop_front();
        }
        let warn = evicted_young && !state.cap_warned;
        state.cap_warned |= evicted_young;
        drop(state);
        if warn {
            log::warn!(
                "more than {RECENT_CAP} roles dropped within the failover window of {:?}: the oldest are \
                 forgotten early, and a failover would not drop them again; shorten failover_window",
                self.window
            );
        }
    }

    /// The error for `renew` or `revoke` of a lease lost in a failover, if `id` is one.
    pub(crate) fn lost_error(&self, id: &str) -> Option<Error> {
        let state = self.state.lock();
        let (lease, at) = state.lost.get(id)?;
        Some(Error::new(
            ErrorKind::LeaseLost,
            format!(
                "lease {id} (user {}) was lost in a failover: its role did not exist on the new primary when the \
                 broker reconciled at {} (the failover lost the transaction that created it); request new \
                 credentials",
                lease.username,
                pg_timestamp(*at)
            ),
        ))
    }

    pub(crate) fn remember_lost(&self, leases: &[Lease], at: SystemTime) {
        let mut state = self.state.lock();
        for lease in leases {
            if state
                .lost
                .insert(lease.id.clone(), (lease.clone(), at))
                .is_none()
            {
                state.lost_order.push_back(lease.id.clone());
            }
        }
        while state.lost_order.len() > LOST_CAP {
            if let Some(id) = state.lost_order.pop_front() {
                state.lost.remove(&id);
            }
        }
    }
}

impl fmt::Debug for Failover {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failover")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

impl Failover {
    /// Reads the identity of a new admin connection. Never fails the connection: a server that hides its identity
    /// (a managed service that revoked the functions, say) still gets a broker, without failover detection
    /// (logged once); a connection that broke meanwhile is found closed at its first use and replaced then.
    pub(crate) fn check_new(&self, client: &mut Client) {
        match identity(client) {
            Ok(Some(identity)) => self.observe(identity),
            Ok(None) => {}
            Err(_) if client.is_closed() => {}
            Err(e) => {
                if !self.unreadable.swap(true, Ordering::AcqRel) {
                    log::warn!(
                        "cannot read the server's identity ({}): failovers will not be noticed, and revocations a \
                         failover loses are not done again; let the admin execute pg_control_system(), \
                         pg_walfile_name() and pg_current_wal_lsn()",
                        describe(&e)
                    );
                }
            }
        }
    }
}

/// A change of primary to reconcile with: the identity known before, the new one, and the roles dropped within
/// the failover window.
pub(crate) struct Pending {
    pub(crate) from: Option<Identity>,
    pub(crate) to: Identity,
    pub(crate) recent: Vec<Dropped>,
}

/// The one reconciliation running; the next may start once it is dropped, however it ends.
pub(crate) struct ReconcileTurn<'a>(&'a AtomicBool);

impl Drop for ReconcileTurn<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// What [`reconcile`](crate::reconcile) reads and records.
impl Failover {
    /// The turn to reconcile, unless a reconciliation is running (the probe and a request may both start one).
    pub(crate) fn begin_reconcile(&self) -> Option<ReconcileTurn<'_>> {
        (!self.reconciling.swap(true, Ordering::AcqRel)).then_some(ReconcileTurn(&self.reconciling))
    }

    /// The change of primary not yet reconciled, if any.
    pub(crate) fn pending_change(&self) -> Option<Pending> {
        let state = self.state.lock();
        let to = state.seen?;
        let now = Instant::now();
        let recent = state
            .recent
            .iter()
            .filter(|d| now.duration_since(d.at) <= self.window)
            .cloned()
            .collect();
        Some(Pending {
            from: state.known,
            to,
            recent,
        })
    }

    /// Records that the catalog of primary `to` is in line with the lease table.
    pub(crate) fn reconciled_with(&self, to: Identity) {
        let mut state = self.state.lock();
        state.known = Some(to);
        if state.seen == Some(to) {
            state.seen = None;
        }
        state.reconciled += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeasePolicy;

    fn role() -> Arc<CompiledRole> {
        let day = Duration::from_secs(86_400);
        let policy = LeasePolicy {
            default: day,
            max: day,
        };
        Arc::new(CompiledRole::compile("app", crate::Role::new(), policy).expect("a valid role"))
    }

    fn at(system_identifier: i64, timeline: u32) -> Identity {
        Identity {
            system_identifier,
            timeline,
        }
    }

    #[test]
    fn the_first_identity_is_the_reference_and_another_is_announced_once() {
        let failover = Failover::new(DEFAULT_WINDOW);
        failover.observe(at(7, 1));
        failover.observe(at(7, 1));
        assert!(!failover.pending() && !failover.take_announcement());
        // A promoted replica: same system, next timeline.
        failover.observe(at(7, 2));
        failover.observe(at(7, 2));
        assert!(failover.pending());
        assert!(failover.take_announcement());
        assert!(!failover.take_announcement());
        // Another server altogether counts too.
        failover.observe(at(8, 1));
        assert!(failover.take_announcement());
    }

    #[test]
    fn dropped_roles_are_bounded_by_the_cap() {
        let failover = Failover::new(MAX_WINDOW);
        let role = role();
        for n in 0..RECENT_CAP + 10 {
            failover.dropped(&format!("lease-{n}"), &format!("app-{n}"), &role);
        }
        let state = failover.state.lock();
        assert_eq!(state.recent.len(), RECENT_CAP);
        assert_eq!(
            state.recent.front().map(|d| d.username.as_str()),
            Some("app-10")
        );
        assert!(state.cap_warned);
    }

    #[test]
    fn lost_leases_say_why_and_are_bounded() {
        let failover = Failover::new(DEFAULT_WINDOW);
        let t = SystemTime::UNIX_EPOCH;
        let lease = |n: usize| Lease {
            id: format!("postgresql/creds/app/{n}"),
            role: "app".into(),
            username: format!("app-{n}"),
            issued_at: t,
            expires_at: t,
            max_expires_at: t,
            revocation_attempts: 0,
            last_error: None,
        };
        let leases: Vec<Lease> = (0..LOST_CAP + 5).map(lease).collect();
        failover.remember_lost(&leases, SystemTime::now());
        assert!(failover.lost_error("postgresql/creds/app/0").is_none());
        let err = failover
            .lost_error(&format!("postgresql/creds/app/{}", LOST_CAP + 4))
            .expect("remembered");
        assert_eq!(err.kind(), ErrorKind::LeaseLost);
        assert!(err.to_string().contains("failover"), "{err}");
        assert!(failover
            .lost_error("postgresql/creds/app/unknown")
            .is_none());
    }
}
