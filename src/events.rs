//! Events: the audit hook. Every change of a lease (issued, renewed, rotated, revoked, expired, a failed
//! revocation, adopted at start) and every role dropped without a lease (at start, by the orphan sweep) is
//! counted for [`Broker::stats`](crate::Broker::stats) and passed to the [`HandleEvent`] given to
//! [`BrokerBuilder::event_handler`](crate::BrokerBuilder::event_handler), in the style of r2d2's `HandleEvent`.
//!
//! Events carry the [`Lease`] (id, role, username, times) and never a password. They are delivered after the change,
//! with no lock of the broker held, and in order for any one lease: issued, then renewals and rotation, then one of
//! revoked, expired or lost (after a failover). Delivery is synchronous on the thread that made the change (a caller's,
//! a revocation worker's, or a [`RolePool`](crate::RolePool)'s), except when another thread is delivering events at
//! that moment: that thread then delivers this one too before it returns, so the order holds (the call that made the
//! change may then return before its event is delivered). A handler may call any [`Broker`](crate::Broker) method, on
//! any lease, the one it is told about included; the events those calls make are delivered once the handler returns. A
//! handler that panics is caught and logged; the broker carries on.

use std::collections::BTreeMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::lease::Lease;

/// Receives the broker's events. Every method has a no-op default: implement the ones you need.
///
/// Methods are called with no lock of the broker held, so they may call back into the broker; but they run on
/// the thread that issued, renewed or revoked the lease (or on one delivering events at that moment), so they
/// should be quick and must not block: hand slow work (a network audit log) to a channel.
///
/// # Examples
///
/// An audit log that implements the methods it cares about and hands each line to a thread of its own, so the
/// broker never waits for the log; it is installed with
/// [`BrokerBuilder::event_handler`](crate::BrokerBuilder::event_handler):
///
/// ```no_run
/// use credbroker::{Broker, ExpiredEvent, HandleEvent, IssuedEvent, RevocationFailedEvent, RevokedEvent};
/// use std::sync::mpsc::{channel, Sender};
///
/// #[derive(Debug)]
/// struct Audit(Sender<String>);
///
/// impl HandleEvent for Audit {
///     fn handle_issued(&self, event: IssuedEvent) {
///         let _ = self.0.send(format!("issued {} as {}", event.lease.id(), event.lease.username()));
///     }
///     fn handle_revoked(&self, event: RevokedEvent) {
///         let _ = self.0.send(format!("revoked {} ({})", event.lease.id(), event.cause));
///     }
///     fn handle_expired(&self, event: ExpiredEvent) {
///         let _ = self.0.send(format!("expired {}", event.lease.id()));
///     }
///     fn handle_revocation_failed(&self, event: RevocationFailedEvent) {
///         let error = event.lease.last_error().unwrap_or("unknown error");
///         let _ = self.0.send(format!("could not drop {}: {error}", event.lease.username()));
///     }
/// }
///
/// let (sender, lines) = channel();
/// std::thread::spawn(move || {
///     for line in lines {
///         println!("audit: {line}"); // or append to a file, send to a SIEM, ...
///     }
/// });
/// let broker = Broker::builder()
///     .connection("host=localhost user=username password=password")
///     .event_handler(Audit(sender))
///     .build()?;
/// # Ok::<(), credbroker::Error>(())
/// ```
pub trait HandleEvent: fmt::Debug + Send + Sync + 'static {
    /// A credential was issued: its role now exists in PostgreSQL.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{Broker, HandleEvent, IssuedEvent};
    ///
    /// #[derive(Debug)]
    /// struct LogIssued;
    ///
    /// impl HandleEvent for LogIssued {
    ///     fn handle_issued(&self, event: IssuedEvent) {
    ///         let lease = &event.lease;
    ///         println!("{} got {} ({}) until {:?}", lease.role(), lease.username(), lease.id(), lease.expires_at());
    ///     }
    /// }
    ///
    /// let builder = Broker::builder().event_handler(LogIssued);
    /// ```
    fn handle_issued(&self, event: IssuedEvent) {
        let _ = event;
    }

    /// A lease was renewed: its role's `VALID UNTIL` moved.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{Broker, HandleEvent, RenewedEvent};
    ///
    /// #[derive(Debug)]
    /// struct WatchCeiling;
    ///
    /// impl HandleEvent for WatchCeiling {
    ///     fn handle_renewed(&self, event: RenewedEvent) {
    ///         if event.lease.expires_at() == event.lease.max_expires_at() {
    ///             println!("lease {} reached its max: it cannot be renewed again", event.lease.id());
    ///         }
    ///     }
    /// }
    ///
    /// let builder = Broker::builder().event_handler(WatchCeiling);
    /// ```
    fn handle_renewed(&self, event: RenewedEvent) {
        let _ = event;
    }

    /// A [`RolePool`](crate::RolePool) replaced its credential: new connections use the new lease, and the old
    /// one is revoked once its last connection is returned (or at its end).
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{Broker, HandleEvent, RotatedEvent};
    ///
    /// #[derive(Debug)]
    /// struct LogRotations;
    ///
    /// impl HandleEvent for LogRotations {
    ///     fn handle_rotated(&self, event: RotatedEvent) {
    ///         println!("pool of {}: {} -> {}", event.new.role(), event.old.username(), event.new.username());
    ///     }
    /// }
    ///
    /// let builder = Broker::builder().event_handler(LogRotations);
    /// ```
    fn handle_rotated(&self, event: RotatedEvent) {
        let _ = event;
    }

    /// A lease was revoked before its end: its role is gone (or, for [`RevokeCause::Forced`], forgotten).
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{Broker, HandleEvent, RevokedEvent};
    ///
    /// #[derive(Debug)]
    /// struct WatchForced;
    ///
    /// impl HandleEvent for WatchForced {
    ///     fn handle_revoked(&self, event: RevokedEvent) {
    ///         if !event.role_dropped {
    ///             eprintln!("role {} was forgotten, not dropped: drop it by hand", event.lease.username());
    ///         }
    ///     }
    /// }
    ///
    /// let builder = Broker::builder().event_handler(WatchForced);
    /// ```
    fn handle_revoked(&self, event: RevokedEvent) {
        let _ = event;
    }

    /// A lease reached its end and the sweeper dropped its role.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{Broker, ExpiredEvent, HandleEvent};
    /// use std::time::Duration;
    ///
    /// #[derive(Debug)]
    /// struct WatchLateness;
    ///
    /// impl HandleEvent for WatchLateness {
    ///     fn handle_expired(&self, event: ExpiredEvent) {
    ///         let late = event.revoked_at.duration_since(event.lease.expires_at()).unwrap_or_default();
    ///         if late > Duration::from_secs(10) {
    ///             eprintln!("lease {} was dropped {late:?} after its end", event.lease.id());
    ///         }
    ///     }
    /// }
    ///
    /// let builder = Broker::builder().event_handler(WatchLateness);
    /// ```
    fn handle_expired(&self, event: ExpiredEvent) {
        let _ = event;
    }

    /// After a failover, the lease's role does not exist on the new primary (the failover lost the transaction
    /// that created it): the lease has left the table, [`Broker::renew`](crate::Broker::renew) of it fails with
    /// [`ErrorKind::LeaseLost`](crate::ErrorKind::LeaseLost), and a [`RolePool`](crate::RolePool) holding it
    /// obtains a new credential.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{Broker, HandleEvent, LostEvent};
    ///
    /// #[derive(Debug)]
    /// struct WarnLost;
    ///
    /// impl HandleEvent for WarnLost {
    ///     fn handle_lost(&self, event: LostEvent) {
    ///         // Whoever holds this credential can no longer log in with it: tell them to call `creds` again.
    ///         eprintln!("failover lost {} ({}) at {:?}", event.lease.id(), event.lease.username(), event.detected_at);
    ///     }
    /// }
    ///
    /// let builder = Broker::builder().event_handler(WarnLost);
    /// ```
    fn handle_lost(&self, event: LostEvent) {
        let _ = event;
    }

    /// Dropping a lease's role failed; the lease stays in the table and is retried at
    /// [`RevocationFailedEvent::retry_at`].
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{Broker, HandleEvent, RevocationFailedEvent};
    ///
    /// #[derive(Debug)]
    /// struct Alert;
    ///
    /// impl HandleEvent for Alert {
    ///     fn handle_revocation_failed(&self, event: RevocationFailedEvent) {
    ///         // The first failures are often a lock held for a moment; page someone only when it persists.
    ///         if event.lease.revocation_attempts() >= 5 {
    ///             eprintln!(
    ///                 "role {} still not dropped after {} attempts: {}",
    ///                 event.lease.username(),
    ///                 event.lease.revocation_attempts(),
    ///                 event.lease.last_error().unwrap_or("unknown error"),
    ///             );
    ///         }
    ///     }
    /// }
    ///
    /// let builder = Broker::builder().event_handler(Alert);
    /// ```
    fn handle_revocation_failed(&self, event: RevocationFailedEvent) {
        let _ = event;
    }

    /// [`build`](crate::BrokerBuilder::build) put a live lease that an earlier run of this instance issued back
    /// in the table ([`RecoveryMode::Adopt`](crate::RecoveryMode::Adopt)); its end is later a revoked or expired
    /// event like any other lease's.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{AdoptedEvent, Broker, HandleEvent};
    ///
    /// #[derive(Debug)]
    /// struct LogAdopted;
    ///
    /// impl HandleEvent for LogAdopted {
    ///     fn handle_adopted(&self, event: AdoptedEvent) {
    ///         let lease = &event.lease;
    ///         println!("kept {} from the last run, valid until {:?}", lease.username(), lease.expires_at());
    ///     }
    /// }
    ///
    /// let builder = Broker::builder().event_handler(LogAdopted);
    /// ```
    fn handle_adopted(&self, event: AdoptedEvent) {
        let _ = event;
    }

    /// The broker dropped a credential role that no lease of its table held: one an earlier run of this
    /// instance left, at [`build`](crate::BrokerBuilder::build), or an orphan (see [`DropCause`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{Broker, HandleEvent, RoleDroppedEvent};
    ///
    /// #[derive(Debug)]
    /// struct LogDropped;
    ///
    /// impl HandleEvent for LogDropped {
    ///     fn handle_role_dropped(&self, event: RoleDroppedEvent) {
    ///         let instance = event.instance.as_deref().unwrap_or("an unknown instance");
    ///         println!("dropped {} of {instance} ({})", event.username, event.cause);
    ///     }
    /// }
    ///
    /// let builder = Broker::builder().event_handler(LogDropped);
    /// ```
    fn handle_role_dropped(&self, event: RoleDroppedEvent) {
        let _ = event;
    }
}

