//! The application side: [`RolePool`], an r2d2 pool of connections that log in with a credential the pool
//! holds, renews and rotates (see `rotation` for when and how).
//!
//! Every connection belongs to one *generation*: the credential current when it was opened. Rotation makes a
//! new generation current and retires the old one. From then on a retired connection is never handed out again:
//! r2d2 asks [`LeaseManager::is_valid`] at checkout and [`LeaseManager::has_broken`] at return, and both say
//! "retired", so the connection is closed then, and never while checked out. Each generation counts its
//! connections (logins in progress included), and the rotation thread revokes a retired generation's lease
//! once its count reaches zero.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::connection::channel_binding_refusal;
use crate::credential::Credential;
use crate::error::{describe, Error, ErrorKind};
use crate::events::RevokeCause;
use crate::lease::Lease;
use crate::leases::LeaseEnd;
use crate::rotation::{self, Rotating, Wake};
use crate::runtime::{off_runtime, OffRuntime};
use crate::shared::Shared;
use crate::shutdown::ShutdownMode;

/// PostgreSQL keeps the first 63 bytes of `application_name` (NAMEDATALEN - 1).
const MAX_APPLICATION_NAME: usize = 63;

/// A connection idle for longer than this is checked with an empty query before it is handed out; one used more
/// recently is handed out as is (HikariCP's `aliveBypassWindowMs` is the same idea, at 500 ms).
const TRUST_IDLE_FOR: Duration = Duration::from_millis(500);

/// Options of a [`RolePool`]: see [`Broker::pool_with`](crate::Broker::pool_with).
///
/// | option | default |
/// |---|---|
/// | [`max_size`](PoolOptions::max_size) | 10 connections |
/// | [`min_idle`](PoolOptions::min_idle) | 1 connection |
/// | [`database`](PoolOptions::database) | the admin connection's database |
/// | [`connection_timeout`](PoolOptions::connection_timeout) | 30 seconds |
/// | [`rotate_before`](PoolOptions::rotate_before) | a third of the role's max lease, at most 1 hour |
/// | [`on_drop`](PoolOptions::on_drop) | the broker's [`shutdown_mode`](crate::BrokerBuilder::shutdown_mode) |
///
/// The same options serve [`Broker::sqlx_pool`](crate::Broker::sqlx_pool) and
/// [`Broker::deadpool`](crate::Broker::deadpool) (features `sqlx` and `deadpool`).
///
/// # Examples
///
/// A pool of up to 20 connections to database `orders`, which waits at most 5 seconds for a connection:
///
/// ```no_run
/// use credbroker::PoolOptions;
/// use std::time::Duration;
///
/// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
/// let options = PoolOptions::new()
///     .max_size(20)
///     .min_idle(2)
///     .database("orders")
///     .connection_timeout(Duration::from_secs(5));
/// let pool = broker.pool_with("orders_rw", options)?;
/// # Ok::<(), credbroker::Error>(())
/// ```
#[derive(Debug, Clone)]
#[must_use = "PoolOptions are built by value: each setter returns the changed options"]
pub struct PoolOptions {
    pub(crate) max_size: u32,
    pub(crate) min_idle: u32,
    pub(crate) database: Option<String>,
    pub(crate) connection_timeout: Duration,
    rotate_before: Option<Duration>,
    pub(crate) on_drop: Option<ShutdownMode>,
}

impl Default for PoolOptions {
    fn default() -> PoolOptions {
        PoolOptions {
            max_size: 10,
            min_idle: 1,
            database: None,
            connection_timeout: Duration::from_secs(30),
            rotate_before: None,
            on_drop: None,
        }
    }
}

