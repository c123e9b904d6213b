//! Dropping a role: the statements that end a credential's role, whoever asked (a revocation, the sweeper at the
//! lease's end, recovery, an orphan sweep, a failover's reconciliation); [`revoke`](crate::revoke) runs them.
//!
//! The order matters. `NOLOGIN` is committed first, so no new session can start; then the role's sessions are
//! ended (a session outlives `DROP ROLE`, keeping the privileges of any group it did `SET ROLE` to); then, in
//! every database where the role owns objects or holds privileges, what it owns is handed to the owner and its
//! privileges are dropped; then the role is dropped; then any session of the dropped role is ended, in case one
//! was still authenticating when the role was fenced (only the oids just dropped: sessions of roles someone else
//! dropped are left alone). A role that is already gone counts as revoked,
//! and so does any failure after which the role turns out to be gone (a concurrent drop by another instance).
//!
//! Roles with the default revocation are dropped in batches of up to [`BATCH`]: one `NOLOGIN` transaction, one
//! `pg_terminate_backend` query and one `DROP ROLE a, b, …` for the whole batch. Roles that own objects or hold
//! privileges, roles with a custom revocation SQL, and every role of a batch that failed are then dropped one
//! per transaction, so one bad role never holds back the rest. Batches are bounded because dropping tens of
//! thousands of roles in one transaction runs out of lock table ("out of shared memory"); several batches run
//! at once on as many pooled connections as the pool has, but one.

use postgres::Client;

use crate::connection::Connection;
use crate::error::{Error, ErrorKind};
use crate::sql;
use crate::template::{Template, Values};

/// Most roles dropped in one transaction.
pub(crate) const BATCH: usize = 256;

/// How roles are dropped; fixed when the broker is built.
#[derive(Clone)]
pub(crate) struct RevokeSettings {
    /// The admin connection, to reach the other databases where a role owns objects.
    pub connection: Connection,
    /// Who receives the objects a dropped role owned (`REASSIGN OWNED BY … TO owner`).
    pub owner: String,
    /// Whether sessions are ended (off only in the degraded mode chosen with `terminate_sessions(false)`).
    pub terminate_sessions: bool,
}

/// Drops the roles `usernames` (all with the default revocation) in a few statements for the whole batch.
/// Returns the roles it left for [`revoke_role`]: those that own objects or hold privileges. Any error means
/// the caller must drop every role of the batch one at a time.
pub(crate) fn revoke_batch(
    client: &mut Client,
    settings: &RevokeSettings,
    usernames: &[&str],
) -> Result<Vec<String>, postgres::Error> {
    // Simple queries with quoted literals: three round trips for the whole batch, none spent preparing.
    let present: Vec<(String, u32)> =
        rows(client, &sql::existing_roles(usernames.iter().copied()))?
            .into_iter()
            .filter_map(|[name, oid]| Some((name, oid.parse().ok()?)))
            .collect();
    if present.is_empty() {
        return Ok(Vec::new());
    }
    let oids: Vec<u32> = present.iter().map(|(_, oid)| *oid).collect();
    let names = || present.iter().map(|(u, _)| u.as_str());
    let fence = sql::fence_batch(names(), &oids, settings.terminate_sessions);
    let fenced = rows(client, &fence);
    if fenced.is_err() && !client.is_closed() {
        // A failed statement inside BEGIN … COMMIT leaves the transaction open and aborted: close it, so the
        // connection goes back to the pool clean. If this fails too, the connection is broken and discarded.
        let _ = client.batch_execute("ROLLBACK");
    }
    let dependent: Vec<u32> = fenced?
        .into_iter()
        .filter(|[tag, _]| tag == sql::DEPENDENT_TAG)
        .filter_map(|[_, oid]| oid.parse().ok())
        .collect();
    let (left, plain): (Vec<_>, Vec<_>) =
        present.iter().partition(|(_, oid)| dependent.contains(oid));
    if !plain.is_empty() {
        let names = plain.iter().map(|(u, _)| u.as_str());
        let oids: Vec<u32> = plain.iter().map(|(_, oid)| *oid).collect();
        client.simple_query(&sql::drop_batch(names, &oids, settings.terminate_sessions))?;
    }
    Ok(left.into_iter().map(|(u, _)| u.clone()).collect())
}

