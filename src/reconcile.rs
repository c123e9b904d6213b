//! Reconciliation after a failover: putting the catalog of a new primary back in line with the lease table.
//! Every role dropped within the failover window that exists again is dropped again; every live lease whose
//! role is missing is reported lost; a `VALID UNTIL` that went back is restored. [`failover`](crate::failover)
//! notices the new primary and keeps what this needs.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::error::{describe, Error, ErrorKind};
use crate::events::{DropCause, RoleDroppedEvent};
use crate::failover::{identity, Dropped, Pending, PROBE_INTERVAL};
use crate::lease::pg_timestamp;
use crate::revoke::{drop_roles, Target};
use crate::shared::Shared;
use crate::sql;

/// Most usernames per catalog query.
const CHUNK: usize = 10_000;

/// The sweeper's probe: reads the identity on an idle pooled connection, then reconciles if a failover is
/// pending. Only an idle one: a busy broker's connections are all at work, and every new one's identity is read
/// when it is opened anyway; opening one here would give a busy broker a connection more than its work needs
/// (a fleet of 40 busy brokers filled a server of 60 that way) and keep one open on a broker told to keep none
/// at rest. A dead idle connection is replaced, and the new one's identity read, so a broker at rest notices a
/// failover within one probe interval.
pub(crate) fn probe(shared: &Shared) {
    if let Some(mut client) = shared.idle_connection() {
        let mut read = identity(&mut client);
        if read.is_err() && client.is_closed() {
            drop(client);
            if let Some(mut fresh) = shared.new_connection() {
                read = identity(&mut fresh);
            }
        }
        match read {
            Ok(Some(identity)) => shared.failover.observe(identity),
            Ok(None) => {}
            Err(e) => log::debug!("failover probe failed: {}", describe(&e)),
        }
    }
    if shared.failover.pending() {
        reconcile(shared);
    }
}

/// Reconciles the new primary's catalog with what the broker knows; see the module documentation. Returns at
/// once if a reconciliation is already running.
pub(crate) fn reconcile(shared: &Shared) {
    let Some(_turn) = shared.failover.begin_reconcile() else {
        return;
    };
    let Some(Pending { from, to, recent }) = shared.failover.pending_change() else {
        return;
    };
    let from = from.map_or_else(|| "an unknown server".to_owned(), |i| i.to_string());
    log::warn!(
        "the admin connections reach a different primary than before ({from} -> {to}): a failover; \
         reconciling with the lease table ({} roles dropped within the failover window, {} leases live)",
        recent.len(),
        shared.leases.len()
    );
    match reconcile_with(shared, &recent) {
        Ok(summary) => {
            shared.failover.reconciled_with(to);
            log::warn!(
                "failover reconciled ({to}): {} revoked roles had come back and were dropped again, {} leases \
                 were lost (their roles are missing; reported), {} leases had their VALID UNTIL restored",
                summary.dropped_again,
                summary.lost,
                summary.restored
            );
        }
        Err(e) => {
            log::error!(
                "reconciling after a failover failed: {e}; retrying within {PROBE_INTERVAL:?} (revoked \
                 credentials may work on the new primary until it succeeds)"
            );
        }
    }
}

struct Summary {
    dropped_again: usize,
    lost: usize,
    restored: usize,
}