impl PoolOptions {
    /// The defaults listed on [`PoolOptions`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::PoolOptions;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// // The same as broker.pool("readonly"):
    /// let pool = broker.pool_with("readonly", PoolOptions::new())?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn new() -> PoolOptions {
        PoolOptions::default()
    }

    /// Most connections open at once (at least 1).
    ///
    /// # Examples
    ///
    /// ```
    /// let options = credbroker::PoolOptions::new().max_size(32);
    /// ```
    pub fn max_size(mut self, size: u32) -> PoolOptions {
        self.max_size = size;
        self
    }

    /// How many idle connections the pool keeps open, ready for use (at most `max_size`). After a rotation they
    /// are opened again with the new credential.
    ///
    /// # Examples
    ///
    /// A pool for a rarely used admin page, which opens connections only when asked:
    ///
    /// ```
    /// let options = credbroker::PoolOptions::new().max_size(2).min_idle(0);
    /// ```
    pub fn min_idle(mut self, idle: u32) -> PoolOptions {
        self.min_idle = idle;
        self
    }

    /// The database the connections use.
    ///
    /// # Examples
    ///
    /// One broker (its admin connection to database `postgres`), pools on two application databases:
    ///
    /// ```no_run
    /// use credbroker::PoolOptions;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let orders = broker.pool_with("app", PoolOptions::new().database("orders"))?;
    /// let billing = broker.pool_with("app", PoolOptions::new().database("billing"))?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn database(mut self, database: impl Into<String>) -> PoolOptions {
        self.database = Some(database.into());
        self
    }

    /// How long [`RolePool::get`] waits for a connection before failing (more than zero, at most 1 hour).
    ///
    /// # Examples
    ///
    /// A web handler that would rather fail fast than queue:
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let options = credbroker::PoolOptions::new().connection_timeout(Duration::from_millis(500));
    /// ```
    pub fn connection_timeout(mut self, timeout: Duration) -> PoolOptions {
        self.connection_timeout = timeout;
        self
    }

    /// How long before its lease's max the pool rotates to a new credential. This is also how long a connection
    /// checked out just before a rotation may stay checked out: at the old lease's max its role is dropped and
    /// its sessions are ended. At least 1 second, and less than the role's max lease.
    ///
    /// # Examples
    ///
    /// A pool whose connections may be checked out for up to 2 hours (a long report) before a rotation ends
    /// them; the role's max lease must be longer than that:
    ///
    /// ```no_run
    /// use credbroker::{PoolOptions, Role};
    /// use std::time::Duration;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let hour = Duration::from_secs(3600);
    /// broker.write_role("reports", Role::new().lease(hour, 12 * hour))?;
    /// let pool = broker.pool_with("reports", PoolOptions::new().rotate_before(2 * hour))?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn rotate_before(mut self, before: Duration) -> PoolOptions {
        self.rotate_before = Some(before);
        self
    }

    /// What dropping the last handle of the pool does with its leases: [`ShutdownMode::Revoke`] revokes them
    /// (ending connections still checked out), [`ShutdownMode::Keep`] leaves them to expire (the sweeper then
    /// drops their roles). The timeout of `Revoke` is not used: the pool's few leases are revoked at once.
    ///
    /// # Examples
    ///
    /// A pool whose credentials are gone the moment the pool is:
    ///
    /// ```
    /// use credbroker::{PoolOptions, ShutdownMode};
    /// use std::time::Duration;
    ///
    /// let options = PoolOptions::new().on_drop(ShutdownMode::Revoke { timeout: Duration::ZERO });
    /// ```
    pub fn on_drop(mut self, mode: ShutdownMode) -> PoolOptions {
        self.on_drop = Some(mode);
        self
    }

    pub(crate) fn check(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::new(ErrorKind::InvalidConfig, msg));
        if self.max_size == 0 {
            return bad("pool max_size is 0; give at least 1 connection".into());
        }
        if self.min_idle > self.max_size {
            return bad(format!(
                "pool min_idle {} is more than max_size {}; lower min_idle or raise max_size",
                self.min_idle, self.max_size
            ));
        }
        crate::error::check_duration(
            "pool connection_timeout",
            self.connection_timeout,
            Duration::from_millis(1),
            Duration::from_secs(3600),
            "Duration::from_secs(30)",
        )?;
        if let Some(db) = &self.database {
            if db.is_empty() || db.len() > 63 || db.contains('\0') {
                return bad(format!(
                    "pool database {db:?} must be 1–63 bytes long (PostgreSQL's limit for names), without NUL"
                ));
            }
        }
        Ok(())
    }

    /// Checks the options against role `role`'s definition and returns how long before the max lease to rotate.
    pub(crate) fn checked_rotate_before(
        &self,
        shared: &Shared,
        role: &str,
    ) -> Result<Duration, Error> {
        self.check()?;
        let definition = shared
            .current_role(role)
            .ok_or_else(|| crate::shared::unknown_role(role))?;
        // Make before break: a rotating pool holds its old lease and its new one at once.
        if let Some(cap) = definition.role.get_max_leases().filter(|cap| *cap < 2) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "role {role:?} has max_leases({cap}), and a pool needs 2 leases of its role while it rotates \
                     (the new credential is issued before the old one is revoked); raise the role's cap to at \
                     least 2"
                ),
            ));
        }
        let max = definition.policy.max;
        let rotate_before = self
            .rotate_before
            .unwrap_or_else(|| (max / 3).min(Duration::from_secs(3600)));
        if rotate_before < Duration::from_secs(1) || rotate_before >= max {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "pool rotate_before {rotate_before:?} must be at least 1 second and less than role {role:?}'s \
                     max lease ({max:?}); give a shorter time or a longer max lease"
                ),
            ));
        }
        Ok(rotate_before)
    }
}

