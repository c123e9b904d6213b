//! The broker: configuration, roles, and the credential lifecycle (issue, renew, revoke).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use parking_lot::{Condvar, Mutex, RwLock};
use postgres::error::SqlState;
use postgres::Client;
use r2d2::{Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;
use tokio_postgres_rustls::MakeRustlsConnect;
use zeroize::Zeroizing;

use crate::connection::{Connection, SslMode};
use crate::credential::{
    generate_lease_id, generate_password, generate_username, scram_verifier, Credential,
};
use crate::error::{Error, ErrorKind};
use crate::lease::{pg_timestamp, Lease, LeasePolicy};
use crate::lease_table::{Entry, LeaseTable};
use crate::revoke::revoke_lease;
use crate::role::{check_role_name, CompiledRole, Role};
use crate::template::Values;
use crate::{sql, sweeper};

type Manager = PostgresConnectionManager<MakeRustlsConnect>;

/// How many times `creds` tries fresh usernames when PostgreSQL reports one as taken.
const USERNAME_ATTEMPTS: usize = 3;

/// Configuration of a [`Broker`]; every setting has a default but the connection string.
///
/// | setting | default |
/// |---|---|
/// | [`connection`](BrokerBuilder::connection) | required |
/// | [`lease`](BrokerBuilder::lease) | 1 hour default, 24 hours max |
/// | [`pool_size`](BrokerBuilder::pool_size) | 4 connections |
/// | [`connect_timeout`](BrokerBuilder::connect_timeout) | 10 seconds |
pub struct BrokerBuilder {
    connection: Option<Zeroizing<String>>,
    default_lease: Duration,
    max_lease: Duration,
    pool_size: u32,
    connect_timeout: Duration,
}

impl Default for BrokerBuilder {
    fn default() -> BrokerBuilder {
        BrokerBuilder {
            connection: None,
            default_lease: Duration::from_secs(3600),
            max_lease: Duration::from_secs(24 * 3600),
            pool_size: 4,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl fmt::Debug for BrokerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerBuilder")
            .field("connection", &self.connection.as_ref().map(|_| "<hidden>"))
            .field("default_lease", &self.default_lease)
            .field("max_lease", &self.max_lease)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl BrokerBuilder {
    /// The admin connection: a libpq `key=value` string (`host=localhost user=username password=password`) or a
    /// `postgres://` URL. Without `sslmode`, TLS is required; `sslmode` may be `disable`, `prefer`, `require`,
    /// `verify-ca` or `verify-full` (the last two with `sslrootcert=/path/to/ca.crt`). The user must be a
    /// superuser or have `CREATEROLE`.
    pub fn connection(mut self, connection: impl Into<String>) -> BrokerBuilder {
        self.connection = Some(Zeroizing::new(connection.into()));
        self
    }

    /// The lease a credential gets by default, and the longest a lease may live from its issue, renewals
    /// included. Roles may override both (their max no higher than this max).
    pub fn lease(mut self, default: Duration, max: Duration) -> BrokerBuilder {
        self.default_lease = default;
        self.max_lease = max;
        self
    }

    /// How many admin connections the pool keeps (at least 1). Each `creds`, `renew` and `revoke` holds one for
    /// the duration of its SQL; the sweeper uses the same pool.
    pub fn pool_size(mut self, size: u32) -> BrokerBuilder {
        self.pool_size = size;
        self
    }

    /// How long connecting to PostgreSQL, or waiting for a free pooled connection, may take before failing.
    pub fn connect_timeout(mut self, timeout: Duration) -> BrokerBuilder {
        self.connect_timeout = timeout;
        self
    }

    /// Connects, checks that the admin user may create roles, and starts the sweeper.
    ///
    /// Fails with [`ErrorKind::InvalidConfig`] for bad settings, [`ErrorKind::SslNotEnabled`] when TLS is
    /// required but the server has no SSL, [`ErrorKind::Tls`] when the certificate check fails,
    /// [`ErrorKind::Connection`] when the server cannot be reached or refuses the login, and
    /// [`ErrorKind::Permission`] when the admin user can neither create roles nor is a superuser.
    pub fn build(self) -> Result<Broker, Error> {
        let source = self.connection.ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidConfig,
                "no connection string; call BrokerBuilder::connection(\"host=... user=... password=...\")",
            )
        })?;
        let policy = LeasePolicy::new(self.default_lease, self.max_lease)?;
        if self.pool_size == 0 {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "pool_size is 0; the broker needs at least one connection",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "connect_timeout is zero; give the time a connection may take, e.g. Duration::from_secs(10)",
            ));
        }
        let connection = Connection::parse(&source, self.connect_timeout)?;
        drop(source);

        let mut client = connection.connect()?;
        let admin_user = check_admin_rights(&mut client)?;
        drop(client);

        let manager =
            PostgresConnectionManager::new(connection.config.clone(), connection.tls.clone());
        let pool = Pool::builder()
            .max_size(self.pool_size)
            // The connection was just verified; a ping before every operation would double the round trips.
            .test_on_check_out(false)
            .connection_timeout(self.connect_timeout)
            .build_unchecked(manager);
        log::info!(
            "connected to PostgreSQL at {} as {admin_user} (sslmode={}), pool of {}",
            connection.target(),
            connection.ssl_mode,
            self.pool_size
        );

        let shared = Arc::new(Shared {
            pool,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            roles: RwLock::new(BTreeMap::new()),
            policy,
            ssl_mode: connection.ssl_mode,
        });
        let sweeper = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("credbroker-sweeper".into())
                .spawn(move || sweeper::run(shared))
                .map_err(|e| {
                    Error::new(ErrorKind::Connection, "could not start the sweeper thread")
                        .with_source(e)
                })?
        };
        Ok(Broker {
            shared,
            sweeper: Some(sweeper),
        })
    }
}