/// The two-column text rows a simple query returned.
fn rows(client: &mut Client, query: &str) -> Result<Vec<[String; 2]>, postgres::Error> {
    Ok(client
        .simple_query(query)?
        .into_iter()
        .filter_map(|message| match message {
            postgres::SimpleQueryMessage::Row(row) => Some([
                row.get(0).unwrap_or_default().to_owned(),
                row.get(1).unwrap_or_default().to_owned(),
            ]),
            _ => None,
        })
        .collect())
}

/// Drops one role, however much it owns and wherever; `Ok` once the role is gone.
pub(crate) fn revoke_role(
    client: &mut Client,
    settings: &RevokeSettings,
    username: &str,
    revocation: Option<&Template>,
) -> Result<(), Error> {
    let oid = match role_oid(client, username) {
        Ok(Some(oid)) => oid,
        Ok(None) => return Ok(()),
        Err(e) => return Err(failed(username, e)),
    };
    let attempt = drop_one(client, settings, username, oid, revocation);
    if attempt.is_ok() && revocation.is_none() {
        // Our own DROP ROLE committed: the role is gone, no need to ask.
        return Ok(());
    }
    let still_there = role_oid(client, username)
        .map_err(|e| failed(username, e))?
        .is_some();
    match (attempt, still_there) {
        (_, false) => Ok(()),
        (Err(e), true) => Err(e),
        (Ok(()), true) => Err(Error::new(
            ErrorKind::Revocation,
            format!(
                "the revocation SQL ran but role {username:?} still exists; \
                 make the revocation SQL drop the role (DROP ROLE \"{{{{name}}}}\")"
            ),
        )),
    }
}

/// The steps of [`revoke_role`] for a role that exists with `oid`.
fn drop_one(
    client: &mut Client,
    settings: &RevokeSettings,
    username: &str,
    oid: u32,
    revocation: Option<&Template>,
) -> Result<(), Error> {
    let pg = |e| failed(username, e);
    client.batch_execute(&sql::nologin(username)).map_err(pg)?;
    if settings.terminate_sessions {
        client
            .query_one(sql::TERMINATE_SESSIONS, &[&vec![oid]])
            .map_err(pg)?;
    }
    let drop_sql = match revocation {
        Some(template) => template.render(&Values {
            name: username,
            password: "",
            expiration: "",
        }),
        None => {
            let dependencies: Vec<u32> = client
                .query(sql::WITH_DEPENDENCIES, &[&vec![oid]])
                .map_err(pg)?
                .iter()
                .map(|row| row.get(0))
                .collect();
            if dependencies.is_empty() {
                sql::drop_roles([username])
            } else {
                client
                    .batch_execute(&sql::grant_to_admin(username))
                    .map_err(pg)?;
                let databases: Vec<String> = client
                    .query(sql::OTHER_DATABASES_WITH_DEPENDENCIES, &[&oid])
                    .map_err(pg)?
                    .iter()
                    .map(|row| row.get(0))
                    .collect();
                for database in &databases {
                    clean_database(settings, username, database)?;
                }
                format!(
                    "{} {}",
                    sql::reassign_and_drop_owned(username, &settings.owner),
                    sql::drop_roles([username])
                )
            }
        }
    };
    let mut tx = client.transaction().map_err(pg)?;
    tx.batch_execute(&drop_sql).map_err(pg)?;
    tx.commit().map_err(pg)?;
    if revocation.is_some() {
        client.batch_execute(sql::RESET_SESSION).map_err(pg)?;
    }
    if settings.terminate_sessions {
        client
            .query_one(sql::TERMINATE_DROPPED_SESSIONS, &[&vec![oid]])
            .map_err(pg)?;
    }
    Ok(())
}

/// Hands what `username` owns in `database` to the owner and drops its privileges there, over a short-lived
/// connection with the admin's credentials.
fn clean_database(settings: &RevokeSettings, username: &str, database: &str) -> Result<(), Error> {
    let mut client = settings.connection.connect_to(database).map_err(|e| {
        Error::new(
            ErrorKind::Revocation,
            format!(
                "could not drop role {username:?}: it owns objects or holds privileges in database {database:?}, \
                 which the admin could not reach: {e}"
            ),
        )
    })?;
    client
        .batch_execute(&sql::reassign_and_drop_owned(username, &settings.owner))
        .map_err(|e| {
            let context = format!(
                "could not drop role {username:?}: handing its objects in database {database:?} to {:?} failed",
                settings.owner
            );
            Error::postgres(ErrorKind::Revocation, context, e, &[])
        })
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