/// The login settings of a client library, given a credential: `postgres::Config` for [`RolePool`],
/// `tokio_postgres::Config` for the deadpool pool.
pub(crate) trait Login: Clone + Send + Sync + 'static {
    /// `self` (the admin connection's host, port, TLS and database, without its user and password) with the
    /// credential's user and password, `application_name` set to its lease id, and `database` if given.
    fn for_credential(&self, credential: &Credential, database: Option<&str>) -> Self;
}

/// The same for the sync and the async client, whose configs have the same setters.
macro_rules! login_for_config {
    ($config:ty) => {
        impl Login for $config {
            fn for_credential(&self, credential: &Credential, database: Option<&str>) -> Self {
                let mut config = self.clone();
                config
                    .user(credential.username())
                    .password(credential.password())
                    .application_name(application_name(credential.lease_id()));
                if let Some(db) = database {
                    config.dbname(db);
                }
                config
            }
        }
    };
}

login_for_config!(postgres::Config);
#[cfg(feature = "deadpool")]
login_for_config!(tokio_postgres::Config);

/// One credential of a pool and the connections logged in with it.
pub(crate) struct Generation<C = postgres::Config> {
    pub(crate) lease_id: String,
    pub(crate) username: String,
    /// How long the credential was issued for: renewals add this much.
    pub(crate) lease_duration: Duration,
    /// The connection settings, with the credential's user, password and `application_name`. `postgres::Config`
    /// keeps the password in a buffer it frees without wiping (see docs/operations.md, "Secrets" › "In memory").
    pub(crate) config: C,
    /// Open connections, counted from the moment a login starts.
    connections: AtomicUsize,
    retired: AtomicBool,
}

impl<C: Login> Generation<C> {
    pub(crate) fn new(credential: &Credential, base: &C, database: Option<&str>) -> Generation<C> {
        Generation {
            lease_id: credential.lease_id().to_owned(),
            username: credential.username().to_owned(),
            lease_duration: credential.lease_duration(),
            config: base.for_credential(credential, database),
            connections: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
        }
    }
}

impl<C> Generation<C> {
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

impl<C> fmt::Debug for Generation<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generation")
            .field("lease_id", &self.lease_id)
            .field("username", &self.username)
            .field("connections", &self.connections())
            .field("retired", &self.is_retired())
            .finish_non_exhaustive()
    }
}

/// `application_name` for lease `id`: the id itself, or its last 63 bytes when longer, which keep its random
/// part whole (the start, `postgresql/creds/`, is the same for every lease).
pub(crate) fn application_name(id: &str) -> &str {
    let mut start = id.len().saturating_sub(MAX_APPLICATION_NAME);
    while !id.is_char_boundary(start) {
        start += 1;
    }
    &id[start..]
}

/// What a pool's connections, its rotation thread and its handle share, for pools that count their connections
/// themselves ([`RolePool`], deadpool): the current generation and the retired ones not yet revoked.
pub(crate) struct Generations<C = postgres::Config> {
    pub(crate) role: String,
    base: C,
    database: Option<String>,
    current: RwLock<Arc<Generation<C>>>,
    /// Generations rotated away from whose leases are not yet revoked.
    pub(crate) retired: Mutex<Vec<Arc<Generation<C>>>>,
    pub(crate) wake: Wake,
}

impl<C: Login> Generations<C> {
    pub(crate) fn new(
        role: &str,
        base: C,
        database: Option<String>,
        first: Generation<C>,
    ) -> Generations<C> {
        Generations {
            role: role.to_owned(),
            base,
            database,
            current: RwLock::new(Arc::new(first)),
            retired: Mutex::new(Vec::new()),
            wake: Wake::default(),
        }
    }