/// Checks that the admin may create roles; returns its name.
fn check_admin_rights(client: &mut Client) -> Result<String, Error> {
    let row = client.query_one(sql::ADMIN_RIGHTS, &[]).map_err(|e| {
        Error::postgres(
            ErrorKind::Connection,
            "could not read the admin user's rights",
            e,
            &[],
        )
    })?;
    let (user, superuser, createrole, signal, version): (String, bool, bool, bool, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if version < sql::MIN_SERVER_VERSION {
        return Err(Error::new(
            ErrorKind::Connection,
            format!("the server runs PostgreSQL version number {version}; credbroker needs PostgreSQL 14 or later"),
        ));
    }
    if !superuser && !createrole {
        return Err(Error::new(
            ErrorKind::Permission,
            format!(
                "admin user {user:?} may not create roles; grant it with `ALTER ROLE {} CREATEROLE;` \
                 (run as a superuser), or connect as a superuser",
                postgres_protocol::escape::escape_identifier(&user)
            ),
        ));
    }
    if !superuser && !signal {
        log::warn!(
            "admin user {user:?} is not a member of pg_signal_backend: revoking a credential with open sessions will fail; \
             fix with `GRANT pg_signal_backend TO {};`",
            postgres_protocol::escape::escape_identifier(&user)
        );
    }
    Ok(user)
}

/// State the sweeper and the callers share.
pub(crate) struct Shared {
    pool: Pool<Manager>,
    pub(crate) state: Mutex<State>,
    /// Wakes the sweeper: a lease that is due sooner, a failed revocation to schedule, or shutdown.
    pub(crate) wake: Condvar,
    roles: RwLock<BTreeMap<String, Arc<CompiledRole>>>,
    policy: LeasePolicy,
    ssl_mode: SslMode,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) table: LeaseTable,
    pub(crate) shutdown: bool,
}

