//! Issuing a credential: where [`creds`] creates a PostgreSQL login role, in one transaction with its marker,
//! and records its lease.

use std::sync::Arc;
use std::time::SystemTime;

use postgres::error::SqlState;
use postgres::Client;
use zeroize::Zeroizing;

use crate::credential::{generate_lease_id, scram_verifier, Credential};
use crate::error::{Error, ErrorKind};
use crate::lease::{pg_timestamp, Lease};
use crate::marker::LeaseMark;
use crate::role::{check_role_name, CompiledRole};
use crate::shared::{unknown_role, Shared};
use crate::template::{Placeholder, Values};
use crate::{sql, telemetry};

/// How many times `creds` tries fresh usernames when PostgreSQL reports one as taken.
const USERNAME_ATTEMPTS: usize = 3;

/// See [`Broker::creds`](crate::Broker::creds).
pub(crate) fn creds(shared: &Shared, name: &str) -> Result<Credential, Error> {
    let started = telemetry::start();
    let result = issue(shared, name);
    telemetry::creds_latency(name, started, result.is_ok());
    result
}

fn issue(shared: &Shared, name: &str) -> Result<Credential, Error> {
    check_role_name(name)?;
    if shared.leases.is_shut_down() {
        return Err(Error::new(
            ErrorKind::ShutDown,
            format!("cannot issue a credential for role {name:?}: the broker has shut down"),
        ));
    }
    let role = shared
        .current_role(name)
        .ok_or_else(|| unknown_role(name))?;
    // Counted with the table under its lock, before anything is created: released on any failure below.
    let slot = shared.leases.reserve(&role, shared.max_leases)?;
    let now = SystemTime::now();
    let (issued_at, expires_at, max_expires_at) = role.policy.issue(now);
    let password = role.new_password()?;
    let verifier = scram_verifier(&password, shared.scram_iterations)?;
    let expiration = pg_timestamp(expires_at);

    let mut uncertain: Vec<(LeaseMark, String)> = Vec::new();
    let mut attempt = 0;
    let outcome = loop {
        attempt += 1;
        let username = role.new_username(&shared.instance, now)?;
        let mark = LeaseMark {
            lease_id: generate_lease_id(name)?,
            role: name.to_owned(),
            instance: shared.instance.clone(),
            issued_at,
            max_expires_at,
        };
        let sql = Zeroizing::new(creation_sql(
            shared,
            &role,
            &username,
            &verifier,
            &expiration,
            &mark,
        ));
        let result = shared.with_client(|client| {
            let result = run_in_one_round_trip(client, &sql);
            if result.is_err() && client.is_closed() {
                // The COMMIT may have reached the server before the connection died.
                uncertain.push((mark.clone(), username.clone()));
            }
            result
        });
        match result {
            Err(no_connection) => break Err((no_connection, username)),
            Ok(Ok(())) => break Ok((mark, username)),
            Ok(Err(e))
                if e.code() == Some(&SqlState::DUPLICATE_OBJECT) && attempt < USERNAME_ATTEMPTS =>
            {
                log::warn!("username {username} was taken; retrying with another");
            }
            Ok(Err(e)) => {
                let err = Error::postgres(
                    ErrorKind::Database,
                    format!("could not create a credential for role {name:?}; nothing was created"),
                    e,
                    &[&verifier, &password],
                );
                break Err((err, username));
            }
        }
    };
    let created = outcome.as_ref().ok().map(|(mark, _)| mark.lease_id.clone());
    for (mark, username) in uncertain
        .into_iter()
        .filter(|(m, _)| Some(&m.lease_id) != created.as_ref())
    {
        sweep_uncertain(shared, mark, username, &role);
    }
    let (mark, username) = outcome.map_err(|(err, _)| err)?;

    let lease = Lease {
        id: mark.lease_id.clone(),
        role: name.to_owned(),
        username: username.clone(),
        issued_at,
        expires_at,
        max_expires_at,
        revocation_attempts: 0,
        last_error: None,
    };
    slot.issued(lease, &role);
    log::info!(
        "issued lease {} for role {name}: user {username}, valid until {expiration}",
        mark.lease_id
    );
    Ok(Credential {
        lease_id: mark.lease_id,
        lease_duration: role.policy.default,
        username,
        password,
    })
}

/// The whole creation transaction's SQL: the role's template, `VALID UNTIL` if the template does not set it,
/// and the marker. Newlines around the separators keep a trailing `--` comment in the template from
/// swallowing what follows.
fn creation_sql(
    shared: &Shared,
    role: &CompiledRole,
    username: &str,
    verifier: &str,
    expiration: &str,
    mark: &LeaseMark,
) -> String {
    let mut sql = role.creation.render(&Values {
        name: username,
        password: verifier,
        expiration,
    });
    if !role.creation.uses(Placeholder::Expiration) {
        sql.push_str("\n;\n");
        sql.push_str(&sql::set_valid_until(username, expiration));
    }
    if let Some(group) = role.role.get_group() {
        sql.push_str("\n;\n");
        sql.push_str(&sql::join_group(group, username));
    }
    sql.push_str("\n;\n");
    sql.push_str(&sql::mark(
        &shared.marker,
        &crate::marker::admin_group(&shared.marker),
        username,
        &mark.comment(),
    ));
    sql
}

/// Records a creation whose outcome was lost with its connection as an expired lease: the sweeper drops
/// its role if the transaction committed after all, and forgets the lease either way.
fn sweep_uncertain(shared: &Shared, mark: LeaseMark, username: String, role: &Arc<CompiledRole>) {
    log::warn!(
        "the connection was lost while creating lease {}; the sweeper makes sure its role is gone",
        mark.lease_id
    );
    let lease = Lease {
        id: mark.lease_id,
        role: mark.role,
        username,
        issued_at: mark.issued_at,
        expires_at: SystemTime::now(),
        max_expires_at: mark.max_expires_at,
        revocation_attempts: 0,
        last_error: None,
    };
    shared.leases.adopt(lease, role);
}

/// Runs `sql` as one transaction in one round trip: `BEGIN; …; COMMIT; RESET …` in a single simple query. A
/// statement that fails skips the rest, COMMIT included, and leaves the transaction aborted; it is then rolled
/// back so the pooled connection is clean. (Templates cannot end the transaction early: `write_role` refuses
/// those.)
fn run_in_one_round_trip(client: &mut Client, sql: &str) -> Result<(), postgres::Error> {
    // RESET after COMMIT: a template's plain `SET` would otherwise stay on the pooled connection.
    let batch = Zeroizing::new(format!(
        "BEGIN;\n{sql}\n;\nCOMMIT;\n{};",
        sql::RESET_SESSION
    ));
    let result = client.batch_execute(&batch);
    if result.is_err() && !client.is_closed() {
        // Nothing to report if this fails too: the connection is then broken, and the pool discards it.
        let _ = client.batch_execute("ROLLBACK");
    }
    result
}
