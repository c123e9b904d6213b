//! The lease state: the lease table behind one lock, and every rule about who may change a lease when.
//!
//! Every module that issues, renews, revokes or sweeps goes through [`Leases`]; none touches the lock, the
//! condition variable or the table directly. The rules live here:
//!
//! - **One change of a lease at a time.** A renewal takes the lease's *turn* (a second renewal of the same
//!   lease waits for the first; PostgreSQL fails one of two concurrent `ALTER ROLE` of a role). A revocation
//!   *claims* the lease (it is then *in flight*): a renewal of a claimed lease fails, a claim waits for a
//!   renewal in progress to finish, and a second revocation of a claimed lease *joins* the one in flight and
//!   gets its outcome instead of racing it.
//! - **Events after the state, outside every lock.** A change of state queues its event under the lock, so
//!   events are queued in the order the changes happened. The queue is delivered with no lock held, one event
//!   at a time, by whichever thread finds nobody delivering (the one that made the change, in the usual case);
//!   that thread delivers everything queued meanwhile, from any thread, before it returns.
//!   A handler may therefore call back into the broker: the events its calls make are queued and delivered by
//!   the same thread once the handler returns.
//! - **Every wait is bounded**: a turn, a join and the wait for running revocations at shutdown all give up
//!   after a bound the caller passes.
//! - **The sweeper's revocations run on workers**, at most a fixed number at once, so one revocation stuck on
//!   a lock never keeps other leases from being dropped on time.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::error::{Error, ErrorKind};
use crate::events::{
    AdoptedEvent, Event, Events, ExpiredEvent, IssuedEvent, LostEvent, RenewedEvent,
    RevocationFailedEvent, RevokeCause, RevokedEvent, RoleDroppedEvent, RotatedEvent, Stats,
};
use crate::lease::Lease;
use crate::lease_table::{DueLease, LeaseTable};
use crate::role::CompiledRole;
use crate::telemetry::{self, Gauges};

/// After this many failures a lease is reported at error level (it is still retried).
const FAILURES_BEFORE_ERROR: u32 = 6;

/// Longest the sweeper sleeps: bounds how long a jump of the wall clock can delay a sweep.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// The lease table with its lock, its condition variable, the queue of events and the shutdown flag.
pub(crate) struct Leases {
    state: Mutex<State>,
    /// Signalled on every change a waiter may be waiting for: a lease due sooner, a turn or a claim released, a
    /// revocation worker done, shutdown.
    changed: Condvar,
    events: Events,
    gauges: Gauges,
}

#[derive(Default)]
struct State {
    table: LeaseTable,
    /// Ids of the leases whose renewal is running (their turn is taken).
    renewing: HashSet<String>,
    /// Events queued and not yet delivered, oldest first.
    queue: VecDeque<Event>,
    /// Whether a thread is delivering events now.
    delivering: bool,
    /// How many sweeper workers are revoking now.
    workers: usize,
    /// When the leases in flight were due (milliseconds since the epoch, with a count each), so that
    /// `sweeper_lag` sees a lease whose revocation is stuck as late.
    in_flight_due: std::collections::BTreeMap<u64, usize>,
    /// Set once when the broker stops, with the time by which shutdown gives up.
    shutdown: Option<Instant>,
    /// A failover was seen: the sweeper reconciles before anything else.
    reconcile: bool,
    /// Slots reserved by `creds` in progress, per role: counted against the caps with the table's leases, so
    /// that concurrent issues cannot overshoot a cap.
    reserved: std::collections::BTreeMap<String, usize>,
    /// The sum of `reserved`.
    reserved_total: usize,
}

impl State {
    fn note_claimed(&mut self, lease: &DueLease) {
        if lease.due != 0 {
            *self.in_flight_due.entry(lease.due).or_default() += 1;
        }
    }

    fn note_settled(&mut self, lease: &DueLease) {
        if let std::collections::btree_map::Entry::Occupied(mut n) =
            self.in_flight_due.entry(lease.due)
        {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
            }
        }
    }
}

/// What a caller that asked to revoke a lease got.
pub(crate) enum Claim {
    /// The lease is the caller's to revoke: it must [`settle`](Leases::settle) it.
    Claimed(DueLease),
    /// Another revocation of the lease was in flight; it dropped the role.
    Joined,
    /// Another revocation of the lease was in flight and failed with this error; the lease stays in the table.
    JoinedFailed(Error),
}

