//! Renewing a lease: where `VALID UNTIL` moves, first in PostgreSQL, then in the lease table.

use std::time::{Duration, SystemTime};

use postgres::error::SqlState;
use postgres::Client;

use crate::error::{Error, ErrorKind};
use crate::lease::{pg_timestamp, Lease};
use crate::shared::Shared;
use crate::template::{Placeholder, Values};
use crate::{sql, telemetry};

/// See [`Broker::renew`](crate::Broker::renew).
pub(crate) fn renew(
    shared: &Shared,
    id: &str,
    increment: Option<Duration>,
) -> Result<Lease, Error> {
    let started = telemetry::start();
    let result = extend(shared, id, increment);
    telemetry::latency(telemetry::RENEW, started, result.is_ok());
    result
}

fn extend(shared: &Shared, id: &str, increment: Option<Duration>) -> Result<Lease, Error> {
    let turn = shared
        .leases
        .begin_renewal(id, shared.op_bound)
        .map_err(|e| shared.lost(id, e))?;
    let now = SystemTime::now();
    let username = turn.username.clone();
    let role = shared
        .current_role(&turn.role.name)
        .unwrap_or_else(|| turn.role.clone());
    let expires_at = role.policy.renew(now, increment, turn.max_expires_at)?;
    let expiration = pg_timestamp(expires_at);
    // VALID UNTIL moves first and always: recovery reads the lease's end from it.
    let sql = match &role.renew {
        Some(template) if template.uses(Placeholder::Expiration) => format!(
            "{}\n;\n{}",
            template.render(&Values {
                name: &username,
                password: "",
                expiration: &expiration,
            }),
            sql::RESET_SESSION
        ),
        Some(template) => format!(
            "{}\n;\n{}\n;\n{}",
            template.render(&Values {
                name: &username,
                password: "",
                expiration: &expiration,
            }),
            sql::set_valid_until(&username, &expiration),
            sql::RESET_SESSION
        ),
        None => sql::set_valid_until(&username, &expiration),
    };
    shared
        .with_client(|client| alter_role(client, &sql))?
        .map_err(|e| {
            Error::postgres(
                ErrorKind::Database,
                format!("could not renew lease {id}"),
                e,
                &[],
            )
        })?;

    let lease = turn.finish(expires_at)?;
    log::info!("renewed lease {id} (user {username}) until {expiration}");
    Ok(lease)
}

/// How many times an `ALTER ROLE` that lost a race with another change of the same role is tried.
const ALTER_ATTEMPTS: usize = 5;

/// Runs `sql`, an `ALTER ROLE`, again when PostgreSQL reports that another session changed the same role at the
/// same moment ("tuple concurrently updated", an internal error `XX000` rather than a serialization failure): a
/// renewal meeting another instance's change. (Changes of one lease in this broker take turns.) Each
/// attempt is one implicit transaction, so repeating it is safe.
fn alter_role(client: &mut Client, sql: &str) -> Result<(), postgres::Error> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match client.batch_execute(sql) {
            Err(e) if attempt < ALTER_ATTEMPTS && lost_update_race(&e) => {
                std::thread::sleep(Duration::from_millis(rand::random_range(1..10)));
            }
            result => return result,
        }
    }
}

fn lost_update_race(e: &postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::INTERNAL_ERROR && db.message() == "tuple concurrently updated"
    })
}
