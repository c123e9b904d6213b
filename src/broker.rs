//! The broker: the public face of the credential lifecycle. Each method checks its input and hands the work to
//! the module named after it ([`issue`](crate::issue), [`renew`](crate::renew), [`revoke`](crate::revoke),
//! [`pool`](crate::pool), [`shutdown`](crate::shutdown)); role definitions are kept here.

use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::credential::Credential;
use crate::error::Error;
use crate::events::{RevokeCause, Stats};
use crate::lease::Lease;
use crate::leases::LeaseEnd;
use crate::pool::{PoolOptions, RolePool};
use crate::preflight::{self, Reserved};
use crate::role::{check_role_name, CompiledRole, Role};
use crate::runtime::off_runtime;
use crate::shared::{unknown_role, Shared};
use crate::shutdown::{self, ShutdownMode};
use crate::{issue, renew, revoke};

/// The credential broker. See the [crate documentation](crate) for a walk-through.
///
/// `Broker` is `Send + Sync`: share it by reference or in an `Arc`. Dropping it stops the sweeper, then does
/// what the builder's [`shutdown_mode`](crate::BrokerBuilder::shutdown_mode) says: by default leases still live are
/// kept, their roles stop accepting logins at `VALID UNTIL`, and the next start of the same instance adopts
/// them. Dropping returns within 2 seconds with [`ShutdownMode::Keep`] (waiting that long at most for
/// revocations in flight, which then finish in the background), and within the timeout with
/// [`ShutdownMode::Revoke`], whatever state the server is in.
///
/// # Inside a tokio runtime
///
/// Every method may be called from async code, in either runtime flavour. The methods that reach PostgreSQL
/// (`build`, `write_role`, `creds`, `renew`, the revocations, `pool`, `shutdown`, and dropping the broker) then
/// run their database work on a thread of their own and block the calling worker thread until it is done: one
/// round trip for `creds` or `renew`, plus a thread's start (tens of microseconds). That is fine at startup or
/// now and then; a service that issues credentials on its request path should use the async API (feature
/// `tokio`), which waits without holding a worker thread.
pub struct Broker {
    pub(crate) shared: Arc<Shared>,
    /// Taken by the first stop.
    pub(crate) sweeper: Mutex<Option<JoinHandle<()>>>,
    pub(crate) shutdown_mode: ShutdownMode,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("roles", &self.roles())
            .field("leases", &self.shared.leases.len())
            .field("policy", &self.shared.policy)
            .field("ssl_mode", &self.shared.ssl_mode)
            .field("instance", &self.shared.instance)
            .field("marker", &self.shared.marker)
            .finish()
    }
}