/// The default handler: ignores every event.
///
/// # Examples
///
/// A broker built without [`event_handler`](crate::BrokerBuilder::event_handler) uses it; naming it is the same:
///
/// ```no_run
/// use credbroker::{Broker, NopEventHandler};
///
/// let broker = Broker::builder()
///     .connection("host=localhost user=username password=password")
///     .event_handler(NopEventHandler)
///     .build()?;
/// // Counts are kept all the same:
/// assert_eq!(broker.stats().issued, 0);
/// # Ok::<(), credbroker::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct NopEventHandler;

impl HandleEvent for NopEventHandler {}

/// See [`HandleEvent::handle_issued`].
///
/// # Examples
///
/// ```
/// use credbroker::{HandleEvent, IssuedEvent};
/// use std::collections::HashMap;
/// use std::sync::Mutex;
///
/// /// Credentials issued per role, for a dashboard.
/// #[derive(Debug, Default)]
/// struct IssuedPerRole(Mutex<HashMap<String, u64>>);
///
/// impl HandleEvent for IssuedPerRole {
///     fn handle_issued(&self, event: IssuedEvent) {
///         *self.0.lock().unwrap().entry(event.lease.role().to_owned()).or_default() += 1;
///     }
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct IssuedEvent {
    /// The new lease.
    pub lease: Lease,
}

