//! The broker: the public face of the credential lifecycle. Its methods check their input and hand the work to
//! [`issue`](crate::issue) (`creds`), [`renew`](crate::renew), [`revoke`](crate::revoke) (the revocations),
//! [`pool`](crate::pool) and [`shutdown`](crate::shutdown); role definitions are written and deleted here (the
//! table of them lives in [`Shared`]).

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
///
/// # Examples
///
/// One broker for the process, built at start and shared by reference with the threads that need credentials:
///
/// ```no_run
/// use credbroker::{Broker, Role};
///
/// let broker = Broker::builder()
///     .connection("host=localhost user=username password=password")
///     .build()?;
/// broker.write_role("worker", Role::new())?;
///
/// std::thread::scope(|s| {
///     let workers: Vec<_> = (0..4)
///         .map(|_| {
///             s.spawn(|| -> Result<(), credbroker::Error> {
///                 let creds = broker.creds("worker")?;
///                 // ... connect as creds.username() with creds.password(), do the work ...
///                 broker.revoke(creds.lease_id())
///             })
///         })
///         .collect();
///     workers.into_iter().try_for_each(|w| w.join().expect("a worker panicked"))
/// })?;
/// // Dropping the broker keeps what is still live for the next start (the default ShutdownMode::Keep).
/// # Ok::<(), credbroker::Error>(())
/// ```
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
    ///
    /// # Examples
    ///
    /// A read-only role with short leases:
    ///
    /// ```no_run
    /// use credbroker::Role;
    /// use std::time::Duration;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let readonly = Role::new()
    ///     .creation_sql(
    ///         r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
    ///            GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{name}}";"#,
    ///     )
    ///     .lease(Duration::from_secs(15 * 60), Duration::from_secs(4 * 3600));
    /// // A typo or a missing schema fails here (ErrorKind::TemplateRejected, with PostgreSQL's SQLSTATE in
    /// // db_code()), not at the first creds.
    /// broker.write_role("readonly", readonly)?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn write_role(&self, name: &str, role: Role) -> Result<(), Error> {
        off_runtime(|| write_role(&self.shared, name, role))
    }

    /// The definition of role `name`, if defined.
    ///
    /// # Examples
    ///
    /// Defining a role only where it is missing, so a restart does not replace one an operator changed:
    ///
    /// ```no_run
    /// use credbroker::Role;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// if broker.role("readonly").is_none() {
    ///     broker.write_role("readonly", Role::new())?;
    /// }
    /// let role = broker.role("readonly").expect("just written");
    /// println!("creation SQL: {}", role.get_creation_sql());
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn role(&self, name: &str) -> Option<Role> {
        self.shared.current_role(name).map(|r| r.role.clone())
    }

    /// The names of the defined roles, sorted.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::Role;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// broker.write_role("web", Role::new())?;
    /// broker.write_role("batch", Role::new())?;
    /// assert_eq!(broker.roles(), ["batch", "web"]);
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn roles(&self) -> Vec<String> {
        self.shared.roles.read().keys().cloned().collect()
    }

    /// Deletes role `name`: no new credentials can be issued for it. Leases already issued stay valid, and can
    /// still be renewed and revoked (with the role definition they were issued under). Fails with
    /// [`ErrorKind::UnknownRole`](crate::ErrorKind::UnknownRole) if no such role is defined.
    ///
    /// # Examples
    ///
    /// Retiring a role: no new credentials, and the ones already issued revoked now rather than at their end:
    ///
    /// ```no_run
    /// use credbroker::ErrorKind;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// match broker.delete_role("legacy") {
    ///     Ok(()) => {}
    ///     Err(e) if e.kind() == ErrorKind::UnknownRole => {} // deleted already
    ///     Err(e) => return Err(e),
    /// }
    /// let revoked = broker.revoke_prefix("postgresql/creds/legacy/")?;
    /// println!("revoked {revoked} leases of role legacy");
    /// # Ok::<(), credbroker::Error>(())
    /// ```
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
    ///
    /// # Examples
    ///
    /// A credential for one job run by another program, revoked when the job is done (otherwise the sweeper
    /// drops it at its end):
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let creds = broker.creds("backup")?;
    /// let status = std::process::Command::new("pg_dump")
    ///     .args(["--host=db.internal", "--dbname=app", "--file=app.sql"])
    ///     .env("PGUSER", creds.username())
    ///     .env("PGPASSWORD", creds.password())
    ///     .status()?;
    /// broker.revoke(creds.lease_id())?;
    /// assert!(status.success());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// When the role's [`max_leases`](crate::Role::max_leases) or the broker's
    /// [`max_leases`](crate::BrokerBuilder::max_leases) is reached, nothing is created and the call can be
    /// retried once leases end:
    ///
    /// ```no_run
    /// use credbroker::ErrorKind;
    /// use std::time::Duration;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let creds = loop {
    ///     match broker.creds("batch") {
    ///         Ok(creds) => break creds,
    ///         Err(e) if e.kind() == ErrorKind::LeaseCap => std::thread::sleep(Duration::from_secs(1)),
    ///         Err(e) => return Err(e),
    ///     }
    /// };
    /// # broker.revoke(creds.lease_id())?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn creds(&self, name: &str) -> Result<Credential, Error> {
        off_runtime(|| issue::creds(&self.shared, name))
    }

    /// Renews lease `id`: its new end is now plus `increment` (`None`: the role's default lease), capped at the
    /// issue time plus the max lease. PostgreSQL's `VALID UNTIL` moves first, then the lease table.
    ///
    /// Fails with [`ErrorKind::UnknownLease`](crate::ErrorKind::UnknownLease) for an id not in the table and
    /// [`ErrorKind::LeaseExpired`](crate::ErrorKind::LeaseExpired) for a lease past its end or being revoked.
    ///
    /// Renewing never extends a lease past its max: once [`Lease::expires_at`] reaches
    /// [`Lease::max_expires_at`], a renewal succeeds without moving it, and the credential must be replaced.
    ///
    /// # Examples
    ///
    /// Keeping a credential alive for as long as a worker runs: renew at half the lease, and get a new credential
    /// when the lease has reached its max or can no longer be renewed. ([`RolePool`] does all of this for a pool
    /// of connections.)
    ///
    /// ```no_run
    /// use credbroker::ErrorKind;
    /// use std::time::{Duration, SystemTime};
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let mut creds = broker.creds("worker")?;
    /// # let running = || true;
    /// while running() {
    ///     // Sleep half of what is left of the lease, then renew it by the role's default lease.
    ///     let ends = broker.lease(creds.lease_id()).map_or(SystemTime::now(), |l| l.expires_at());
    ///     let left = ends.duration_since(SystemTime::now()).unwrap_or_default();
    ///     std::thread::sleep(left / 2);
    ///     match broker.renew(creds.lease_id(), None) {
    ///         Ok(lease) if lease.expires_at() < lease.max_expires_at() => {}
    ///         // At its max: this lease ends at `expires_at` whatever we do. Switch to a new credential
    ///         // before then, and give the old one back.
    ///         Ok(_) => {
    ///             let old = std::mem::replace(&mut creds, broker.creds("worker")?);
    ///             broker.revoke(old.lease_id())?;
    ///         }
    ///         // Too late: the lease ended or is being revoked (LeaseExpired), has left the table
    ///         // (UnknownLease), or a failover lost its role (LeaseLost). The credential no longer logs in and
    ///         // cannot be saved; get a new one.
    ///         Err(e)
    ///             if matches!(
    ///                 e.kind(),
    ///                 ErrorKind::LeaseExpired | ErrorKind::UnknownLease | ErrorKind::LeaseLost
    ///             ) =>
    ///         {
    ///             creds = broker.creds("worker")?;
    ///         }
    ///         // The server is unreachable: the lease is unchanged; try again sooner.
    ///         Err(e) if e.kind() == ErrorKind::Connection => std::thread::sleep(Duration::from_secs(1)),
    ///         Err(e) => return Err(e),
    ///     }
    /// }
    /// broker.revoke(creds.lease_id())?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn renew(&self, id: &str, increment: Option<Duration>) -> Result<Lease, Error> {
        off_runtime(|| renew::renew(&self.shared, id, increment))
    }

    /// The lease `id`, if it is in the table (issued, and its role not yet dropped).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::SystemTime;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// # let creds = broker.creds("readonly")?;
    /// match broker.lease(creds.lease_id()) {
    ///     Some(lease) => {
    ///         let left = lease.expires_at().duration_since(SystemTime::now()).unwrap_or_default();
    ///         println!("{} may log in for {} more seconds", lease.username(), left.as_secs());
    ///     }
    ///     None => println!("revoked or expired: request new credentials"),
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn lease(&self, id: &str) -> Option<Lease> {
        self.shared.leases.lease(id)
    }

    /// Every lease in the table, sorted by id.
    ///
    /// # Examples
    ///
    /// Revoking the leases issued more than a day ago, whatever their end:
    ///
    /// ```no_run
    /// use std::time::{Duration, SystemTime};
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let day_ago = SystemTime::now() - Duration::from_secs(24 * 3600);
    /// for lease in broker.leases().iter().filter(|l| l.issued_at() < day_ago) {
    ///     println!("revoking {} ({})", lease.id(), lease.username());
    ///     broker.revoke(lease.id())?;
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn leases(&self) -> Vec<Lease> {
        self.shared.leases.leases()
    }

    /// Leases whose revocation has failed at least once; they stay in the table and are retried with backoff.
    ///
    /// # Examples
    ///
    /// A health check that alerts when a role has resisted being dropped for several attempts (a lock held by a
    /// long migration, objects the owner role may not take, a server that refuses the admin), and leaves the
    /// retrying to the sweeper:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// # fn alert(message: &str) { eprintln!("{message}") }
    /// for lease in broker.failed_leases() {
    ///     if lease.revocation_attempts() >= 5 {
    ///         alert(&format!(
    ///             "credential {} ({}) not dropped after {} attempts: {}",
    ///             lease.username(),
    ///             lease.id(),
    ///             lease.revocation_attempts(),
    ///             lease.last_error().unwrap_or("no error recorded"),
    ///         ));
    ///     }
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn failed_leases(&self) -> Vec<Lease> {
        self.shared.leases.failed_leases()
    }

    /// Counts of what the broker did since it was built (issued, renewed, rotated, revoked, expired, failed
    /// revocations), the live leases per role, and how late the sweeper is. Cheap enough to poll every second:
    /// it copies counters and a map with one entry per role, under the lease table's lock for microseconds.
    ///
    /// # Examples
    ///
    /// A thread that logs the counts once a minute:
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use std::time::Duration;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let broker = Arc::new(broker);
    /// let watched = Arc::clone(&broker);
    /// std::thread::spawn(move || loop {
    ///     std::thread::sleep(Duration::from_secs(60));
    ///     let stats = watched.stats();
    ///     let live: usize = stats.live.values().sum();
    ///     println!(
    ///         "{live} live, {} issued, {} expired, {} failing, sweeper {:?} late",
    ///         stats.issued, stats.expired, stats.failing, stats.sweeper_lag
    ///     );
    /// });
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
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
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::ErrorKind;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let creds = broker.creds("readonly")?;
    /// // ... use the credential ...
    /// match broker.revoke(creds.lease_id()) {
    ///     Ok(()) => {}
    ///     // Revoked by another thread meanwhile, or expired and swept: nothing left to do.
    ///     Err(e) if e.kind() == ErrorKind::UnknownLease => {}
    ///     // The role could not be dropped now (the server is down, a lock is held). The lease stays in the
    ///     // table and the sweeper retries with backoff; its VALID UNTIL still ends the logins at the lease's
    ///     // end. Nothing to retry here: failed_leases() lists it until it is gone.
    ///     Err(e) if e.kind() == ErrorKind::Revocation => eprintln!("revocation deferred: {e}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn revoke(&self, id: &str) -> Result<(), Error> {
        off_runtime(|| revoke::revoke(&self.shared, id, LeaseEnd::Revoked(RevokeCause::Requested)))
    }

    /// A pool of connections for role `name` with the default [`PoolOptions`]: see
    /// [`pool_with`](Broker::pool_with).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let pool = broker.pool("readonly")?; // Clone + Send + Sync: share it with every thread
    /// let mut client = pool.get()?;
    /// let user: String = client.query_one("SELECT current_user::text", &[])?.get(0);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn pool(&self, name: &str) -> Result<RolePool, Error> {
        self.pool_with(name, PoolOptions::new())
    }

    /// A pool of connections for role `name`, always logged in with a valid credential of that role.
    ///
    /// The pool issues one credential now (and logs in once with it, so a role that cannot log in fails here), renews
    /// its lease in the background, and before the lease reaches its max rotates to a new credential: new connections
    /// use the new one, connections of the old one are closed as they are returned (never while checked out), and the
    /// old lease is revoked once none of its connections remain, or at its end. Each connection's `application_name` is
    /// its lease id (see [the pools' reference](crate::guide::reference#pools)). Fails as [`creds`](Broker::creds)
    /// does, with [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) for bad options, and with
    /// [`ErrorKind::Connection`](crate::ErrorKind::Connection) if the credential cannot log in.
    ///
    /// # Examples
    ///
    /// A pool on another database than the admin connection's, whose leases are revoked when it is dropped:
    ///
    /// ```no_run
    /// use credbroker::{PoolOptions, ShutdownMode};
    /// use std::time::Duration;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let options = PoolOptions::new()
    ///     .database("reports")
    ///     .max_size(8)
    ///     .on_drop(ShutdownMode::Revoke { timeout: Duration::from_secs(5) });
    /// let pool = broker.pool_with("reports", options)?;
    /// let mut client = pool.get()?;
    /// let rows = client.query("SELECT id FROM monthly", &[])?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
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
    /// The pool issues one credential now and logs in once with it; renews its lease at half its duration; rotates to a
    /// new credential `rotate_before` ahead of the lease's max, by
    /// [`set_connect_options`](sqlx::Pool::set_connect_options); closes connections of the old credential as they are
    /// returned (never while checked out); and revokes the old lease once PostgreSQL shows none of its sessions left,
    /// or at its end. `application_name` is the lease id; TLS follows the admin connection's settings where sqlx can
    /// honour them, and fails with [`ErrorKind::Tls`](crate::ErrorKind::Tls) where it cannot (sqlx has no channel
    /// binding, and checks certificates against public CAs too: give `sslmode=verify-full`, `disable`, or
    /// `channel_binding=prefer` as an explicit opt-out). `sslrootcert=system` means sqlx's built-in public CAs. A
    /// connection string with several hosts is refused with
    /// [`ErrorKind::InvalidConfig`](crate::ErrorKind::InvalidConfig) (sqlx connects to one host and cannot find the
    /// primary after a failover), as is `PGSSLCERT`/`PGSSLKEY` in the environment (sqlx would present that
    /// certificate). Otherwise fails as [`pool_with`](Broker::pool_with) does. The broker's own database work runs on
    /// tokio's blocking threads, never on a runtime worker.
    ///
    /// # Examples
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
    /// # Examples
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
    ///
    /// # Examples
    ///
    /// Lease ids are `postgresql/creds/<role>/<id>`, so a prefix picks one role's leases (`""` picks all):
    ///
    /// ```no_run
    /// use credbroker::ErrorKind;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// // The nightly batch is done: none of its credentials may outlive it.
    /// match broker.revoke_prefix("postgresql/creds/batch/") {
    ///     Ok(n) => println!("revoked {n} batch credentials"),
    ///     // Some roles could not be dropped: they stay in the table, retried by the sweeper.
    ///     Err(e) if e.kind() == ErrorKind::Revocation => {
    ///         eprintln!("{e}");
    ///         for lease in broker.failed_leases() {
    ///             eprintln!("  {}: {}", lease.id(), lease.last_error().unwrap_or_default());
    ///         }
    ///     }
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn revoke_prefix(&self, prefix: &str) -> Result<usize, Error> {
        off_runtime(|| revoke::revoke_prefix(&self.shared, prefix))
    }

    /// Revokes lease `id`, and if its role cannot be dropped, forgets the lease anyway: it leaves the table, the
    /// reason is logged at warn level, and the role loses the marker (so recovery and orphan sweeps leave it
    /// alone too). The role stays `NOLOGIN` if revocation got that far, for an operator to drop by hand. For a
    /// role that an operator has taken out of the broker's hands, or a revocation that can never succeed.
    ///
    /// Fails with [`ErrorKind::UnknownLease`](crate::ErrorKind::UnknownLease), or with
    /// [`ErrorKind::Revocation`](crate::ErrorKind::Revocation) if another revocation of the lease is still running
    /// after the bound on one operation (`connect_timeout` plus four statement timeouts).
    ///
    /// # Examples
    ///
    /// Giving up on the leases whose role has resisted 20 attempts, and telling an operator which roles to drop:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// for lease in broker.failed_leases().iter().filter(|l| l.revocation_attempts() >= 20) {
    ///     eprintln!(
    ///         "forgetting lease {}: drop role {:?} by hand ({})",
    ///         lease.id(),
    ///         lease.username(),
    ///         lease.last_error().unwrap_or_default()
    ///     );
    ///     broker.revoke_force(lease.id())?;
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn revoke_force(&self, id: &str) -> Result<(), Error> {
        off_runtime(|| revoke::revoke_force(&self.shared, id))
    }

    /// Stops the broker: stops and joins the sweeper, then keeps or revokes the leases still in the table as `mode`
    /// says. With [`ShutdownMode::Revoke`], fails with [`ErrorKind::Revocation`](crate::ErrorKind::Revocation) if some
    /// leases could not be revoked within the timeout (their roles stay fenced by `VALID UNTIL`, for the next start or
    /// another instance to drop).
    ///
    /// # Examples
    ///
    /// A service being taken down for good revokes everything it issued, and reports what it could not:
    ///
    /// ```no_run
    /// use credbroker::{ErrorKind, ShutdownMode};
    /// use std::time::Duration;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// match broker.shutdown(ShutdownMode::Revoke { timeout: Duration::from_secs(30) }) {
    ///     Ok(()) => {}
    ///     // Fenced by VALID UNTIL; the next start of this instance, or another instance, drops them.
    ///     Err(e) if e.kind() == ErrorKind::Revocation => eprintln!("{e}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    ///
    /// A restart that the next run adopts keeps them instead (the same as dropping the broker with the default
    /// [`shutdown_mode`](crate::BrokerBuilder::shutdown_mode)):
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// broker.shutdown(credbroker::ShutdownMode::Keep)?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
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