impl Shared {
    /// A pooled admin connection.
    pub(crate) fn connection(&self) -> Result<PooledConnection<Manager>, Error> {
        self.pool.get().map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!(
                    "no PostgreSQL connection available within {:?}: {e}; check that the server is up, or raise pool_size",
                    self.pool.connection_timeout()
                ),
            )
        })
    }

    /// Runs `op` on a pooled connection. The pool does not ping connections on checkout (that would double the
    /// round trips), so pooled connections may have died since their last use, all at once when the server
    /// restarted: while `op` fails on a connection that turns out closed (and is then discarded by the pool), it
    /// runs again on another, at most once per pool slot plus one. Renew, revoke and the role check are safe to
    /// repeat; `creds` is too, except when the connection is lost while its COMMIT is in flight: then a role may
    /// exist that no lease knows of, fenced by its `VALID UNTIL`.
    pub(crate) fn with_client<T, E>(
        &self,
        mut op: impl FnMut(&mut Client) -> Result<T, E>,
    ) -> Result<Result<T, E>, Error> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut client = self.connection()?;
            let result = op(&mut client);
            if result.is_ok() || !client.is_closed() || tries > self.pool.max_size() {
                return Ok(result);
            }
            log::info!(
                "a pooled PostgreSQL connection was closed (server restart?); retrying on another"
            );
        }
    }

    /// The role currently defined under `name`, if any.
    pub(crate) fn current_role(&self, name: &str) -> Option<Arc<CompiledRole>> {
        self.roles.read().get(name).cloned()
    }
}

/// The credential broker. See the [crate documentation](crate) for a walk-through.
///
/// `Broker` is `Send + Sync`: share it by reference or in an `Arc`. Dropping it stops and joins the sweeper
/// (waiting for a revocation in flight, at most about `connect_timeout` plus its SQL); leases still live are not
/// revoked, and their roles stop accepting logins at `VALID UNTIL`.
pub struct Broker {
    shared: Arc<Shared>,
    sweeper: Option<JoinHandle<()>>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("roles", &self.roles())
            .field("leases", &self.shared.state.lock().table.len())
            .field("policy", &self.shared.policy)
            .field("ssl_mode", &self.shared.ssl_mode)
            .finish()
    }
}

impl Broker {
    /// A builder with the defaults listed on [`BrokerBuilder`].
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    /// Creates or replaces the role `name`.
    ///
    /// The name must be 1–32 characters of `[A-Za-z0-9_-]`. The templates are parsed, then run against the
    /// server in a transaction with sample values and rolled back, so SQL errors (a typo, an unknown group role)
    /// show here and not at the first `creds`. The creation SQL must create a role named `{{name}}` and must not
    /// commit or roll back on its own; a revocation SQL must drop that role. Leases already issued under an
    /// earlier definition of the role are renewed and revoked with the new one.
    pub fn write_role(&self, name: &str, role: Role) -> Result<(), Error> {
        let compiled = CompiledRole::compile(name, role, self.shared.policy)?;
        self.shared
            .with_client(|client| compiled.try_on_server(client))??;
        self.shared
            .roles
            .write()
            .insert(name.to_owned(), Arc::new(compiled));
        log::info!("wrote role {name}");
        Ok(())
    }

    /// The definition of role `name`, if defined.
    pub fn role(&self, name: &str) -> Option<Role> {
        self.shared.current_role(name).map(|r| r.role.clone())
    }

    /// The names of the defined roles, sorted.
    pub fn roles(&self) -> Vec<String> {
        self.shared.roles.read().keys().cloned().collect()
    }

    /// Deletes role `name`: no new credentials can be issued for it. Leases already issued stay valid, and can
    /// still be renewed and revoked (with the role definition they were issued under). Fails with
    /// [`ErrorKind::UnknownRole`] if no such role is defined.
    pub fn delete_role(&self, name: &str) -> Result<(), Error> {
        check_role_name(name)?;
        match self.shared.roles.write().remove(name) {
            Some(_) => {
                log::info!("deleted role {name}");
                Ok(())
            }
            None => Err(unknown_role(name)),
        }
    }