/// See [`HandleEvent::handle_renewed`].
///
/// # Examples
///
/// ```
/// use credbroker::{HandleEvent, RenewedEvent};
///
/// #[derive(Debug)]
/// struct LogRenewals;
///
/// impl HandleEvent for LogRenewals {
///     fn handle_renewed(&self, event: RenewedEvent) {
///         let gained = event.lease.expires_at().duration_since(event.previous_expires_at).unwrap_or_default();
///         println!("{} renewed: {gained:?} more", event.lease.id());
///     }
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RenewedEvent {
    /// The lease after the renewal.
    pub lease: Lease,
    /// Its end before the renewal.
    pub previous_expires_at: SystemTime,
}

/// See [`HandleEvent::handle_rotated`].
///
/// # Examples
///
/// ```
/// use credbroker::{HandleEvent, RotatedEvent};
///
/// #[derive(Debug)]
/// struct LogRotations;
///
/// impl HandleEvent for LogRotations {
///     fn handle_rotated(&self, event: RotatedEvent) {
///         println!(
///             "pool of {} rotated from {} (ends {:?}) to {}",
///             event.new.role(),
///             event.old.id(),
///             event.old.expires_at(),
///             event.new.id(),
///         );
///     }
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RotatedEvent {
    /// The lease the pool stopped using for new connections.
    pub old: Lease,
    /// The lease new connections use.
    pub new: Lease,
}

