//! Revocation: where a lease ends before its time (on request, forced, by prefix, by a pool) and where every
//! drop of a lease's role goes through, the sweeper's and recovery's included: claiming the lease, running the
//! drops in batches on several pooled connections ([`drop_role`](crate::drop_role) has the statements), and
//! settling the lease table with the outcome.

use std::time::{Duration, SystemTime};

use postgres_protocol::escape::escape_identifier;

use crate::drop_role::{revoke_batch, revoke_role, BATCH};
use crate::error::{describe, Error, ErrorKind};
use crate::events::RevokeCause;
use crate::lease_table::DueLease;
use crate::leases::{Claim, LeaseEnd};
use crate::shared::Shared;
use crate::template::Template;
use crate::{sql, telemetry};

/// First retry delay after a failed revocation; it doubles with each failure up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Longest wait between two attempts to revoke the same lease.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// A role to drop, with the custom revocation SQL of its broker role, if any.
pub(crate) struct Target<'a> {
    pub username: &'a str,
    pub revocation: Option<&'a Template>,
}

/// Drops the roles of `targets`, batching those with the default revocation. One result per target, in order:
/// `Ok` once the role is gone.
pub(crate) fn drop_roles(shared: &Shared, targets: &[Target<'_>]) -> Vec<Result<(), Error>> {
    let mut results: Vec<Option<Result<(), Error>>> = targets.iter().map(|_| None).collect();
    drop_roles_each(shared, targets, |i, result| results[i] = Some(result));
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::new(ErrorKind::Revocation, "not attempted"))))
        .collect()
}

/// Drops the roles of `targets` as [`drop_roles`] does, calling `done(index, result)` as soon as each one's
/// outcome is known: the batched ones first, then the ones dropped one at a time, so that a role stuck on a
/// lock delays no other role's report.
pub(crate) fn drop_roles_each(
    shared: &Shared,
    targets: &[Target<'_>],
    mut done: impl FnMut(usize, Result<(), Error>),
) {
    let mut results: Vec<Option<Result<(), Error>>> = targets.iter().map(|_| None).collect();
    let batchable: Vec<usize> = (0..targets.len())
        .filter(|&i| targets[i].revocation.is_none())
        .collect();
    let chunks: Vec<&[usize]> = batchable.chunks(BATCH).collect();
    for (chunk, outcome) in chunks.iter().zip(run_batches(shared, targets, &chunks)) {
        match outcome {
            Ok(Ok(left)) => {
                for &i in chunk.iter() {
                    if !left.iter().any(|u| u == targets[i].username) {
                        results[i] = Some(Ok(()));
                    }
                }
            }
            Ok(Err(e)) => log::debug!(
                "dropping {} roles in one batch failed ({}); dropping them one at a time",
                chunk.len(),
                crate::error::describe(&e)
            ),
            Err(no_connection) => {
                for &i in chunk.iter() {
                    results[i] = Some(Err(Error::new(
                        no_connection.kind(),
                        no_connection.to_string(),
                    )));
                }
            }
        }
    }
    let mut one_at_a_time = Vec::new();
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Some(result) => done(i, result),
            None => one_at_a_time.push(i),
        }
    }
    for i in one_at_a_time {
        let target = &targets[i];
        let result = shared
            .with_client(|client| {
                revoke_role(
                    client,
                    &shared.revoke_settings,
                    target.username,
                    target.revocation,
                )
            })
            .and_then(|revoked| revoked);
        done(i, result);
    }
}

/// What one batch came to: the roles it left for one-at-a-time revocation, a failure of the batch, or no
/// connection at all.
type BatchOutcome = Result<Result<Vec<String>, postgres::Error>, Error>;

/// Runs [`revoke_batch`] for each chunk, on several pooled connections at once when there are several chunks.
fn run_batches(shared: &Shared, targets: &[Target<'_>], chunks: &[&[usize]]) -> Vec<BatchOutcome> {
    let run = |chunk: &[usize]| -> BatchOutcome {
        let names: Vec<&str> = chunk.iter().map(|&i| targets[i].username).collect();
        shared.with_client(|client| revoke_batch(client, &shared.revoke_settings, &names))
    };
    let workers = shared.revocation_workers().min(chunks.len());
    if workers <= 1 {
        return chunks.iter().map(|chunk| run(chunk)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = parking_lot::Mutex::new(Vec::with_capacity(chunks.len()));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(chunk) = chunks.get(i) else { break };
                let outcome = run(chunk);
                done.lock().push((i, outcome));
            });
        }
    });
    let mut done = done.into_inner();
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, outcome)| outcome).collect()
}

/// Revokes claimed leases and settles the lease table: a revoked lease leaves it; a failed one stays, with the
/// error and a retry time for the sweeper. `why` says who asked, for the log and the event. One result per
/// lease, in order.
pub(crate) fn revoke_leases(
    shared: &Shared,
    leases: &[DueLease],
    why: LeaseEnd,
) -> Vec<Result<(), Error>> {
    let results = revoke_leases_unflushed(shared, leases, why);
    // Events go out once every lease claimed is settled: a handler may revoke one of them.
    shared.leases.flush();
    results
}