    pub(crate) fn current(&self) -> Arc<Generation<C>> {
        self.current.read().clone()
    }

    /// The current generation, with one more connection counted: call before a login, under the read lock, so
    /// that rotation never revokes a lease that a login in progress is using. [`Generations::release`] undoes it.
    pub(crate) fn count_login(&self) -> Arc<Generation<C>> {
        let current = self.current.read();
        current.connections.fetch_add(1, Ordering::AcqRel);
        current.clone()
    }

    /// Uncounts a connection of `generation` (closed, or a login that failed); the last one of a retired
    /// generation wakes the rotation thread to revoke its lease.
    pub(crate) fn release(&self, generation: &Generation<C>) {
        if generation.connections.fetch_sub(1, Ordering::AcqRel) == 1 && generation.is_retired() {
            self.wake.poke();
        }
    }

    /// Makes a new credential current and returns the lease id and username of the one it replaces, now retired.
    pub(crate) fn rotate(&self, credential: Credential) -> (String, String) {
        let new = Arc::new(Generation::new(
            &credential,
            &self.base,
            self.database.as_deref(),
        ));
        let old = std::mem::replace(&mut *self.current.write(), new);
        // Logins that took the old generation did so under the read lock: all are counted by now.
        old.retired.store(true, Ordering::Release);
        self.retired.lock().push(old.clone());
        (old.lease_id.clone(), old.username.clone())
    }

    /// Takes the retired generations whose last connection has closed out of the list; returns their lease ids.
    pub(crate) fn take_drained(&self) -> Vec<String> {
        let mut retired = self.retired.lock();
        let (drained, busy): (Vec<_>, Vec<_>) =
            retired.drain(..).partition(|g| g.connections() == 0);
        *retired = busy;
        drained.into_iter().map(|g| g.lease_id.clone()).collect()
    }

    /// The lease ids of every generation, retired ones first, for closing the pool.
    pub(crate) fn all_leases(&self) -> Vec<String> {
        let mut leases: Vec<String> = self
            .retired
            .lock()
            .drain(..)
            .map(|g| g.lease_id.clone())
            .collect();
        leases.push(self.current().lease_id.clone());
        leases
    }
}

/// What dropping the last handle of a pool does with its leases, as [`PoolOptions::on_drop`] says.
pub(crate) fn close_leases(shared: &Shared, role: &str, leases: &[String], mode: ShutdownMode) {
    match mode {
        ShutdownMode::Keep => log::info!(
            "closed pool of role {role}; kept lease(s) {}: they are no longer renewed, and expire",
            leases.join(", ")
        ),
        ShutdownMode::Revoke { .. } => {
            for id in leases {
                rotation::revoke(shared, role, id, RevokeCause::PoolClosed);
            }
        }
    }
}

/// How a pool that counts its connections closes its idle connections of retired credentials.
pub(crate) trait CloseIdle: Send + Sync + 'static {
    /// Closes the idle connections of retired credentials now, rather than when they are next checked out.
    fn close_idle(&self);
    /// Whether the pool is gone (for pools the rotation thread does not keep alive).
    fn is_closed(&self) -> bool {
        false
    }
}

/// A pool that counts its connections ([`RolePool`], deadpool), as its rotation thread sees it.
pub(crate) struct Counted<C, P> {
    pub(crate) generations: Arc<Generations<C>>,
    pub(crate) pool: P,
}

impl<C: Login, P: CloseIdle> Rotating for Counted<C, P> {
    fn role(&self) -> &str {
        &self.generations.role
    }

    fn current_lease(&self) -> (String, Duration) {
        let current = self.generations.current();
        (current.lease_id.clone(), current.lease_duration)
    }

    fn rotate(&self, credential: Credential) -> (String, String) {
        self.generations.rotate(credential)
    }

    fn close_idle(&self) {
        self.pool.close_idle();
    }

    fn take_drained(&self, _: &Shared) -> Vec<String> {
        self.generations.take_drained()
    }

    fn wake(&self) -> &Wake {
        &self.generations.wake
    }

    fn is_closed(&self) -> bool {
        self.pool.is_closed()
    }
}

impl CloseIdle for r2d2::Pool<LeaseManager> {
    /// Checks out every idle connection (r2d2 closes the retired ones as it goes) and returns the rest at once.
    fn close_idle(&self) {
        let idle = self.state().idle_connections;
        let held: Vec<_> = (0..idle).map_while(|_| self.try_get()).collect();
        drop(held);
    }
}