fn reconcile_with(shared: &Shared, recent: &[Dropped]) -> Result<Summary, Error> {
    // 1. Roles dropped within the window that the failover brought back: drop them again.
    let names: Vec<&str> = recent.iter().map(|d| d.username.as_str()).collect();
    let back = existing(shared, &names)?;
    let again: Vec<&Dropped> = recent
        .iter()
        .filter(|d| back.contains_key(&d.username))
        .collect();
    let targets: Vec<Target<'_>> = again
        .iter()
        .map(|d| Target {
            username: &d.username,
            revocation: d.role.revocation.as_ref(),
        })
        .collect();
    let mut failed = None;
    for (d, result) in again.iter().zip(drop_roles(shared, &targets)) {
        match result {
            Ok(()) => {
                log::warn!(
                    "failover: role {} of lease {}, revoked at {}, existed again on the new primary; dropped it \
                     again",
                    d.username,
                    d.lease_id,
                    pg_timestamp(d.revoked_at)
                );
                shared.leases.role_dropped(RoleDroppedEvent {
                    username: d.username.clone(),
                    lease_id: Some(d.lease_id.clone()),
                    role: Some(d.role.name.clone()),
                    instance: Some(shared.instance.clone()),
                    expires_at: back.get(&d.username).copied().flatten().and_then(|secs| {
                        u64::try_from(secs)
                            .ok()
                            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                    }),
                    cause: DropCause::Failover,
                    dropped_at: SystemTime::now(),
                });
            }
            Err(e) => {
                log::error!(
                    "failover: role {} of lease {}, revoked at {}, exists again on the new primary and could not \
                     be dropped: {e}",
                    d.username,
                    d.lease_id,
                    pg_timestamp(d.revoked_at)
                );
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failed {
        shared.leases.flush();
        return Err(e);
    }

    // 2. Live leases: a missing role is a lost lease; a VALID UNTIL that went back is set again.
    let live = shared.leases.live_leases();
    let names: Vec<&str> = live.iter().map(|l| l.username.as_str()).collect();
    let present = existing(shared, &names)?;
    let missing: Vec<String> = live
        .iter()
        .filter(|l| !present.contains_key(&l.username))
        .map(|l| l.id.clone())
        .collect();
    let now = SystemTime::now();
    let lost = shared.leases.lose(&missing, now);
    shared.failover.remember_lost(&lost, now);
    for lease in &lost {
        log::warn!(
            "failover: lease {} (role {}, user {}) was lost: its role does not exist on the new primary; renew \
             fails with LeaseLost, and a pool holding it obtains a new credential",
            lease.id,
            lease.role,
            lease.username
        );
    }
    let mut restored = 0;
    for lease in &live {
        let Some(Some(valid_until)) = present.get(&lease.username) else {
            continue;
        };
        let expires = lease
            .expires_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if u64::try_from(*valid_until).unwrap_or(0) >= expires {
            continue;
        }
        let alter = sql::set_valid_until(&lease.username, &pg_timestamp(lease.expires_at));
        match shared.with_client(|c| c.batch_execute(&alter)) {
            Ok(Ok(())) => {
                restored += 1;
                log::warn!(
                    "failover: lease {} (user {}) had lost a renewal; VALID UNTIL set again to {}",
                    lease.id,
                    lease.username,
                    pg_timestamp(lease.expires_at)
                );
            }
            Ok(Err(e)) => log::warn!(
                "failover: could not restore VALID UNTIL of lease {}: {}",
                lease.id,
                describe(&e)
            ),
            Err(e) => {
                shared.leases.flush();
                return Err(e);
            }
        }
    }
    // Lost events go out now that every change is made.
    shared.leases.flush();
    Ok(Summary {
        dropped_again: again.len(),
        lost: lost.len(),
        restored,
    })
}

/// Which of `names` exist on the server, with their `VALID UNTIL` in Unix seconds (if set).
fn existing(shared: &Shared, names: &[&str]) -> Result<HashMap<String, Option<i64>>, Error> {
    let mut found = HashMap::new();
    for chunk in names.chunks(CHUNK) {
        let names: Vec<&str> = chunk.to_vec();
        let rows = shared
            .with_client(|c| {
                c.query(sql::ROLES_VALID_UNTIL, &[&names])?
                    .iter()
                    .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                    .collect::<Result<Vec<(String, Option<i64>)>, postgres::Error>>()
            })?
            .map_err(|e| {
                Error::postgres(
                    ErrorKind::Database,
                    "could not read the roles of the new primary",
                    e,
                    &[],
                )
            })?;
        found.extend(rows);
    }
    Ok(found)
}