/// Why a lease was revoked before its end.
///
/// Its `Display` is the `cause` label of the metrics (`requested`, `pool closed`, …). More causes may come: match
/// with a `_` arm.
///
/// # Examples
///
/// ```
/// use credbroker::{HandleEvent, RevokeCause, RevokedEvent};
///
/// #[derive(Debug)]
/// struct LogRevocations;
///
/// impl HandleEvent for LogRevocations {
///     fn handle_revoked(&self, event: RevokedEvent) {
///         match event.cause {
///             // Pools revoke their own leases all the time; nothing to report.
///             RevokeCause::Rotated | RevokeCause::PoolClosed => {}
///             RevokeCause::Forced => eprintln!("forced revocation of {}", event.lease.id()),
///             cause => println!("revoked {} ({cause})", event.lease.id()),
///         }
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RevokeCause {
    /// [`Broker::revoke`](crate::Broker::revoke) or [`Broker::revoke_prefix`](crate::Broker::revoke_prefix)
    /// (or a retry of one, by the sweeper).
    Requested,
    /// [`Broker::revoke_force`](crate::Broker::revoke_force). If [`RevokedEvent::role_dropped`] is false, the
    /// role could not be dropped and the broker forgot the lease anyway.
    Forced,
    /// A [`RolePool`](crate::RolePool) rotated to a new credential and the last connection of this one was
    /// returned.
    Rotated,
    /// The last handle of a [`RolePool`](crate::RolePool) was dropped.
    PoolClosed,
    /// [`Broker::shutdown`](crate::Broker::shutdown) with [`ShutdownMode::Revoke`](crate::ShutdownMode::Revoke),
    /// or dropping a broker built with that mode.
    Shutdown,
}

impl fmt::Display for RevokeCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RevokeCause::Requested => "requested",
            RevokeCause::Forced => "forced",
            RevokeCause::Rotated => "rotated",
            RevokeCause::PoolClosed => "pool closed",
            RevokeCause::Shutdown => "shutdown",
        })
    }
}

/// See [`HandleEvent::handle_revoked`].
///
/// # Examples
///
/// ```
/// use credbroker::{HandleEvent, RevokedEvent};
///
/// #[derive(Debug)]
/// struct LogRevoked;
///
/// impl HandleEvent for LogRevoked {
///     fn handle_revoked(&self, event: RevokedEvent) {
///         let early = event.lease.expires_at().duration_since(event.revoked_at).unwrap_or_default();
///         println!("{} revoked ({}), {early:?} before its end", event.lease.username(), event.cause);
///         if !event.role_dropped {
///             eprintln!("role {} is still in PostgreSQL: drop it by hand", event.lease.username());
///         }
///     }
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RevokedEvent {
    /// The lease, as it was when revoked.
    pub lease: Lease,
    /// Why.
    pub cause: RevokeCause,
    /// When the revocation completed.
    pub revoked_at: SystemTime,
    /// Whether the role is gone; false only when [`Broker::revoke_force`](crate::Broker::revoke_force) forgot
    /// a lease whose role could not be dropped.
    pub role_dropped: bool,
}

/// See [`HandleEvent::handle_expired`].
///
/// # Examples
///
/// ```
/// use credbroker::{ExpiredEvent, HandleEvent};
///
/// #[derive(Debug)]
/// struct LogExpired;
///
/// impl HandleEvent for LogExpired {
///     fn handle_expired(&self, event: ExpiredEvent) {
///         println!("{} expired; its role was dropped at {:?}", event.lease.id(), event.revoked_at);
///     }
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ExpiredEvent {
    /// The lease, as it was when it expired.
    pub lease: Lease,
    /// When the sweeper dropped its role (at or after [`Lease::expires_at`]).
    pub revoked_at: SystemTime,
}