/// The r2d2 connection manager: logs in with the pool's current credential.
pub(crate) struct LeaseManager {
    generations: Arc<Generations>,
    tls: MakeRustlsConnect,
}

/// A pooled connection and the generation it belongs to.
pub(crate) struct LeaseConnection {
    /// Closed off any tokio runtime: a `PooledClient` of a retired generation may be returned on one.
    client: OffRuntime<Client>,
    generation: Arc<Generation>,
    generations: Arc<Generations>,
    /// When it was last returned to the pool (or opened).
    returned: Instant,
}

impl Drop for LeaseConnection {
    fn drop(&mut self) {
        self.generations.release(&self.generation);
    }
}

/// Why r2d2 let go of a connection or could not open one: [`PoolErrors`] tells the routine from the failures by
/// kind, not by message.
#[derive(Debug)]
pub(crate) enum ManagerError {
    /// A connection of a credential a rotation retired, closed as planned.
    Retired(Error),
    /// A login or a health check that failed.
    Failed(Error),
}

impl fmt::Display for ManagerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManagerError::Retired(e) | ManagerError::Failed(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ManagerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ManagerError::Retired(e) | ManagerError::Failed(e) => e.source(),
        }
    }
}

impl r2d2::ManageConnection for LeaseManager {
    type Connection = LeaseConnection;
    type Error = ManagerError;

    fn connect(&self) -> Result<LeaseConnection, ManagerError> {
        let generation = self.generations.count_login();
        match generation.config.connect(self.tls.clone()) {
            Ok(client) => Ok(LeaseConnection {
                client: OffRuntime::new(client),
                generation,
                generations: self.generations.clone(),
                returned: Instant::now(),
            }),
            Err(e) => {
                self.generations.release(&generation);
                Err(ManagerError::Failed(login_failed(
                    &self.generations.role,
                    &generation.lease_id,
                    &generation.username,
                    e,
                )))
            }
        }
    }

    fn is_valid(&self, conn: &mut LeaseConnection) -> Result<(), ManagerError> {
        if conn.generation.is_retired() {
            return Err(ManagerError::Retired(Error::new(
                ErrorKind::Connection,
                format!(
                    "connection of lease {} retired by a rotation; closing it",
                    conn.generation.lease_id
                ),
            )));
        }
        if conn.returned.elapsed() > TRUST_IDLE_FOR {
            conn.client.simple_query("").map_err(|e| {
                ManagerError::Failed(Error::new(
                    ErrorKind::Connection,
                    format!(
                        "idle connection of lease {} is broken ({}); opening another",
                        conn.generation.lease_id,
                        describe(&e)
                    ),
                ))
            })?;
        }
        Ok(())
    }

    fn has_broken(&self, conn: &mut LeaseConnection) -> bool {
        conn.returned = Instant::now();
        conn.generation.is_retired() || conn.client.is_closed()
    }
}

/// A pool's failed login as user `username` of lease `lease_id`, with PostgreSQL's reason and what to check.
pub(crate) fn login_failed(
    role: &str,
    lease_id: &str,
    username: &str,
    e: postgres::Error,
) -> Error {
    if let Some(why) = channel_binding_refusal(&e) {
        return Error::new(
            ErrorKind::Tls,
            format!(
                "pool of role {role:?} refused to log in as {username} (lease {lease_id}): {why}"
            ),
        );
    }
    login_refused(role, lease_id, username, &describe(&e))
}

/// A pool's failed login, PostgreSQL's reason being `why`.
pub(crate) fn login_refused(role: &str, lease_id: &str, username: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::Connection,
        format!(
            "pool of role {role:?} could not log in as {username} (lease {lease_id}): {why}; check that the \
             role's creation SQL grants LOGIN and that pg_hba.conf lets it connect to this database"
        ),
    )
}

/// r2d2 reports failed checks and logins here; a retired connection is routine, not an error.
#[derive(Debug)]
struct PoolErrors;

impl r2d2::HandleError<ManagerError> for PoolErrors {
    fn handle_error(&self, error: ManagerError) {
        match error {
            ManagerError::Retired(e) => log::debug!("{e}"),
            ManagerError::Failed(e) => log::warn!("{e}"),
        }
    }
}