/// [`revoke_leases`] without delivering the events: for a caller that settles more claimed leases before it
/// calls `flush`.
pub(crate) fn revoke_leases_unflushed(
    shared: &Shared,
    leases: &[DueLease],
    why: LeaseEnd,
) -> Vec<Result<(), Error>> {
    let roles: Vec<_> = leases
        .iter()
        .map(|lease| {
            shared
                .current_role(&lease.role.name)
                .unwrap_or_else(|| lease.role.clone())
        })
        .collect();
    let targets: Vec<Target<'_>> = leases
        .iter()
        .zip(&roles)
        .map(|(lease, role)| Target {
            username: &lease.username,
            revocation: role.revocation.as_ref(),
        })
        .collect();
    let mut results: Vec<Option<Result<(), Error>>> = leases.iter().map(|_| None).collect();
    drop_roles_each(shared, &targets, |i, result| {
        let lease = &leases[i];
        if result.is_ok() {
            shared
                .failover
                .dropped(&lease.id, &lease.username, &roles[i]);
        }
        let retry_at = SystemTime::now() + retry_delay(lease.attempts.saturating_add(1));
        results[i] = Some(shared.leases.settle(lease, result, why, retry_at));
    });
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::new(ErrorKind::Revocation, "not attempted"))))
        .collect()
}

/// Revokes one claimed lease; see [`revoke_leases`].
pub(crate) fn revoke_lease(shared: &Shared, lease: &DueLease, why: LeaseEnd) -> Result<(), Error> {
    revoke_leases(shared, std::slice::from_ref(lease), why)
        .pop()
        .unwrap_or(Ok(()))
}

/// Delay before retry number `attempt` (1-based): doubling from one second, capped, with equal jitter (see
/// [`backoff`](crate::backoff)) so that many leases failing together, or many brokers after a restart, do not
/// retry in lockstep.
pub(crate) fn retry_delay(attempt: u32) -> Duration {
    crate::backoff::retry_delay(attempt, FIRST_RETRY_DELAY, MAX_RETRY_DELAY)
}

/// Revokes lease `id` now, or joins the revocation of it in flight; see [`Broker::revoke`](crate::Broker::revoke).
pub(crate) fn revoke(shared: &Shared, id: &str, why: LeaseEnd) -> Result<(), Error> {
    let started = telemetry::start();
    let result = match shared
        .leases
        .claim(id, shared.op_bound)
        .map_err(|e| shared.lost(id, e))
    {
        Ok(Claim::Claimed(lease)) => revoke_lease(shared, &lease, why),
        Ok(Claim::Joined) => Ok(()),
        Ok(Claim::JoinedFailed(err)) | Err(err) => Err(err),
    };
    telemetry::latency(telemetry::REVOKE, started, result.is_ok());
    result
}

/// See [`Broker::revoke_prefix`](crate::Broker::revoke_prefix).
pub(crate) fn revoke_prefix(shared: &Shared, prefix: &str) -> Result<usize, Error> {
    let ids = shared.leases.ids_with_prefix(prefix);
    let mut revoked = 0;
    let mut failures = Vec::new();
    // As many batches at once as revocation may use connections.
    for chunk in ids.chunks(BATCH * shared.revocation_workers()) {
        // Leases already being revoked (by the sweeper, another thread) are joined one by one below.
        let mut claimed = Vec::new();
        let mut joined = Vec::new();
        for id in chunk {
            match shared.leases.try_claim(id) {
                Some(Ok(lease)) => claimed.push(lease),
                Some(Err(())) => joined.push(id),
                None => {}
            }
        }
        let why = LeaseEnd::Revoked(RevokeCause::Requested);
        for result in revoke_leases(shared, &claimed, why) {
            match result {
                Ok(()) => revoked += 1,
                Err(e) => failures.push(e),
            }
        }
        for id in joined {
            match revoke(shared, id, why) {
                Ok(()) => revoked += 1,
                Err(e) if e.kind() == ErrorKind::UnknownLease => {}
                Err(e) => failures.push(e),
            }
        }
    }
    match failures.first() {
        None => {
            log::info!("revoked {revoked} leases under prefix {prefix}");
            Ok(revoked)
        }
        Some(first) => Err(Error::new(
            ErrorKind::Revocation,
            format!(
                "revoked {revoked} of {} leases under prefix {prefix}; {} failed and stay in the lease table to be \
                 retried; first failure: {first}",
                ids.len(),
                failures.len()
            ),
        )),
    }
}

/// See [`Broker::revoke_force`](crate::Broker::revoke_force).
pub(crate) fn revoke_force(shared: &Shared, id: &str) -> Result<(), Error> {
    let why = LeaseEnd::Revoked(RevokeCause::Forced);
    let lease = loop {
        match shared
            .leases
            .claim(id, shared.op_bound)
            .map_err(|e| shared.lost(id, e))?
        {
            Claim::Claimed(lease) => break lease,
            Claim::Joined => return Ok(()),
            // Claim it now that the other revocation has let go, and force it.
            Claim::JoinedFailed(_) => {}
        }
    };
    let Err(err) = revoke_lease(shared, &lease, why) else {
        return Ok(());
    };
    // `settle` has taken the lease out of the table; now the marker, so that recovery leaves the role alone.
    let unmark = sql::unmark(&shared.marker, &lease.username);
    let unmarked = match shared.with_client(|client| client.batch_execute(&unmark)) {
        Ok(Ok(())) => "the marker was taken away".to_owned(),
        Ok(Err(e)) => format!("the marker could not be taken away ({})", describe(&e)),
        Err(e) => format!("the marker could not be taken away ({e})"),
    };
    log::warn!(
        "forced revocation: forgot lease {id}, whose role {} could not be dropped: {err}; {unmarked}. \
         The role is NOLOGIN if revocation got that far; drop it by hand (DROP OWNED BY / DROP ROLE {})",
        lease.username,
        escape_identifier(&lease.username)
    );
    Ok(())
}