/// See [`HandleEvent::handle_lost`].
///
/// # Examples
///
/// ```
/// use credbroker::{HandleEvent, LostEvent};
///
/// #[derive(Debug)]
/// struct LogLost;
///
/// impl HandleEvent for LogLost {
///     fn handle_lost(&self, event: LostEvent) {
///         eprintln!("{} lost in a failover (noticed at {:?})", event.lease.username(), event.detected_at);
///     }
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LostEvent {
    /// The lease, as the table held it.
    pub lease: Lease,
    /// When the broker found its role missing on the new primary.
    pub detected_at: SystemTime,
}

/// See [`HandleEvent::handle_adopted`].
///
/// # Examples
///
/// ```
/// use credbroker::{AdoptedEvent, HandleEvent};
///
/// #[derive(Debug)]
/// struct LogAdopted;
///
/// impl HandleEvent for LogAdopted {
///     fn handle_adopted(&self, event: AdoptedEvent) {
///         println!("adopted {} of role {}", event.lease.id(), event.lease.role());
///     }
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AdoptedEvent {
    /// The lease, as read back from its role (`VALID UNTIL` and the broker's comment).
    pub lease: Lease,
}

/// Why the broker dropped a role no lease of its table held.
///
/// Its `Display` is the `cause` label of the metrics. More causes may come: match with a `_` arm.
///
/// # Examples
///
/// ```
/// use credbroker::{DropCause, HandleEvent, RoleDroppedEvent};
///
/// #[derive(Debug)]
/// struct LogDropped;
///
/// impl HandleEvent for LogDropped {
///     fn handle_role_dropped(&self, event: RoleDroppedEvent) {
///         match event.cause {
///             DropCause::Orphan => println!("swept orphan {} of {:?}", event.username, event.instance),
///             DropCause::Failover => eprintln!("{} came back with a failover; dropped again", event.username),
///             cause => println!("dropped {} at start ({cause})", event.username),
///         }
///     }
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropCause {
    /// At [`build`](crate::BrokerBuilder::build): a role of an earlier run of this instance whose lease ended
    /// while no broker of the instance was running.
    Ended,
    /// At [`build`](crate::BrokerBuilder::build) with [`RecoveryMode::RevokeAll`](crate::RecoveryMode::RevokeAll):
    /// a live role of an earlier run of this instance.
    RevokeAll,
    /// The orphan sweep (at `build` and every [`orphan_sweep_interval`](crate::BrokerBuilder::orphan_sweep_interval)):
    /// a marked role of any instance, in no lease table here, whose lease ended at least one interval ago.
    Orphan,
    /// After a failover: a role this broker had dropped within the
    /// [`failover_window`](crate::BrokerBuilder::failover_window), which the new primary still had (the drop was
    /// not replicated before the old primary went down).
    Failover,
}

impl fmt::Display for DropCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropCause::Ended => "ended",
            DropCause::RevokeAll => "revoke all",
            DropCause::Orphan => "orphan",
            DropCause::Failover => "failover",
        })
    }
}

/// See [`HandleEvent::handle_role_dropped`].
///
/// # Examples
///
/// ```
/// use credbroker::{HandleEvent, RoleDroppedEvent};
///
/// #[derive(Debug)]
/// struct LogDropped;
///
/// impl HandleEvent for LogDropped {
///     fn handle_role_dropped(&self, event: RoleDroppedEvent) {
///         match (&event.lease_id, &event.role) {
///             (Some(id), Some(role)) => println!("dropped {} (lease {id} of role {role})", event.username),
///             _ => println!("dropped {}, which carried no lease the broker could read", event.username),
///         }
///     }
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RoleDroppedEvent {
    /// The PostgreSQL role dropped.
    pub username: String,
    /// Its lease id, broker role and issuing instance, as its comment recorded them (`None` if it had none the
    /// broker could read).
    pub lease_id: Option<String>,
    /// See [`lease_id`](RoleDroppedEvent::lease_id).
    pub role: Option<String>,
    /// See [`lease_id`](RoleDroppedEvent::lease_id).
    pub instance: Option<String>,
    /// Its lease's end (`VALID UNTIL`), if it had one.
    pub expires_at: Option<SystemTime>,
    /// Why it was dropped.
    pub cause: DropCause,
    /// When.
    pub dropped_at: SystemTime,
}