/// A pool of PostgreSQL connections for one broker role, always logged in with a valid credential: see
/// [`Broker::pool`](crate::Broker::pool).
///
/// Cloning is cheap and gives another handle to the same pool; it is `Send + Sync`. The pool holds one lease at a
/// time (two for a moment around a rotation), renews it in the background, and rotates to a new credential
/// before the lease reaches its max, without ever closing a connection that is checked out. Dropping the last
/// handle stops the renewals and, as [`PoolOptions::on_drop`] says, revokes or keeps the leases.
///
/// # Examples
///
/// Share the pool with worker threads, query through it, and watch its lease and its connections:
///
/// ```no_run
/// use std::time::SystemTime;
///
/// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
/// let pool = broker.pool("readonly")?;
/// let workers: Vec<_> = (0..4i64)
///     .map(|i| {
///         let pool = pool.clone();
///         std::thread::spawn(move || -> Result<i64, Box<dyn std::error::Error + Send + Sync>> {
///             let mut client = pool.get()?;
///             Ok(client.query_one("SELECT $1::int8 * 2", &[&i])?.get(0))
///         })
///     })
///     .collect();
/// for worker in workers {
///     println!("{:?}", worker.join().unwrap());
/// }
///
/// if let Some(lease) = pool.lease() {
///     let left = lease.expires_at().duration_since(SystemTime::now()).unwrap_or_default();
///     println!("pool of {} logs in as {}, renewed in the background; {left:?} left", pool.role(), lease.username());
/// }
/// let (open, idle) = pool.connections();
/// println!("{open} connections open, {idle} idle");
/// # Ok::<(), credbroker::Error>(())
/// ```
#[derive(Clone)]
pub struct RolePool {
    handle: Arc<PoolHandle>,
}

struct PoolHandle {
    pool: OffRuntime<r2d2::Pool<LeaseManager>>,
    generations: Arc<Generations>,
    shared: Arc<Shared>,
    rotation: Mutex<Option<JoinHandle<()>>>,
    on_drop: ShutdownMode,
}

impl RolePool {
    pub(crate) fn open(
        shared: &Arc<Shared>,
        role: &str,
        options: PoolOptions,
        broker_shutdown: ShutdownMode,
    ) -> Result<RolePool, Error> {
        let rotate_before = options.checked_rotate_before(shared, role)?;
        let credential = crate::issue::creds(shared, role)?;
        // The admin's host, port, database and TLS settings, without the admin's password (the clone's copy is
        // replaced at once, freed unwiped like every copy inside postgres::Config).
        let mut base = shared.revoke_settings.connection.config.clone();
        base.password("");
        let tls = shared.revoke_settings.connection.tls.clone();
        let generation = Generation::new(&credential, &base, options.database.as_deref());

        // One login now, so that a role that cannot log in fails here with PostgreSQL's reason, not at the
        // first get() with a timeout.
        if let Err(e) = generation.config.connect(tls.clone()) {
            let err = login_failed(role, &generation.lease_id, &generation.username, e);
            if let Err(revoke) = crate::revoke::revoke(
                shared,
                &generation.lease_id,
                LeaseEnd::Revoked(RevokeCause::PoolClosed),
            ) {
                log::warn!("{revoke}");
            }
            return Err(err);
        }
        let generations = Arc::new(Generations::new(role, base, options.database, generation));
        let pool = r2d2::Pool::builder()
            .max_size(options.max_size)
            .min_idle(Some(options.min_idle))
            .connection_timeout(options.connection_timeout)
            .test_on_check_out(true)
            .error_handler(Box::new(PoolErrors))
            .build_unchecked(LeaseManager {
                generations: generations.clone(),
                tls,
            });
        let rotating = Counted {
            generations: generations.clone(),
            pool: pool.clone(),
        };
        let rotation = rotation::spawn(shared, rotating, rotate_before, |_, _| {})?;
        log::info!(
            "opened pool of role {role} (max {} connections) with lease {}; rotating {rotate_before:?} before \
             the max lease",
            options.max_size,
            generations.current().lease_id
        );
        Ok(RolePool {
            handle: Arc::new(PoolHandle {
                pool: OffRuntime::new(pool),
                generations,
                shared: shared.clone(),
                rotation: Mutex::new(Some(rotation)),
                on_drop: options.on_drop.unwrap_or(broker_shutdown),
            }),
        })
    }