/// What the sweeper does next.
pub(crate) enum SweeperWork {
    /// The broker is stopping.
    Stop,
    /// Revoke these due leases (a worker is reserved for them).
    Revoke(Vec<DueLease>),
    /// Sweep orphans, or probe for a failover, whichever timer is due (a worker is reserved for it).
    Orphans,
    /// Reconcile with a new primary after a failover (a worker is reserved for it).
    Reconcile,
}

/// How a lease came to be revoked, for [`Leases::settle`]: at its end, a retry, or before its end for a
/// public [`RevokeCause`] (the cause its [`RevokedEvent`] reports).
#[derive(Debug, Clone, Copy)]
pub(crate) enum LeaseEnd {
    /// The sweeper found it at its end.
    Expired,
    /// The sweeper retries a failed revocation (of an expired lease, or one revoked on request).
    Retried,
    /// Revoked before its end.
    Revoked(RevokeCause),
}

impl std::fmt::Display for LeaseEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseEnd::Expired => f.write_str("expired"),
            LeaseEnd::Retried => f.write_str("retried"),
            LeaseEnd::Revoked(cause) => cause.fmt(f),
        }
    }
}

/// Room for one lease under the caps, held by a `creds` in progress; see [`Leases::reserve`].
pub(crate) struct Slot<'a> {
    leases: &'a Leases,
    role: String,
    /// Set once the slot has become a lease in the table.
    taken: bool,
}

impl Slot<'_> {
    /// Puts the newly issued lease in the table in the slot's place, and queues its event.
    pub(crate) fn issued(mut self, lease: Lease, role: &Arc<CompiledRole>) {
        let leases = self.leases;
        let event = Event::Issued(IssuedEvent {
            lease: lease.clone(),
        });
        {
            let mut state = leases.state.lock();
            release_slot(&mut state, &self.role);
            self.taken = true;
            leases.insert(&mut state, lease, role);
            leases.queue(&mut state, event);
        }
        leases.flush();
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.taken {
            release_slot(&mut self.leases.state.lock(), &self.role);
        }
    }
}

fn release_slot(state: &mut State, role: &str) {
    if let Some(n) = state.reserved.get_mut(role) {
        *n -= 1;
        if *n == 0 {
            state.reserved.remove(role);
        }
        state.reserved_total -= 1;
    }
}

/// A lease's renewal turn, taken by [`Leases::begin_renewal`]; released when finished or dropped.
pub(crate) struct RenewalTurn<'a> {
    leases: &'a Leases,
    id: String,
    /// Set once [`finish`](RenewalTurn::finish) has released the turn: dropping must not release it again (it
    /// may be another renewal's by then).
    released: bool,
    /// The role definition the lease was issued under.
    pub role: Arc<CompiledRole>,
    pub username: String,
    pub max_expires_at: SystemTime,
    pub previous_expires_at: SystemTime,
}

impl RenewalTurn<'_> {
    /// Records the lease's new end and queues the renewal's event; releases the turn.
    pub(crate) fn finish(mut self, expires_at: SystemTime) -> Result<Lease, Error> {
        let leases = self.leases;
        let result = {
            let mut state = leases.state.lock();
            state.renewing.remove(&self.id);
            self.released = true;
            match state.table.set_expiry(&self.id, expires_at) {
                None => Err(Error::new(
                    ErrorKind::LeaseExpired,
                    format!(
                        "lease {} expired or was revoked while it was being renewed; request new credentials",
                        self.id
                    ),
                )),
                Some(_) => match state.table.lease(&self.id) {
                    Some(lease) => {
                        leases.queue(
                            &mut state,
                            Event::Renewed(RenewedEvent {
                                lease: lease.clone(),
                                previous_expires_at: self.previous_expires_at,
                            }),
                        );
                        Ok(lease)
                    }
                    None => Err(unknown_lease(&self.id)),
                },
            }
        };
        // Waiters for the turn, and the sweeper if the lease's end moved earlier.
        leases.changed.notify_all();
        leases.flush();
        result
    }
}