    /// Issues a credential for role `name`: creates a PostgreSQL login role with a fresh random password and
    /// `VALID UNTIL` at the lease's end, in one transaction, and records the lease.
    ///
    /// The password leaves the process only as a SCRAM-SHA-256 verifier. On any failure nothing is left behind:
    /// no role in PostgreSQL, no lease in the table; the error carries PostgreSQL's message.
    pub fn creds(&self, name: &str) -> Result<Credential, Error> {
        let role = self
            .shared
            .current_role(name)
            .ok_or_else(|| unknown_role(name))?;
        let now = SystemTime::now();
        let (issued_at, expires_at, max_expires_at) = role.policy.issue(now);
        let password = generate_password()?;
        let verifier = scram_verifier(&password);
        let lease_id = generate_lease_id(name)?;
        let expiration = pg_timestamp(expires_at);

        let mut attempt = 0;
        let username = loop {
            attempt += 1;
            let username = generate_username(name, now)?;
            let sql = Zeroizing::new(role.creation.render(&Values {
                name: &username,
                password: &verifier,
                expiration: &expiration,
            }));
            match self
                .shared
                .with_client(|client| run_in_transaction(client, &sql))?
            {
                Ok(()) => break username,
                Err(e)
                    if e.code() == Some(&SqlState::DUPLICATE_OBJECT)
                        && attempt < USERNAME_ATTEMPTS =>
                {
                    log::warn!("username {username} was taken; retrying with another");
                }
                Err(e) => {
                    return Err(Error::postgres(
                        ErrorKind::Database,
                        format!(
                            "could not create a credential for role {name:?}; nothing was created"
                        ),
                        e,
                        &[&verifier, &password],
                    ))
                }
            }
        };

        let lease = Lease {
            id: lease_id.clone(),
            role: name.to_owned(),
            username: username.clone(),
            issued_at,
            expires_at,
            max_expires_at,
            revocation_attempts: 0,
            last_error: None,
        };
        let earliest = self
            .shared
            .state
            .lock()
            .table
            .insert(Entry::new(lease, role.clone()));
        if earliest {
            self.shared.wake.notify_one();
        }
        log::info!(
            "issued lease {lease_id} for role {name}: user {username}, valid until {expiration}"
        );
        Ok(Credential {
            lease_id,
            lease_duration: role.policy.default,
            username,
            password,
        })
    }

    /// Renews lease `id`: its new end is now plus `increment` (`None`: the role's default lease), capped at the
    /// issue time plus the max lease. PostgreSQL's `VALID UNTIL` moves first, then the lease table.
    ///
    /// Fails with [`ErrorKind::UnknownLease`] for an id not in the table and [`ErrorKind::LeaseExpired`] for a
    /// lease past its end or being revoked.
    pub fn renew(&self, id: &str, increment: Option<Duration>) -> Result<Lease, Error> {
        let now = SystemTime::now();
        let (snapshot, username, max_expires_at) = {
            let state = self.shared.state.lock();
            let entry = state.table.get(id).ok_or_else(|| unknown_lease(id))?;
            if entry.in_flight() || entry.lease.revocation_attempts > 0 {
                return Err(Error::new(
                    ErrorKind::LeaseExpired,
                    format!("lease {id} is being revoked and cannot be renewed; request new credentials"),
                ));
            }
            if entry.lease.expires_at <= now {
                return Err(expired(id));
            }
            (
                entry.role.clone(),
                entry.lease.username.clone(),
                entry.lease.max_expires_at,
            )
        };
        let role = self.shared.current_role(&snapshot.name).unwrap_or(snapshot);
        let expires_at = role.policy.renew(now, increment, max_expires_at)?;
        let expiration = pg_timestamp(expires_at);
        let sql = match &role.renew {
            Some(template) => template.render(&Values {
                name: &username,
                password: "",
                expiration: &expiration,
            }),
            None => sql::set_valid_until(&username, &expiration),
        };
        self.shared
            .with_client(|client| client.batch_execute(&sql))?
            .map_err(|e| {
                Error::postgres(
                    ErrorKind::Database,
                    format!("could not renew lease {id}"),
                    e,
                    &[],
                )
            })?;

        let mut state = self.shared.state.lock();
        if !state.table.set_expiry(id, expires_at) {
            return Err(Error::new(
                ErrorKind::LeaseExpired,
                format!("lease {id} expired or was revoked while it was being renewed; request new credentials"),
            ));
        }
        let lease = state
            .table
            .get(id)
            .map(|e| e.lease.clone())
            .ok_or_else(|| unknown_lease(id))?;
        drop(state);
        log::info!("renewed lease {id} (user {username}) until {expiration}");
        Ok(lease)
    }