    /// A connection, waiting up to the pool's connection timeout for one to be free or opened. It returns to
    /// the pool when dropped. Fails with [`ErrorKind::Connection`] if none could be had in time (the error
    /// says why the last login failed), or [`ErrorKind::ShutDown`] if that happened after the broker shut down.
    ///
    /// Inside a tokio runtime it works too, blocking the calling worker thread while it waits; but the
    /// [`postgres::Client`] it hands out blocks on every query, and the `postgres` crate panics when a query
    /// runs on a runtime's worker thread: use it inside `tokio::task::spawn_blocking`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::ErrorKind;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// # let pool = broker.pool("readonly")?;
    /// match pool.get() {
    ///     Ok(mut client) => {
    ///         let rows = client.query("SELECT id, name FROM customers WHERE active", &[])?;
    ///         println!("{} active customers", rows.len());
    ///     } // the connection goes back to the pool here
    ///     // The server is down, or every connection is busy: answer "try again later".
    ///     Err(e) if e.kind() == ErrorKind::Connection => eprintln!("{e}"),
    ///     Err(e) => return Err(e.into()),
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn get(&self) -> Result<PooledClient, Error> {
        off_runtime(|| self.get_here())
    }

    fn get_here(&self) -> Result<PooledClient, Error> {
        let pool = &self.handle.pool;
        pool.get()
            .map(|conn| PooledClient { conn })
            .map_err(|e| {
                if self.handle.shared.leases.is_shut_down() {
                    return Error::new(
                        ErrorKind::ShutDown,
                        format!(
                            "no connection in the pool of role {:?}: its broker has shut down, so the pool no longer \
                             renews or rotates its credential ({e}); keep the Broker alive as long as its pools",
                            self.handle.generations.role
                        ),
                    );
                }
                Error::new(
                    ErrorKind::Connection,
                    format!(
                        "no connection in the pool of role {:?} within {:?}: {e}; check that the server is up, or \
                         raise max_size",
                        self.handle.generations.role,
                        pool.connection_timeout()
                    ),
                )
            })
    }

    /// The broker role this pool's credentials are issued for.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let pool = broker.pool("readonly")?;
    /// assert_eq!(pool.role(), "readonly");
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn role(&self) -> &str {
        &self.handle.generations.role
    }

    /// The lease new connections log in with.
    ///
    /// # Examples
    ///
    /// The id changes when the pool rotates to a new credential:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let pool = broker.pool("readonly")?;
    /// let before = pool.lease_id();
    /// // ... later ...
    /// if pool.lease_id() != before {
    ///     println!("the pool has rotated away from {before}");
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn lease_id(&self) -> String {
        self.handle.generations.current().lease_id.clone()
    }

    /// The lease new connections log in with, as the broker's lease table holds it (`None` if it has just been
    /// revoked or has expired, and the pool is about to rotate).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let pool = broker.pool("readonly")?;
    /// if let Some(lease) = pool.lease() {
    ///     println!(
    ///         "{} valid until {}, rotated before {}",
    ///         lease.username(),
    ///         humantime::format_rfc3339_seconds(lease.expires_at()),
    ///         humantime::format_rfc3339_seconds(lease.max_expires_at()),
    ///     );
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn lease(&self) -> Option<Lease> {
        self.handle.shared.leases.lease(&self.lease_id())
    }

    /// Open connections and idle connections, as r2d2 counts them.
    ///
    /// # Examples
    ///
    /// A gauge for a dashboard:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let pool = broker.pool("readonly")?;
    /// let (open, idle) = pool.connections();
    /// println!("readonly pool: {} in use, {idle} idle", open - idle);
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn connections(&self) -> (u32, u32) {
        let state = self.handle.pool.state();
        (state.connections, state.idle_connections)
    }
}

impl fmt::Debug for RolePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RolePool")
            .field("role", &self.role())
            .field("current", &*self.handle.generations.current())
            .field("retired", &*self.handle.generations.retired.lock())
            .finish()
    }
}

impl Drop for PoolHandle {
    fn drop(&mut self) {
        if let Err(e) = off_runtime(|| {
            self.close();
            Ok(())
        }) {
            log::error!(
                "pool of role {}: {e}; its leases are left to expire",
                self.generations.role
            );
        }
    }
}