/// See [`HandleEvent::handle_revocation_failed`].
///
/// # Examples
///
/// ```
/// use credbroker::{HandleEvent, RevocationFailedEvent};
///
/// #[derive(Debug)]
/// struct LogFailures;
///
/// impl HandleEvent for LogFailures {
///     fn handle_revocation_failed(&self, event: RevocationFailedEvent) {
///         eprintln!(
///             "could not drop {} ({}); retrying at {:?}",
///             event.lease.username(),
///             event.lease.last_error().unwrap_or("unknown error"),
///             event.retry_at,
///         );
///     }
/// }
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RevocationFailedEvent {
    /// The lease; [`Lease::revocation_attempts`] counts this failure, and [`Lease::last_error`] is its error.
    pub lease: Lease,
    /// When the sweeper tries again.
    pub retry_at: SystemTime,
}

/// Counts of what the broker did since it was built, and where it stands: see
/// [`Broker::stats`](crate::Broker::stats).
///
/// More fields may come, so it cannot be built with a struct literal outside this crate; `Stats::default()` is
/// all zeros.
///
/// # Examples
///
/// A thread that polls the broker once a minute, reports what it did, and warns when revocation falls behind:
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
///
/// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
/// let broker = Arc::new(broker);
/// let watched = Arc::clone(&broker);
/// std::thread::spawn(move || loop {
///     let stats = watched.stats();
///     let live: usize = stats.live.values().sum();
///     println!(
///         "{live} live leases; {} issued, {} renewed, {} revoked, {} expired",
///         stats.issued, stats.renewed, stats.revoked, stats.expired,
///     );
///     if stats.failing > 0 || stats.sweeper_lag > Duration::from_secs(5) {
///         eprintln!("{} leases wait for a retry; the sweeper is {:?} late", stats.failing, stats.sweeper_lag);
///     }
///     std::thread::sleep(Duration::from_secs(60));
/// });
/// # Ok::<(), credbroker::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Leases in the table, by role name (roles with none are left out).
    pub live: BTreeMap<String, usize>,
    /// Credentials issued.
    pub issued: u64,
    /// Renewals that succeeded.
    pub renewed: u64,
    /// Credential rotations by [`RolePool`](crate::RolePool)s.
    pub rotated: u64,
    /// Leases revoked before their end (every [`RevokeCause`]).
    pub revoked: u64,
    /// Leases the sweeper revoked at their end.
    pub expired: u64,
    /// Failed attempts to drop a role (each is retried).
    pub revocation_failures: u64,
    /// Leases whose role a failover lost (see [`HandleEvent::handle_lost`]).
    pub lost: u64,
    /// Failovers the broker noticed and reconciled (see `BrokerBuilder::failover_window`).
    pub failovers: u64,
    /// Leases of an earlier run adopted at start.
    pub adopted: u64,
    /// Roles dropped that no lease of the table held: an earlier run's at start, and orphans.
    pub roles_dropped: u64,
    /// Leases whose revocation has failed and that wait for a retry now.
    pub failing: usize,
    /// How late the sweeper is: how long ago the most overdue lease was due (its end, or its retry time), or zero
    /// when none is overdue. More than a few milliseconds means revocation cannot keep up (the database is
    /// slow or down) or the broker is short of connections.
    pub sweeper_lag: Duration,
}

/// One event, queued by the lease state and delivered after every lock is released.
#[derive(Debug)]
pub(crate) enum Event {
    Issued(IssuedEvent),
    Renewed(RenewedEvent),
    Rotated(RotatedEvent),
    Revoked(RevokedEvent),
    Expired(ExpiredEvent),
    Lost(LostEvent),
    RevocationFailed(RevocationFailedEvent),
    Adopted(AdoptedEvent),
    RoleDropped(RoleDroppedEvent),
}

/// The counters behind [`Stats`] and the handler; one per broker.
pub(crate) struct Events {
    handler: Box<dyn HandleEvent>,
    issued: AtomicU64,
    renewed: AtomicU64,
    rotated: AtomicU64,
    revoked: AtomicU64,
    expired: AtomicU64,
    lost: AtomicU64,
    revocation_failures: AtomicU64,
    adopted: AtomicU64,
    roles_dropped: AtomicU64,
}

