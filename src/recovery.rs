//! Recovery: reconciling the catalog with the lease table, at start and periodically.
//!
//! At [`build`](crate::BrokerBuilder::build) the lease table is empty, but the catalog may hold roles this
//! instance issued before a crash or restart: every credential role carries the marker and a comment naming its
//! lease, instance and max expiry, and its `VALID UNTIL` is the lease's end (see [`marker`](crate::marker)).
//! Roles of this instance whose lease has ended are dropped at once; live ones are adopted back into the table
//! (so they are swept on time and can be renewed and revoked by id), or dropped too with
//! [`RecoveryMode::RevokeAll`].
//!
//! Every instance also sweeps orphans: marked roles that no lease table holds, whose lease ended at least one
//! orphan-sweep interval ago (the roles of a dead instance, a role whose creation's outcome was lost with its
//! connection). The sweep runs at start and then every interval, under a PostgreSQL advisory lock so that two
//! instances never sweep at once; the grace of one interval leaves a live instance time to drop its own roles
//! first. Roles without the marker are never touched, whatever their name, nor are marked roles without a lease
//! comment the broker wrote.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::error::{Error, ErrorKind};
use crate::events::{DropCause, RoleDroppedEvent};
use crate::lease::Lease;
use crate::marker::{expired_marked_roles, marked_roles, server_now, MarkedRole};
use crate::revoke::{drop_roles, retry_delay, Target};
use crate::role::{CompiledRole, Role};
use crate::shared::Shared;
use crate::sql;

/// What [`build`](crate::BrokerBuilder::build) does with the live roles this instance issued before it started.
///
/// Set it with [`BrokerBuilder::recovery`](crate::BrokerBuilder::recovery); the default is
/// [`Adopt`](RecoveryMode::Adopt). More modes may come: match with a `_` arm.
///
/// # Examples
///
/// A service whose credentials are handed to short-lived workers that do not survive a restart of the service
/// anyway: revoke them all at start rather than adopt them.
///
/// ```no_run
/// use credbroker::{Broker, RecoveryMode};
///
/// let broker = Broker::builder()
///     .connection("host=localhost user=username password=password")
///     .recovery(RecoveryMode::RevokeAll)
///     .build()?;
/// // The last run's live roles were dropped (each a `RoleDroppedEvent` with `DropCause::RevokeAll`), none adopted.
/// assert_eq!(broker.stats().adopted, 0);
/// # Ok::<(), credbroker::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RecoveryMode {
    /// Put them back in the lease table: they are swept at their expiry and can be renewed and revoked by id.
    #[default]
    Adopt,
    /// Drop them all: no credential of an earlier run of this instance survives the start.
    RevokeAll,
}

/// What recovery at start found and did.
#[derive(Debug, Default)]
pub(crate) struct Recovered {
    pub adopted: usize,
    pub dropped: usize,
    pub failed: usize,
}

/// Reconciles this instance's marked roles with the (empty) lease table, then sweeps orphans.
pub(crate) fn recover(shared: &Shared, mode: RecoveryMode) -> Result<Recovered, Error> {
    // Live or ended by the server's clock, the one `VALID UNTIL` is compared with at login.
    let (marked, server_now) = shared
        .with_client(|client| Ok((marked_roles(client, &shared.marker)?, server_now(client)?)))?
        .map_err(|e| {
            let context = format!(
                "could not list the members of marker role {:?}",
                shared.marker
            );
            Error::postgres(ErrorKind::Database, context, e, &[])
        })?;
    let now = SystemTime::now();
    let mut recovered = Recovered::default();
    let mut to_drop: Vec<(&MarkedRole, DropCause)> = Vec::new();
    for role in marked.iter().filter(|r| r.belongs_to(&shared.instance)) {
        match (mode, adoptable(shared, role, server_now)) {
            (RecoveryMode::Adopt, Some((lease, definition))) => {
                let (id, expires_at) = (lease.id.clone(), lease.expires_at);
                if shared.leases.adopted(lease, &definition) {
                    log::info!(
                        "adopted lease {id} (role {}), valid until {}",
                        role.username,
                        humantime::format_rfc3339_seconds(expires_at)
                    );
                    recovered.adopted += 1;
                } else {
                    log::warn!("recovery: role {} has a lease id or name credbroker does not make; left to the orphan sweep", role.username);
                }
            }
            (RecoveryMode::RevokeAll, Some(_)) => to_drop.push((role, DropCause::RevokeAll)),
            _ => to_drop.push((role, DropCause::Ended)),
        }
    }
    let targets: Vec<Target<'_>> = to_drop
        .iter()
        .map(|(r, _)| Target {
            username: &r.username,
            revocation: None,
        })
        .collect();
    for (&(role, cause), result) in to_drop.iter().zip(drop_roles(shared, &targets)) {
        match result {
            Ok(()) => {
                recovered.dropped += 1;
                shared.leases.role_dropped(dropped_event(role, cause));
                log::info!(
                    "recovery: dropped role {} of an earlier run of this instance (lease {})",
                    role.username,
                    lease_id(role)
                );
            }
            Err(err) => {
                recovered.failed += 1;
                log::warn!(
                    "recovery: could not drop role {} (lease {}); the sweeper retries: {err}",
                    role.username,
                    lease_id(role)
                );
                // Into the table as a failed revocation, so it is retried with backoff and shows in
                // failed_leases().
                if let Some((lease, definition)) = adoptable(shared, role, SystemTime::UNIX_EPOCH) {
                    shared.leases.adopt_failed(
                        lease,
                        &definition,
                        err.to_string(),
                        now + retry_delay(1),
                    );
                }
            }
        }
    }
    sweep_orphans(shared);
    Ok(recovered)
}

