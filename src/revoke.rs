//! Revocation: where a credential's role is dropped, whether the user asked or the lease expired.
//!
//! The order matters. `NOLOGIN` is committed first, so no new session can start; then the role's sessions are
//! ended (a session outlives `DROP ROLE`, keeping the privileges of any group it did `SET ROLE` to); then one
//! transaction hands the role's objects to the admin, drops its privileges and drops it; then every session
//! whose role no longer exists is ended, in case one was still authenticating when the role was fenced. A role that is already gone counts as revoked, and so does
//! any failure after which the role turns out to be gone (a concurrent revocation of the same lease).

use std::time::{Duration, SystemTime};

use postgres::Client;

use crate::broker::Shared;
use crate::error::{Error, ErrorKind};
use crate::lease_table::DueLease;
use crate::role::CompiledRole;
use crate::sql;
use crate::template::Values;

/// First retry delay after a failed revocation; it doubles with each failure up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Longest wait between two attempts to revoke the same lease.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);
/// After this many failures a lease is reported at error level (it is still retried).
pub(crate) const FAILURES_BEFORE_ERROR: u32 = 6;

/// Drops `username` by the rules of `role`; `Ok` once the role is gone.
pub(crate) fn revoke_role(
    client: &mut Client,
    username: &str,
    role: &CompiledRole,
) -> Result<(), Error> {
    let oid = match role_oid(client, username) {
        Ok(Some(oid)) => oid,
        Ok(None) => return Ok(()),
        Err(e) => return Err(failed(username, e)),
    };
    let attempt = (|| -> Result<(), postgres::Error> {
        client.batch_execute(&sql::nologin(username))?;
        client.query_one(sql::TERMINATE_SESSIONS, &[&oid])?;
        let drop_sql = match &role.revocation {
            Some(template) => template.render(&Values {
                name: username,
                password: "",
                expiration: "",
            }),
            None => {
                let dependencies: bool = client.query_one(sql::HAS_DEPENDENCIES, &[&oid])?.get(0);
                if dependencies {
                    sql::drop_role_and_owned(username)
                } else {
                    sql::drop_role(username)
                }
            }
        };
        let mut tx = client.transaction()?;
        tx.batch_execute(&drop_sql)?;
        tx.commit()?;
        client.query_one(sql::TERMINATE_ORPHAN_SESSIONS, &[])?;
        Ok(())
    })();
    if attempt.is_ok() && role.revocation.is_none() {
        // Our own DROP ROLE committed: the role is gone, no need to ask.
        return Ok(());
    }
    let still_there = role_oid(client, username)
        .map_err(|e| failed(username, e))?
        .is_some();
    match (attempt, still_there) {
        (_, false) => Ok(()),
        (Err(e), true) => Err(failed(username, e)),
        (Ok(()), true) => Err(Error::new(
            ErrorKind::Revocation,
            format!(
                "the revocation SQL of role {:?} ran but role {username:?} still exists; \
                 make the revocation SQL drop the role (DROP ROLE \"{{{{name}}}}\")",
                role.name
            ),
        )),
    }
}

fn role_oid(client: &mut Client, username: &str) -> Result<Option<u32>, postgres::Error> {
    Ok(client
        .query_opt(sql::ROLE_OID, &[&username])?
        .map(|row| row.get(0)))
}

fn failed(username: &str, err: postgres::Error) -> Error {
    let context = format!("could not drop role {username:?}");
    Error::postgres(ErrorKind::Revocation, context, err, &[])
}

/// Revokes a claimed lease and settles the lease table: on success the lease leaves it; on failure it stays,
/// with the error and a retry time for the sweeper. `why` says who asked, for the log.
pub(crate) fn revoke_lease(shared: &Shared, lease: &DueLease, why: &str) -> Result<(), Error> {
    let role = shared
        .current_role(&lease.role.name)
        .unwrap_or_else(|| lease.role.clone());
    let result = shared
        .with_client(|client| revoke_role(client, &lease.username, &role))
        .and_then(|revoked| revoked);
    match result {
        Ok(()) => {
            shared.state.lock().table.remove(&lease.id);
            log::info!(
                "revoked lease {} ({why}): dropped role {}",
                lease.id,
                lease.username
            );
            Ok(())
        }
        Err(err) => {
            let attempts = {
                let mut state = shared.state.lock();
                let previous = state
                    .table
                    .get(&lease.id)
                    .map_or(0, |e| e.lease.revocation_attempts);
                let retry_at = SystemTime::now() + retry_delay(previous + 1);
                state.table.failed(&lease.id, err.to_string(), retry_at)
            };
            shared.wake.notify_one();
            match attempts {
                Some(n) if n >= FAILURES_BEFORE_ERROR => log::error!(
                    "revocation of lease {} (role {}) has failed {n} times and will be retried: {err}",
                    lease.id,
                    lease.username
                ),
                Some(n) => log::warn!(
                    "revocation of lease {} (role {}) failed (attempt {n}), will retry: {err}",
                    lease.id,
                    lease.username
                ),
                None => {}
            }
            Err(err)
        }
    }
}

/// Delay before retry number `attempt` (1-based): doubling from one second, capped, with ±25% jitter so that
/// many leases failing together do not retry in lockstep.
pub(crate) fn retry_delay(attempt: u32) -> Duration {
    let exponential = FIRST_RETRY_DELAY.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    exponential
        .min(MAX_RETRY_DELAY)
        .mul_f64(rand::random_range(0.75..1.25))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_grows_and_is_capped() {
        for _ in 0..50 {
            let first = retry_delay(1);
            assert!(
                first >= Duration::from_millis(750) && first <= Duration::from_millis(1250),
                "{first:?}"
            );
            let fourth = retry_delay(4);
            assert!(
                fourth >= Duration::from_secs(6) && fourth <= Duration::from_secs(10),
                "{fourth:?}"
            );
            assert!(retry_delay(u32::MAX) <= MAX_RETRY_DELAY.mul_f64(1.25));
        }
    }
}