impl Drop for RenewalTurn<'_> {
    fn drop(&mut self) {
        if !self.released {
            self.leases.state.lock().renewing.remove(&self.id);
            self.leases.changed.notify_all();
        }
    }
}

impl Leases {
    pub(crate) fn new(events: Events) -> Leases {
        Leases {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            events,
            gauges: Gauges::default(),
        }
    }

    /// Reserves room for one more lease of `role` under its cap and the broker's (`broker_cap`), counting the
    /// leases in the table and the slots other `creds` hold; fails with [`ErrorKind::LeaseCap`] naming the cap
    /// reached. The slot is released when dropped, or turned into the lease by [`Slot::issued`].
    pub(crate) fn reserve(
        &self,
        role: &CompiledRole,
        broker_cap: Option<u32>,
    ) -> Result<Slot<'_>, Error> {
        let mut state = self.state.lock();
        let as_count = |cap: u32| usize::try_from(cap).unwrap_or(usize::MAX);
        if let Some(cap) = role.role.get_max_leases() {
            let held = state.table.per_role().get(&role.name).copied().unwrap_or(0)
                + state.reserved.get(&role.name).copied().unwrap_or(0);
            if held >= as_count(cap) {
                return Err(Error::new(
                    ErrorKind::LeaseCap,
                    format!(
                        "role {:?} has {held} live leases, its cap (Role::max_leases({cap})); nothing was created. \
                         Revoke leases or let them expire, or raise the cap with write_role",
                        role.name
                    ),
                ));
            }
        }
        if let Some(cap) = broker_cap {
            let held = state.table.len() + state.reserved_total;
            if held >= as_count(cap) {
                return Err(Error::new(
                    ErrorKind::LeaseCap,
                    format!(
                        "the broker has {held} live leases, its cap (BrokerBuilder::max_leases({cap})); nothing was \
                         created for role {:?}. Revoke leases or let them expire, or raise the cap",
                        role.name
                    ),
                ));
            }
        }
        *state.reserved.entry(role.name.clone()).or_default() += 1;
        state.reserved_total += 1;
        Ok(Slot {
            leases: self,
            role: role.name.clone(),
            taken: false,
        })
    }

    /// Puts a lease in the table without an event: a creation whose outcome was lost (expired at once, so the sweeper
    /// makes sure its role is gone). Returns false if the table cannot hold it.
    pub(crate) fn adopt(&self, lease: Lease, role: &Arc<CompiledRole>) -> bool {
        let mut state = self.state.lock();
        self.insert(&mut state, lease, role)
    }

    /// Puts a live lease of an earlier run in the table, with its event. Returns false if the table cannot
    /// hold it (no event then).
    pub(crate) fn adopted(&self, lease: Lease, role: &Arc<CompiledRole>) -> bool {
        let event = Event::Adopted(AdoptedEvent {
            lease: lease.clone(),
        });
        let inserted = {
            let mut state = self.state.lock();
            let inserted = self.insert(&mut state, lease, role);
            if inserted {
                self.queue(&mut state, event);
            }
            inserted
        };
        self.flush();
        inserted
    }

    /// Reports a role dropped that no lease of the table held.
    pub(crate) fn role_dropped(&self, event: RoleDroppedEvent) {
        self.queue(&mut self.state.lock(), Event::RoleDropped(event));
        self.flush();
    }

    /// Puts a lease whose role could not be dropped at start in the table as a failed revocation, retried at
    /// `retry_at`.
    pub(crate) fn adopt_failed(
        &self,
        lease: Lease,
        role: &Arc<CompiledRole>,
        error: String,
        retry_at: SystemTime,
    ) {
        let id = lease.id.clone();
        let mut state = self.state.lock();
        if self.insert(&mut state, lease, role) {
            state.table.claim(&id);
            state.table.failed(&id, error, retry_at);
        }
    }

    fn insert(&self, state: &mut State, lease: Lease, role: &Arc<CompiledRole>) -> bool {
        let id = lease.id.clone();
        match state.table.insert(lease, role.clone()) {
            Some(earliest) => {
                if earliest {
                    self.changed.notify_all();
                }
                true
            }
            // Cannot happen for leases the broker made. Should it, the role is still marked and the orphan sweep
            // drops it once expired. (Logged under the lock: it never happens in practice.)
            None => {
                log::error!(
                    "lease {id} has an id or username the lease table cannot hold; it is left to the orphan sweep"
                );
                false
            }
        }
    }

    /// The lease `id`, if the table holds it.
    pub(crate) fn lease(&self, id: &str) -> Option<Lease> {
        self.state.lock().table.lease(id)
    }

    /// Every lease, sorted by id.
    pub(crate) fn leases(&self) -> Vec<Lease> {
        self.state.lock().table.leases()
    }

    /// Leases whose revocation has failed at least once, sorted by id.
    pub(crate) fn failed_leases(&self) -> Vec<Lease> {
        self.state.lock().table.failed_leases()
    }

    /// How many leases the table holds.
    pub(crate) fn len(&self) -> usize {
        self.state.lock().table.len()
    }

    /// The end and max end of lease `id`, if it is live: in the table, and not being or failing to be revoked.
    pub(crate) fn live_times(&self, id: &str) -> Option<(SystemTime, SystemTime)> {
        let state = self.state.lock();
        let entry = state.table.get(id)?;
        (!entry.in_flight() && entry.attempts() == 0)
            .then(|| (entry.expires_at(), entry.max_expires_at()))
    }

    /// Whether the table holds lease `id`.
    pub(crate) fn contains(&self, id: &str) -> bool {
        self.state.lock().table.get(id).is_some()
    }

    /// Ids of the leases whose id starts with `prefix`, sorted.
    pub(crate) fn ids_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.state.lock().table.ids_with_prefix(prefix)
    }

    /// The counters and the table's figures, into `stats`.
    pub(crate) fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        self.events.count(&mut stats);
        let mut state = self.state.lock();
        stats.live = state.table.per_role().clone();
        stats.failing = state.table.failing();
        let in_flight = state
            .in_flight_due
            .first_key_value()
            .map(|(ms, _)| SystemTime::UNIX_EPOCH + Duration::from_millis(*ms));
        let next_due = match (state.table.next_due(), in_flight) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        drop(state);
        stats.sweeper_lag = next_due
            .and_then(|due| SystemTime::now().duration_since(due).ok())
            .unwrap_or(Duration::ZERO);
        stats
    }

    /// Takes lease `id`'s renewal turn, waiting up to `bound` for a renewal of it in progress. Fails with
    /// [`ErrorKind::UnknownLease`], or [`ErrorKind::LeaseExpired`] if the lease is past its end or being revoked.
    pub(crate) fn begin_renewal(
        &self,
        id: &str,
        bound: Duration,
    ) -> Result<RenewalTurn<'_>, Error> {
        let deadline = later(bound);
        let mut state = self.state.lock();
        loop {
            let entry = state.table.get(id).ok_or_else(|| unknown_lease(id))?;
            if entry.in_flight() || entry.attempts() > 0 {
                return Err(Error::new(
                    ErrorKind::LeaseExpired,
                    format!("lease {id} is being revoked and cannot be renewed; request new credentials"),
                ));
            }
            if entry.expires_at() <= SystemTime::now() {
                return Err(Error::new(
                    ErrorKind::LeaseExpired,
                    format!(
                        "lease {id} has expired and cannot be renewed; request new credentials"
                    ),
                ));
            }
            if !state.renewing.contains(id) {
                let turn = RenewalTurn {
                    leases: self,
                    id: id.to_owned(),
                    released: false,
                    role: entry.role.clone(),
                    username: state.table.username(id).unwrap_or_default(),
                    max_expires_at: entry.max_expires_at(),
                    previous_expires_at: entry.expires_at(),
                };
                state.renewing.insert(id.to_owned());
                return Ok(turn);
            }
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                return Err(Error::new(
                    ErrorKind::Database,
                    format!(
                        "lease {id} was not renewed: another renewal of it has been running for {bound:?}; \
                         check that the server is responsive, then try again"
                    ),
                ));
            }
        }
    }

    /// Claims lease `id` for revocation, or joins the revocation of it in flight, waiting up to `bound` for it
    /// (and for a renewal in progress to finish). Fails with [`ErrorKind::UnknownLease`].
    pub(crate) fn claim(&self, id: &str, bound: Duration) -> Result<Claim, Error> {
        let deadline = later(bound);
        let mut state = self.state.lock();
        let mut joined: Option<u32> = None;
        loop {
            let Some(entry) = state.table.get(id) else {
                return match joined {
                    Some(_) => Ok(Claim::Joined),
                    None => Err(unknown_lease(id)),
                };
            };
            let (in_flight, attempts) = (entry.in_flight(), entry.attempts());
            match joined {
                Some(before) if !in_flight && attempts > before => {
                    let error = state
                        .table
                        .lease(id)
                        .and_then(|l| l.last_error)
                        .unwrap_or_else(|| "the revocation failed".to_owned());
                    return Ok(Claim::JoinedFailed(Error::new(
                        ErrorKind::Revocation,
                        error,
                    )));
                }
                _ if in_flight => {
                    joined.get_or_insert(attempts);
                }
                _ if !state.renewing.contains(id) => {
                    let claimed = state.table.claim(id).ok_or_else(|| unknown_lease(id))?;
                    state.note_claimed(&claimed);
                    return Ok(Claim::Claimed(claimed));
                }
                _ => {}
            }
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                return Err(Error::new(
                    ErrorKind::Revocation,
                    format!(
                        "lease {id} is still being revoked or renewed after {bound:?}; the revocation goes on in \
                         the background (see Broker::failed_leases); check that the server is responsive"
                    ),
                ));
            }
        }
    }

    /// Claims lease `id` if nobody is revoking or renewing it: `Some(Ok(lease))` if claimed, `Some(Err(()))` if
    /// busy (join it with [`claim`](Leases::claim)), `None` if the table does not hold it.
    pub(crate) fn try_claim(&self, id: &str) -> Option<Result<DueLease, ()>> {
        let mut state = self.state.lock();
        let entry = state.table.get(id)?;
        if entry.in_flight() || state.renewing.contains(id) {
            return Some(Err(()));
        }
        let claimed = state.table.claim(id)?;
        state.note_claimed(&claimed);
        Some(Ok(claimed))
    }

    /// Claims up to `limit` leases that are not in flight, for shutdown; when none is left to claim but some are
    /// in flight, waits for a change until `deadline`. Empty once the table is empty or the deadline passed.
    pub(crate) fn claim_all(&self, limit: usize, deadline: Instant) -> Vec<DueLease> {
        let mut state = self.state.lock();
        loop {
            if Instant::now() >= deadline {
                return Vec::new();
            }
            let claimed = self.claim_unless_renewing(&mut state, |t| t.claim_all(limit));
            if !claimed.is_empty() || state.table.len() == 0 {
                return claimed;
            }
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                return Vec::new();
            }
        }
    }

    /// Runs a claim of several leases, handing back (due again shortly) those whose renewal is running: a
    /// renewal and a revocation of one role never run at once.
    fn claim_unless_renewing(
        &self,
        state: &mut State,
        claim: impl FnOnce(&mut LeaseTable) -> Vec<DueLease>,
    ) -> Vec<DueLease> {
        let mut claimed = claim(&mut state.table);
        if !state.renewing.is_empty() {
            let soon = SystemTime::now() + Duration::from_millis(100);
            claimed.retain(|lease| {
                let renewing = state.renewing.contains(&lease.id);
                if renewing {
                    state.table.reschedule(&lease.id, soon);
                }
                !renewing
            });
        }
        for lease in &claimed {
            state.note_claimed(lease);
        }
        claimed
    }

    /// Waits until the sweeper has something to do, up to `workers` revocations (or orphan sweeps) running at
    /// once; the work returned holds one of them, released with [`worker_done`](Leases::worker_done).
    pub(crate) fn next_sweeper_work(
        &self,
        batch: usize,
        workers: usize,
        orphans_at: Instant,
    ) -> SweeperWork {
        let mut state = self.state.lock();
        loop {
            if state.shutdown.is_some() {
                return SweeperWork::Stop;
            }
            let mut sleep = MAX_SLEEP;
            if state.reconcile && state.workers < workers {
                state.reconcile = false;
                state.workers += 1;
                return SweeperWork::Reconcile;
            }
            if state.workers < workers {
                // Due leases first: an orphan sweep never takes a worker that an expiry is waiting for.
                let now = SystemTime::now();
                let due = self.claim_unless_renewing(&mut state, |t| t.claim_due(now, batch));
                if !due.is_empty() {
                    state.workers += 1;
                    return SweeperWork::Revoke(due);
                }
                if Instant::now() >= orphans_at {
                    state.workers += 1;
                    return SweeperWork::Orphans;
                }
                if let Some(next) = state.table.next_due() {
                    sleep = sleep.min(next.duration_since(now).unwrap_or(Duration::ZERO));
                }
                sleep = sleep.min(orphans_at.saturating_duration_since(Instant::now()));
            }
            // A worker that finishes, a lease due sooner and shutdown all signal `changed`.
            self.changed.wait_for(&mut state, sleep);
        }
    }

    /// Wakes the sweeper to reconcile with a new primary (see `failover`).
    pub(crate) fn request_reconcile(&self) {
        self.state.lock().reconcile = true;
        self.changed.notify_all();
    }

    /// The live leases: in the table, and not being or failing to be revoked.
    pub(crate) fn live_leases(&self) -> Vec<Lease> {
        let state = self.state.lock();
        let mut live = state.table.leases();
        live.retain(|l| {
            state
                .table
                .get(&l.id)
                .is_some_and(|e| !e.in_flight() && e.attempts() == 0)
        });
        live
    }

    /// Takes the leases `ids` whose roles a failover lost out of the table, those still live, and queues a lost
    /// event for each; returns them.
    pub(crate) fn lose(&self, ids: &[String], detected_at: SystemTime) -> Vec<Lease> {
        let mut lost = Vec::new();
        let mut state = self.state.lock();
        for id in ids {
            let live = state
                .table
                .get(id)
                .is_some_and(|e| !e.in_flight() && e.attempts() == 0);
            // A renewal in progress fails (its ALTER ROLE finds no role, or its table update no lease).
            if !live {
                continue;
            }
            if let Some(lease) = state.table.take(id) {
                self.queue(
                    &mut state,
                    Event::Lost(LostEvent {
                        lease: lease.clone(),
                        detected_at,
                    }),
                );
                lost.push(lease);
            }
        }
        drop(state);
        self.changed.notify_all();
        lost
    }

    /// Releases a worker reserved by [`next_sweeper_work`](Leases::next_sweeper_work).
    pub(crate) fn worker_done(&self) {
        let mut state = self.state.lock();
        state.workers = state.workers.saturating_sub(1);
        drop(state);
        self.changed.notify_all();
    }

    /// Marks the broker stopping: the sweeper returns, `creds` refuses, and revocation gives up at `deadline`.
    pub(crate) fn begin_shutdown(&self, deadline: Instant) {
        self.state.lock().shutdown.get_or_insert(deadline);
        self.changed.notify_all();
    }

    /// Whether the broker is stopping or stopped.
    pub(crate) fn is_shut_down(&self) -> bool {
        self.state.lock().shutdown.is_some()
    }

    /// When shutdown gives up, once the broker is stopping.
    pub(crate) fn shutdown_deadline(&self) -> Option<Instant> {
        self.state.lock().shutdown
    }

    /// Waits until no sweeper worker is running, or `deadline`. Returns how many still run.
    pub(crate) fn wait_for_workers(&self, deadline: Instant) -> usize {
        let mut state = self.state.lock();
        while state.workers > 0 {
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                break;
            }
        }
        state.workers
    }

    /// Records the outcome of the revocation of a claimed lease, queues its event, and logs it: a revoked lease
    /// leaves the table; a failed one stays with its error, due again at `retry_at`, unless `forced`: then it
    /// leaves the table anyway. Returns the outcome.
    pub(crate) fn settle(
        &self,
        lease: &DueLease,
        result: Result<(), Error>,
        why: LeaseEnd,
        retry_at: SystemTime,
    ) -> Result<(), Error> {
        let forced = matches!(why, LeaseEnd::Revoked(RevokeCause::Forced));
        let mut state = self.state.lock();
        state.note_settled(lease);
        let attempts = match &result {
            Ok(()) => {
                if let Some(gone) = state.table.take(&lease.id) {
                    let now = SystemTime::now();
                    let cause = match why {
                        LeaseEnd::Expired => None,
                        LeaseEnd::Retried if gone.expires_at <= now => None,
                        LeaseEnd::Retried => Some(RevokeCause::Requested),
                        LeaseEnd::Revoked(cause) => Some(cause),
                    };
                    let event = match cause {
                        None => Event::Expired(ExpiredEvent {
                            lease: gone,
                            revoked_at: now,
                        }),
                        Some(cause) => Event::Revoked(RevokedEvent {
                            lease: gone,
                            cause,
                            revoked_at: now,
                            role_dropped: true,
                        }),
                    };
                    self.queue(&mut state, event);
                }
                None
            }
            Err(err) => {
                let attempts = state.table.failed(&lease.id, err.to_string(), retry_at);
                if forced {
                    // Forgotten at once, carrying this attempt's error: no retry will come, so no failure event.
                    if let Some(forgotten) = state.table.take(&lease.id) {
                        self.queue(
                            &mut state,
                            Event::Revoked(RevokedEvent {
                                lease: forgotten,
                                cause: RevokeCause::Forced,
                                revoked_at: SystemTime::now(),
                                role_dropped: false,
                            }),
                        );
                    }
                } else if let Some(failed) = state.table.lease(&lease.id) {
                    self.queue(
                        &mut state,
                        Event::RevocationFailed(RevocationFailedEvent {
                            lease: failed,
                            retry_at,
                        }),
                    );
                }
                attempts
            }
        };
        drop(state);
        // Joiners, shutdown, and the sweeper (a retry to schedule).
        self.changed.notify_all();
        // Logged with no lock held: a slow logger must not stall the table.
        match (&result, attempts) {
            (Ok(()), _) => log::info!(
                "revoked lease {} ({why}): dropped role {}",
                lease.id,
                lease.username
            ),
            (Err(_), _) if forced => {}
            (Err(err), Some(n)) if n >= FAILURES_BEFORE_ERROR => log::error!(
                "revocation of lease {} (role {}) has failed {n} times and will be retried; \
                 it can be given up with Broker::revoke_force: {err}",
                lease.id,
                lease.username
            ),
            (Err(err), Some(n)) => log::warn!(
                "revocation of lease {} (role {}) failed (attempt {n}), will retry: {err}",
                lease.id,
                lease.username
            ),
            (Err(_), None) => {}
        }
        // No flush here: the caller flushes once every lease it claimed is settled, so that a handler revoking
        // another lease of the same batch never waits for this thread.
        result
    }

    /// Queues a pool's rotation event, built from the two leases as the table holds them now.
    pub(crate) fn rotated(&self, old: &str, new: &str) {
        {
            let mut state = self.state.lock();
            if let (Some(old), Some(new)) = (state.table.lease(old), state.table.lease(new)) {
                self.queue(&mut state, Event::Rotated(RotatedEvent { old, new }));
            }
        }
        self.flush();
    }

    /// Counts an event and queues it for delivery; called with the lock held, so events queue in the order of
    /// the changes they report.
    fn queue(&self, state: &mut MutexGuard<'_, State>, event: Event) {
        self.events.count_one(&event);
        state.queue.push_back(event);
    }

    /// Delivers queued events, oldest first, with no lock held, unless another thread is delivering (it then
    /// delivers these too), and records each event's metrics just before its delivery. A handler calling back
    /// into the broker lands here with `delivering` set, so its own events wait for it to return.
    pub(crate) fn flush(&self) {
        let mut state = self.state.lock();
        if state.delivering {
            return;
        }
        while let Some(event) = state.queue.pop_front() {
            state.delivering = true;
            drop(state);
            telemetry::event(&event);
            self.events.deliver(event);
            state = self.state.lock();
            state.delivering = false;
        }
        drop(state);
        self.set_gauges();
    }

    /// Sets the metrics' gauges (feature `metrics`), with no lock held.
    pub(crate) fn set_gauges(&self) {
        if Gauges::ON {
            self.gauges.set(&self.stats());
        }
    }
}

/// `now + bound`, saturating far in the future instead of overflowing.
pub(crate) fn later(bound: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(bound)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

pub(crate) fn unknown_lease(id: &str) -> Error {
    Error::new(
        ErrorKind::UnknownLease,
        format!("no lease {id} in the lease table: it was never issued by this broker, or it was already revoked; request new credentials"),
    )
}