/// The lease (and its role definition) of a role this instance issued whose lease is still live at `now`.
fn adoptable(
    shared: &Shared,
    role: &MarkedRole,
    now: SystemTime,
) -> Option<(Lease, Arc<CompiledRole>)> {
    let mark = role.mark.as_ref()?;
    let expires_at = role.expires_at()?;
    if expires_at <= now {
        return None;
    }
    let definition = match shared.current_role(&mark.role) {
        Some(defined) => defined,
        // Roles are written after build: until then the lease is renewed and revoked the default way.
        None => Arc::new(CompiledRole::compile(&mark.role, Role::new(), shared.policy).ok()?),
    };
    let lease = Lease {
        id: mark.lease_id.clone(),
        role: mark.role.clone(),
        username: role.username.clone(),
        issued_at: mark.issued_at,
        expires_at,
        max_expires_at: mark.max_expires_at,
        revocation_attempts: 0,
        last_error: None,
    };
    Some((lease, definition))
}

/// The event of `role`, dropped now.
fn dropped_event(role: &MarkedRole, cause: DropCause) -> RoleDroppedEvent {
    let mark = role.mark.as_ref();
    RoleDroppedEvent {
        username: role.username.clone(),
        lease_id: mark.map(|m| m.lease_id.clone()),
        role: mark.map(|m| m.role.clone()),
        instance: mark.map(|m| m.instance.clone()),
        expires_at: role.expires_at(),
        cause,
        dropped_at: SystemTime::now(),
    }
}

fn lease_id(role: &MarkedRole) -> &str {
    role.mark
        .as_ref()
        .map_or("unknown", |m| m.lease_id.as_str())
}

/// Drops orphans: marked roles with a lease comment the broker wrote, in no lease table of this instance, whose lease
/// ended at least one orphan-sweep interval ago, of any instance. Runs only if no other instance is sweeping (advisory
/// lock); failures are logged and retried at the next sweep. Returns how many roles it dropped.
pub(crate) fn sweep_orphans(shared: &Shared) -> usize {
    match try_sweep_orphans(shared) {
        Ok(dropped) => dropped,
        Err(err) => {
            log::warn!(
                "orphan sweep skipped, will run again in {:?}: {err}",
                shared.orphan_interval
            );
            0
        }
    }
}

fn try_sweep_orphans(shared: &Shared) -> Result<usize, Error> {
    let db = |e| Error::postgres(ErrorKind::Database, "orphan sweep failed", e, &[]);
    // The lock is held by a connection of its own, outside the pool: the drops below take pooled connections.
    let mut lock = shared.revoke_settings.connection.connect()?;
    let key = format!("credbroker orphan sweep {}", shared.marker);
    let locked: bool = lock
        .query_one(sql::TRY_SWEEP_LOCK, &[&key])
        .map_err(db)?
        .get(0);
    if !locked {
        log::debug!("another instance is sweeping orphans; skipping this turn");
        return Ok(0);
    }
    // Expired for at least the interval by the server's clock, not ours: with ours skewed ahead by more than a
    // lease plus the interval, another instance's live roles would look expired. Filtered on the server.
    let marked =
        expired_marked_roles(&mut lock, &shared.marker, shared.orphan_interval).map_err(db)?;
    let orphans: Vec<&MarkedRole> = {
        marked
            .iter()
            // Only roles whose comment the broker wrote: the marker may be a group with other members.
            .filter(|r| {
                r.mark
                    .as_ref()
                    .is_some_and(|m| !shared.leases.contains(&m.lease_id))
            })
            .collect()
    };
    let definitions: Vec<Option<Arc<CompiledRole>>> = orphans
        .iter()
        .map(|r| r.mark.as_ref().and_then(|m| shared.current_role(&m.role)))
        .collect();
    let targets: Vec<Target<'_>> = orphans
        .iter()
        .zip(&definitions)
        .map(|(r, d)| Target {
            username: &r.username,
            revocation: d.as_ref().and_then(|d| d.revocation.as_ref()),
        })
        .collect();
    let mut dropped = 0;
    for (role, result) in orphans.iter().zip(drop_roles(shared, &targets)) {
        let instance = role
            .mark
            .as_ref()
            .map_or("unknown", |m| m.instance.as_str());
        match result {
            Ok(()) => {
                dropped += 1;
                shared
                    .leases
                    .role_dropped(dropped_event(role, DropCause::Orphan));
                log::info!(
                    "orphan sweep: dropped expired role {} of instance {instance} (lease {})",
                    role.username,
                    lease_id(role)
                );
            }
            Err(err) => log::warn!(
                "orphan sweep: could not drop expired role {} of instance {instance}; retrying at the next sweep: {err}",
                role.username
            ),
        }
    }
    let _ = lock.query_one(sql::RELEASE_SWEEP_LOCK, &[&key]);
    Ok(dropped)
}

/// How long the sweeper waits between orphan sweeps unless configured.
pub(crate) const DEFAULT_ORPHAN_INTERVAL: Duration = Duration::from_secs(60);