impl PoolHandle {
    /// Stops the rotation thread and keeps or revokes the pool's leases.
    fn close(&self) {
        self.generations.wake.stop();
        if let Some(thread) = self.rotation.lock().take() {
            if thread.join().is_err() {
                log::error!(
                    "the rotation thread of pool {} panicked",
                    self.generations.role
                );
            }
        }
        let leases = self.generations.all_leases();
        close_leases(&self.shared, &self.generations.role, &leases, self.on_drop);
    }
}

/// A connection checked out of a [`RolePool`]; use it as a [`postgres::Client`]. Dropping it returns it to the
/// pool (or closes it, if the pool has rotated to a new credential meanwhile).
///
/// # Examples
///
/// ```no_run
/// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
/// # let pool = broker.pool("readonly")?;
/// let mut client = pool.get()?;
/// // Every postgres::Client method, through DerefMut:
/// let mut tx = client.transaction()?;
/// tx.execute("UPDATE jobs SET state = 'done' WHERE id = $1", &[&42i64])?;
/// tx.commit()?;
/// println!("as {} under lease {}", client.username(), client.lease_id());
/// drop(client); // back to the pool
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct PooledClient {
    conn: r2d2::PooledConnection<LeaseManager>,
}

impl PooledClient {
    /// The lease this connection logged in with (its `application_name` is this id, or its last 63 bytes).
    ///
    /// # Examples
    ///
    /// Tagging a slow query in the application's log with the lease to look for in `pg_stat_activity`:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// # let pool = broker.pool("readonly")?;
    /// let mut client = pool.get()?;
    /// let started = std::time::Instant::now();
    /// client.batch_execute("REFRESH MATERIALIZED VIEW daily_totals")?;
    /// println!("refresh took {:?} (application_name {})", started.elapsed(), client.lease_id());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn lease_id(&self) -> &str {
        &self.conn.generation.lease_id
    }

    /// The PostgreSQL user this connection logged in as.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// # let pool = broker.pool("readonly")?;
    /// let mut client = pool.get()?;
    /// let session_user: String = client.query_one("SELECT session_user::text", &[])?.get(0);
    /// assert_eq!(session_user, client.username());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn username(&self) -> &str {
        &self.conn.generation.username
    }

    /// Whether the pool has rotated away from this connection's credential: it is closed when returned.
    ///
    /// # Examples
    ///
    /// A worker that holds a connection for a long time and gives it back once it is retired, before the old
    /// lease reaches its max and its sessions are ended:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// # let pool = broker.pool("readonly")?;
    /// let mut client = pool.get()?;
    /// loop {
    ///     client.batch_execute("SELECT pg_sleep(1)")?; // a unit of work
    ///     if client.is_retired() {
    ///         client = pool.get()?; // the old connection is closed, the new one uses the new credential
    ///     }
    /// #   break;
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn is_retired(&self) -> bool {
        self.conn.generation.is_retired()
    }

    #[cfg(feature = "testing")]
    pub(crate) fn password(&self) -> String {
        let password = self
            .conn
            .generation
            .config
            .get_password()
            .unwrap_or_default();
        String::from_utf8_lossy(password).into_owned()
    }
}

impl Deref for PooledClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.conn.client
    }
}

impl DerefMut for PooledClient {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.conn.client
    }
}

impl fmt::Debug for PooledClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledClient")
            .field("lease_id", &self.lease_id())
            .field("username", &self.username())
            .field("retired", &self.is_retired())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_name_is_the_lease_id_or_its_end() {
        let short = "postgresql/creds/readonly/0123abcd-0000-0000-0000-0123456789ab";
        assert_eq!(application_name(short), short);
        let long = "postgresql/creds/a_role_name_of_thirty_two_chars_/0123abcd-0000-0000-0000-0123456789ab";
        let name = application_name(long);
        assert_eq!(name.len(), 63);
        assert!(long.ends_with(name));
        assert!(name.ends_with("/0123abcd-0000-0000-0000-0123456789ab"));
    }

    #[test]
    fn options_are_checked() {
        assert!(PoolOptions::new().check().is_ok());
        for bad in [
            PoolOptions::new().max_size(0),
            PoolOptions::new().max_size(2).min_idle(3),
            PoolOptions::new().connection_timeout(Duration::ZERO),
            PoolOptions::new().database(""),
            PoolOptions::new().database("x".repeat(64)),
        ] {
            assert_eq!(bad.check().unwrap_err().kind(), ErrorKind::InvalidConfig);
        }
    }

    #[test]
    fn pool_types_are_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<RolePool>();
    }
}