    /// The lease `id`, if it is in the table (issued, and its role not yet dropped).
    pub fn lease(&self, id: &str) -> Option<Lease> {
        self.shared
            .state
            .lock()
            .table
            .get(id)
            .map(|e| e.lease.clone())
    }

    /// Every lease in the table, sorted by id.
    pub fn leases(&self) -> Vec<Lease> {
        self.shared.state.lock().table.leases()
    }

    /// Leases whose revocation has failed at least once; they stay in the table and are retried with backoff.
    pub fn failed_leases(&self) -> Vec<Lease> {
        self.shared.state.lock().table.failed_leases()
    }

    /// Revokes lease `id` now: ends the role's sessions, drops what it owns and the role itself. A role already
    /// gone counts as revoked. The lease leaves the table only once the role is gone; if revocation fails the
    /// error is returned and the sweeper retries with backoff.
    pub fn revoke(&self, id: &str) -> Result<(), Error> {
        let lease = self
            .shared
            .state
            .lock()
            .table
            .claim(id)
            .ok_or_else(|| unknown_lease(id))?;
        revoke_lease(&self.shared, &lease, "requested")
    }

    /// Revokes every lease whose id starts with `prefix` (e.g. `postgresql/creds/production/`) and returns how
    /// many were revoked. If any fails, the others are still revoked, the failed ones stay in the table to be
    /// retried, and the error says how many failed.
    pub fn revoke_prefix(&self, prefix: &str) -> Result<usize, Error> {
        let ids = self.shared.state.lock().table.ids_with_prefix(prefix);
        let mut revoked = 0;
        let mut failures = Vec::new();
        for id in &ids {
            match self.revoke(id) {
                Ok(()) => revoked += 1,
                // Revoked meanwhile by someone else (the sweeper, another thread): nothing left to do.
                Err(e) if e.kind() == ErrorKind::UnknownLease => {}
                Err(e) => failures.push(e),
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
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shared.state.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(sweeper) = self.sweeper.take() {
            if sweeper.join().is_err() {
                log::error!("the sweeper thread panicked");
            }
        }
    }
}

fn run_in_transaction(client: &mut Client, sql: &str) -> Result<(), postgres::Error> {
    let mut tx = client.transaction()?;
    tx.batch_execute(sql)?;
    tx.commit()
}

fn unknown_role(name: &str) -> Error {
    Error::new(
        ErrorKind::UnknownRole,
        format!("no role named {name:?} is defined; define it with Broker::write_role"),
    )
}

fn unknown_lease(id: &str) -> Error {
    Error::new(
        ErrorKind::UnknownLease,
        format!("no lease {id} in the lease table: it was never issued by this broker, or it was already revoked"),
    )
}

fn expired(id: &str) -> Error {
    Error::new(
        ErrorKind::LeaseExpired,
        format!("lease {id} has expired and cannot be renewed; request new credentials"),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn broker_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::Broker>();
    }
}