impl Events {
    pub(crate) fn new(handler: Box<dyn HandleEvent>) -> Events {
        Events {
            handler,
            issued: AtomicU64::new(0),
            renewed: AtomicU64::new(0),
            rotated: AtomicU64::new(0),
            revoked: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            revocation_failures: AtomicU64::new(0),
            adopted: AtomicU64::new(0),
            roles_dropped: AtomicU64::new(0),
        }
    }

    /// Counts `event` (when it is queued, so `stats()` agrees with the table at once).
    pub(crate) fn count_one(&self, event: &Event) {
        let counter = match event {
            Event::Issued(_) => &self.issued,
            Event::Renewed(_) => &self.renewed,
            Event::Rotated(_) => &self.rotated,
            Event::Revoked(_) => &self.revoked,
            Event::Expired(_) => &self.expired,
            Event::Lost(_) => &self.lost,
            Event::RevocationFailed(_) => &self.revocation_failures,
            Event::Adopted(_) => &self.adopted,
            Event::RoleDropped(_) => &self.roles_dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters, into `stats`.
    pub(crate) fn count(&self, stats: &mut Stats) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        stats.issued = get(&self.issued);
        stats.renewed = get(&self.renewed);
        stats.rotated = get(&self.rotated);
        stats.revoked = get(&self.revoked);
        stats.expired = get(&self.expired);
        stats.lost = get(&self.lost);
        stats.revocation_failures = get(&self.revocation_failures);
        stats.adopted = get(&self.adopted);
        stats.roles_dropped = get(&self.roles_dropped);
    }

    /// Calls the handler; a panic in it is logged, never passed on (the sweeper must not die of it).
    pub(crate) fn deliver(&self, event: Event) {
        let handler = &*self.handler;
        let what = match &event {
            Event::Issued(_) => "issued",
            Event::Renewed(_) => "renewed",
            Event::Rotated(_) => "rotated",
            Event::Revoked(_) => "revoked",
            Event::Expired(_) => "expired",
            Event::Lost(_) => "lost",
            Event::RevocationFailed(_) => "revocation failed",
            Event::Adopted(_) => "adopted",
            Event::RoleDropped(_) => "role dropped",
        };
        let call = || match event {
            Event::Issued(e) => handler.handle_issued(e),
            Event::Renewed(e) => handler.handle_renewed(e),
            Event::Rotated(e) => handler.handle_rotated(e),
            Event::Revoked(e) => handler.handle_revoked(e),
            Event::Expired(e) => handler.handle_expired(e),
            Event::Lost(e) => handler.handle_lost(e),
            Event::RevocationFailed(e) => handler.handle_revocation_failed(e),
            Event::Adopted(e) => handler.handle_adopted(e),
            Event::RoleDropped(e) => handler.handle_role_dropped(e),
        };
        if catch_unwind(AssertUnwindSafe(call)).is_err() {
            log::error!("the event handler panicked on a {what} event; the broker carries on");
        }
    }
}

impl fmt::Debug for Events {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("handler", &self.handler)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Default)]
    struct Panicky(Mutex<Vec<String>>);

    impl HandleEvent for Panicky {
        fn handle_issued(&self, event: IssuedEvent) {
            self.0.lock().unwrap().push(event.lease.id);
            panic!("handler bug");
        }
    }

    fn lease() -> Lease {
        let t = SystemTime::UNIX_EPOCH;
        Lease {
            id: "postgresql/creds/r/x".into(),
            role: "r".into(),
            username: "r-1-x".into(),
            issued_at: t,
            expires_at: t,
            max_expires_at: t,
            revocation_attempts: 0,
            last_error: None,
        }
    }

    #[test]
    fn a_panicking_handler_is_contained_and_events_still_count() {
        let events = Events::new(Box::new(Panicky::default()));
        for event in [
            Event::Issued(IssuedEvent { lease: lease() }),
            Event::Issued(IssuedEvent { lease: lease() }),
            Event::Expired(ExpiredEvent {
                lease: lease(),
                revoked_at: SystemTime::now(),
            }),
        ] {
            events.count_one(&event);
            events.deliver(event);
        }
        let mut stats = Stats::default();
        events.count(&mut stats);
        assert_eq!((stats.issued, stats.expired, stats.revoked), (2, 1, 0));
    }
}