impl Broker {
    /// Creates or replaces the role `name`.
    ///
    /// The name must be 1–32 characters of `[A-Za-z0-9_-]`. The templates are parsed, then run against the
    /// server in a transaction with sample values and rolled back, so SQL errors (a typo, an unknown group role)
    /// show here and not at the first `creds`. The creation SQL must create a role named `{{name}}` and must not
    /// commit or roll back on its own; a revocation SQL must drop that role. A [group](Role::group) is checked
    /// (and created if missing) here too. Leases already issued under an earlier definition of the role are
    /// renewed and revoked with the new one.
    pub fn write_role(&self, name: &str, role: Role) -> Result<(), Error> {
        off_runtime(|| write_role(&self.shared, name, role))
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
    /// [`ErrorKind::UnknownRole`](crate::ErrorKind::UnknownRole) if no such role is defined.
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
    /// `VALID UNTIL` at the lease's end, marks it (membership in the marker role and a comment recording the
    /// lease), in one transaction, and records the lease.
    ///
    /// The password leaves the process only as a SCRAM-SHA-256 verifier. On any failure nothing is left behind:
    /// no role in PostgreSQL, no lease in the table; the error carries PostgreSQL's message. (If the connection
    /// is lost while the transaction commits, the outcome is unknown: the broker then records the attempt as an
    /// expired lease, so the sweeper makes sure its role is gone.)
    pub fn creds(&self, name: &str) -> Result<Credential, Error> {
        off_runtime(|| issue::creds(&self.shared, name))
    }

    /// Renews lease `id`: its new end is now plus `increment` (`None`: the role's default lease), capped at the
    /// issue time plus the max lease. PostgreSQL's `VALID UNTIL` moves first, then the lease table.
    ///
    /// Fails with [`ErrorKind::UnknownLease`](crate::ErrorKind::UnknownLease) for an id not in the table and [`ErrorKind::LeaseExpired`](crate::ErrorKind::LeaseExpired) for a
    /// lease past its end or being revoked.
    pub fn renew(&self, id: &str, increment: Option<Duration>) -> Result<Lease, Error> {
        off_runtime(|| renew::renew(&self.shared, id, increment))
    }

    /// The lease `id`, if it is in the table (issued, and its role not yet dropped).
    pub fn lease(&self, id: &str) -> Option<Lease> {
        self.shared.leases.lease(id)
    }

    /// Every lease in the table, sorted by id.
    pub fn leases(&self) -> Vec<Lease> {
        self.shared.leases.leases()
    }

    /// Leases whose revocation has failed at least once; they stay in the table and are retried with backoff.
    pub fn failed_leases(&self) -> Vec<Lease> {
        self.shared.leases.failed_leases()
    }

    /// Counts of what the broker did since it was built (issued, renewed, rotated, revoked, expired, failed
    /// revocations), the live leases per role, and how late the sweeper is. Cheap enough to poll every second:
    /// it copies counters and a map with one entry per role, under the lease table's lock for microseconds.
    pub fn stats(&self) -> Stats {
        let mut stats = self.shared.leases.stats();
        stats.failovers = self.shared.failover.reconciled();
        stats
    }

    /// Revokes lease `id` now: ends the role's sessions, drops what it owns and the role itself. A role already
    /// gone counts as revoked. The lease leaves the table only once the role is gone; if revocation fails the
    /// error is returned and the sweeper retries with backoff.
    ///
    /// If the lease is being revoked already (by the sweeper, a pool, or another thread), this call joins that
    /// revocation and returns its outcome; if a renewal of it is running, it waits for the renewal first. Once
    /// the lease has left the table, it fails with [`ErrorKind::UnknownLease`](crate::ErrorKind::UnknownLease).
    pub fn revoke(&self, id: &str) -> Result<(), Error> {
        off_runtime(|| revoke::revoke(&self.shared, id, LeaseEnd::Revoked(RevokeCause::Requested)))
    }

    /// A pool of connections for role `name` with the default [`PoolOptions`]: see
    /// [`pool_with`](Broker::pool_with).
    pub fn pool(&self, name: &str) -> Result<RolePool, Error> {
        self.pool_with(name, PoolOptions::new())
    }

    /// A pool of connections for role `name`, always logged in with a valid credential of that role.
    ///
    /// The pool issues one credential now (and logs in once with it, so a role that cannot log in fails here),
    /// renews its lease in the background, and before the lease reaches its max rotates to a new credential:
    /// new connections use the new one, connections of the old one are closed as they are returned (never while
    /// checked out), and the old lease is revoked once none of its connections remain, or at its end. Each
    /// connection's `application_name` is its lease id (see [the pools' reference](crate::guide::reference#pools)). Fails as
    /// [`creds`](Broker::creds) does, with [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) for bad options, and with
    /// [`ErrorKind::Connection`](crate::ErrorKind::Connection) if the credential cannot log in.
    pub fn pool_with(&self, name: &str, options: PoolOptions) -> Result<RolePool, Error> {
        off_runtime(|| self.pool_here(name, options))
    }

    /// [`pool_with`](Broker::pool_with), on this thread.
    pub(crate) fn pool_here(&self, name: &str, options: PoolOptions) -> Result<RolePool, Error> {
        RolePool::open(&self.shared, name, options, self.shutdown_mode)
    }

    /// A sqlx [`PgPool`](sqlx::PgPool) for role `name` whose connect options always carry a valid credential of
    /// that role: [`RolePool`]'s renewals, rotations and guarantees, for async services (feature `sqlx`).
    ///
    /// The pool issues one credential now and logs in once with it; renews its lease at half its duration;
    /// rotates to a new credential `rotate_before` ahead of the lease's max, by
    /// [`set_connect_options`](sqlx::Pool::set_connect_options); closes connections of the old credential as
    /// they are returned (never while checked out); and revokes the old lease once PostgreSQL shows none of its
    /// sessions left, or at its end. `application_name` is the lease id; TLS follows the admin connection's
    /// settings where sqlx can honour them, and fails with [`ErrorKind::Tls`](crate::ErrorKind::Tls) where it cannot (sqlx has no
    /// channel binding, and checks certificates against public CAs too: give `sslmode=verify-full`, `disable`,
    /// or `channel_binding=prefer` as an explicit opt-out). `sslrootcert=system` means sqlx's built-in public CAs.
    /// A connection string with several hosts is refused with [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) (sqlx connects to one
    /// host and cannot find the primary after a failover), as is `PGSSLCERT`/`PGSSLKEY` in the environment (sqlx
    /// would present that certificate). Otherwise fails as [`pool_with`](Broker::pool_with) does.
    /// The broker's own database work runs on tokio's blocking threads, never on a runtime worker.
    ///
    /// ```no_run
    /// # async fn run(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
    /// use credbroker::PoolOptions;
    ///
    /// let pool = broker.sqlx_pool("readonly", PoolOptions::new().max_size(8)).await?;
    /// let user: String = sqlx::query_scalar("SELECT current_user::text").fetch_one(&*pool).await?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "sqlx")]
    pub async fn sqlx_pool(
        &self,
        name: &str,
        options: PoolOptions,
    ) -> Result<crate::SqlxPool, Error> {
        crate::SqlxPool::open(&self.shared, name, options, self.shutdown_mode).await
    }

    /// A deadpool pool of tokio-postgres connections for role `name`, always logged in with a valid credential
    /// of that role (feature `deadpool`): [`RolePool`]'s renewals, rotations and guarantees, for async services.
    ///
    /// Its manager logs in with the current credential, over the admin connection's TLS settings (channel
    /// binding included), and refuses to recycle a connection of a retired credential, so such a connection is
    /// closed instead of being handed out again, never while checked out; the old lease is revoked once its last
    /// connection is gone, or at its end. `min_idle` does not apply (deadpool opens connections on demand). The
    /// pool stops renewing within a second of its last clone being dropped, then revokes or keeps its leases as
    /// [`PoolOptions::on_drop`] says. Fails as [`pool_with`](Broker::pool_with) does. The broker's own database
    /// work runs on tokio's blocking threads, never on a runtime worker.
    ///
    /// ```no_run
    /// # async fn run(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
    /// use credbroker::PoolOptions;
    ///
    /// let pool = broker.deadpool("readonly", PoolOptions::new().max_size(8)).await?;
    /// let client = pool.get().await?;
    /// let user: String = client.query_one("SELECT current_user::text", &[]).await?.get(0);
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "deadpool")]
    pub async fn deadpool(
        &self,
        name: &str,
        options: PoolOptions,
    ) -> Result<crate::DeadpoolPool, Error> {
        crate::deadpool_pool::open(&self.shared, name, options, self.shutdown_mode).await
    }

    /// Revokes every lease whose id starts with `prefix` (e.g. `postgresql/creds/production/`), in batches, and
    /// returns how many were revoked. If any fails, the others are still revoked, the failed ones stay in the
    /// table to be retried, and the error says how many failed.
    pub fn revoke_prefix(&self, prefix: &str) -> Result<usize, Error> {
        off_runtime(|| revoke::revoke_prefix(&self.shared, prefix))
    }

    /// Revokes lease `id`, and if its role cannot be dropped, forgets the lease anyway: it leaves the table, the
    /// reason is logged at warn level, and the role loses the marker (so recovery and orphan sweeps leave it
    /// alone too). The role stays `NOLOGIN` if revocation got that far, for an operator to drop by hand. For a
    /// role that an operator has taken out of the broker's hands, or a revocation that can never succeed.
    ///
    /// Fails with [`ErrorKind::UnknownLease`](crate::ErrorKind::UnknownLease), or with [`ErrorKind::Revocation`](crate::ErrorKind::Revocation) if another revocation of the
    /// lease is still running after the bound on one operation (`connect_timeout` plus four statement
    /// timeouts).
    pub fn revoke_force(&self, id: &str) -> Result<(), Error> {
        off_runtime(|| revoke::revoke_force(&self.shared, id))
    }

    /// Stops the broker: stops and joins the sweeper, then keeps or revokes the leases still in the table as
    /// `mode` says. With [`ShutdownMode::Revoke`], fails with [`ErrorKind::Revocation`](crate::ErrorKind::Revocation) if some leases could not
    /// be revoked within the timeout (their roles stay fenced by `VALID UNTIL`, for the next start or another
    /// instance to drop).
    pub fn shutdown(self, mode: ShutdownMode) -> Result<(), Error> {
        off_runtime(|| shutdown::stop(&self.shared, &self.sweeper, mode))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Err(err) =
            off_runtime(|| shutdown::stop(&self.shared, &self.sweeper, self.shutdown_mode))
        {
            log::error!("{err}");
        }
    }
}

/// See [`Broker::write_role`]; the async API calls it too.
pub(crate) fn write_role(shared: &Shared, name: &str, role: Role) -> Result<(), Error> {
    let compiled = CompiledRole::compile(name, role, shared.policy)?;
    compiled.check_for_instance(&shared.instance)?;
    let reserved = Reserved {
        marker: &shared.marker,
        owner: &shared.revoke_settings.owner,
    };
    shared.with_client(|client| {
        let group = compiled.role.get_group();
        let group_exists = match group {
            Some(group) => preflight::check_credentials_group(client, name, group, &reserved)?,
            None => true,
        };
        compiled.try_on_server(
            client,
            &shared.revoke_settings,
            &shared.instance,
            group_exists,
        )?;
        match group {
            Some(group) => {
                preflight::ensure_credentials_group(client, name, group, group_exists, &reserved)
            }
            None => Ok(()),
        }
    })??;
    shared
        .roles
        .write()
        .insert(name.to_owned(), Arc::new(compiled));
    log::info!("wrote role {name}");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn broker_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::Broker>();
    }
}
