//! [`SqlxPool`] (feature `sqlx`): a sqlx [`PgPool`] whose connect options always carry a valid credential.
//!
//! The pool is a plain `PgPool`; the broker renews and rotates its credential from the pool's rotation thread
//! (`rotation`, shared with [`RolePool`](crate::RolePool)) and steers it with sqlx's own seams:
//! [`Pool::set_connect_options`](sqlx::Pool::set_connect_options) makes new connections log in with the new
//! credential, and the `before_acquire` / `after_release` hooks close connections of a retired one instead of
//! handing them out or keeping them, so none is closed while checked out.
//!
//! sqlx tells its hooks nothing about a connection but its age, so a connection's credential is known by when it
//! was opened: each credential has an instant from which connections are its own, and older ones are of earlier
//! credentials. A rotation makes the new credential current at that instant, under a lock, and new logins use
//! it; a login that started before, with the old credential, and finished after is refused by `after_connect`
//! (one `SELECT session_user` per new connection) and opened again with the new one. One race remains: sqlx
//! time-stamps a connection just *after* `after_connect` accepts it, so a connection of the old credential
//! accepted just before a rotation could be stamped just after it. So a rotation that comes within [`SETTLE`] of
//! the old credential's last accepted connection starts the new one's connections `SETTLE` after that
//! acceptance (never before the old credential's own start), and `after_connect` holds new connections back
//! until then; any other rotation (nearly all: connections are opened right after a rotation, not just before
//! one) holds nothing back.
//!
//! sqlx also closes connections on its own (idle timeout, max lifetime, a failed ping) without telling the
//! hooks; so whether a retired credential still has connections is asked of PostgreSQL (`pg_stat_activity`),
//! and its lease is revoked once none remain, though not before a login that started with it could have
//! finished (the pool's connection timeout, after which sqlx gives a login up).

use std::fmt;
use std::ops::Deref;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use postgres::config::{ChannelBinding, Host};
use sqlx::pool::PoolConnectionMetadata;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};

use crate::blocking::{blocking, current_runtime, revoke_refused};
use crate::connection::{Connection, SslMode, SYSTEM_ROOTS};
use crate::credential::Credential;
use crate::error::{Error, ErrorKind};
use crate::lease::Lease;
use crate::pool::{application_name, close_leases, login_refused, PoolOptions};
use crate::rotation::{self, Rotating, Wake};
use crate::shared::Shared;
use crate::shutdown::ShutdownMode;
use crate::sql;

/// Longer than anything that can come between `after_connect` accepting a connection and sqlx time-stamping it
/// (a few instructions, unless the thread is preempted): a rotation within this of the old credential's last
/// accepted connection starts the new credential's connections this much later, so the two are never mistaken
/// for each other.
const SETTLE: Duration = Duration::from_millis(50);

/// One credential of the pool.
struct Generation {
    lease_id: String,
    username: String,
    lease_duration: Duration,
    /// The connect options, with the credential's user, password and `application_name`. sqlx keeps the
    /// password in a `String` it frees without wiping (see docs/operations.md, "Secrets" › "In memory").
    options: PgConnectOptions,
    /// Connections opened from this instant on are this credential's; older ones are of earlier credentials.
    since: Instant,
    /// When `after_connect` last accepted a connection of this credential (at the end of any hold-back).
    last_accepted: Mutex<Option<Instant>>,
}

impl Generation {
    fn new(credential: &Credential, base: &PgConnectOptions, since: Instant) -> Generation {
        Generation {
            lease_id: credential.lease_id().to_owned(),
            username: credential.username().to_owned(),
            lease_duration: credential.lease_duration(),
            options: base
                .clone()
                .username(credential.username())
                .password(credential.password())
                .application_name(application_name(credential.lease_id())),
            since,
            last_accepted: Mutex::new(None),
        }
    }
}

/// A credential rotated away from whose lease is not yet revoked.
struct Retired {
    lease_id: String,
    username: String,
    /// No login with it can be in progress after this instant.
    logins_over: Instant,
}

/// What the pool's hooks, its rotation thread and its handle share.
struct State {
    role: String,
    base: PgConnectOptions,
    current: RwLock<Arc<Generation>>,
    retired: Mutex<Vec<Retired>>,
    wake: Wake,
    /// The pool's connection timeout: sqlx gives up a login after it.
    login_bound: Duration,
}

impl State {
    fn current(&self) -> Arc<Generation> {
        self.current.read().clone()
    }

    /// Whether a connection of this age belongs to a retired credential.
    fn is_retired(&self, meta: &PoolConnectionMetadata) -> bool {
        let since = self.current.read().since;
        // An age beyond the clock's reach is certainly older than the current credential.
        Instant::now()
            .checked_sub(meta.age)
            .is_none_or(|opened| opened < since)
    }
}

/// A sqlx [`PgPool`] for one broker role, always logged in with a valid credential: see
/// [`Broker::sqlx_pool`](crate::Broker::sqlx_pool).
///
/// It derefs to the [`PgPool`], so `&*pool` (or [`pool()`](SqlxPool::pool)) goes wherever sqlx wants an
/// executor. Cloning is cheap and gives another handle to the same pool. Keep a handle for as long as the pool is
/// used (in the application's state, say): dropping the last one stops the renewals and, as
/// [`PoolOptions::on_drop`] says, revokes or keeps the leases (in the background, on the rotation thread).
///
/// # Examples
///
/// Kept in an application's state and used as any `PgPool`:
///
/// ```no_run
/// use credbroker::{PoolOptions, SqlxPool};
///
/// #[derive(Clone)]
/// struct AppState {
///     db: SqlxPool, // keep the handle, not only a clone of the PgPool
/// }
///
/// async fn customer_name(state: &AppState, id: i64) -> Result<Option<String>, sqlx::Error> {
///     sqlx::query_scalar("SELECT name FROM customers WHERE id = $1")
///         .bind(id)
///         .fetch_optional(&*state.db)
///         .await
/// }
///
/// # async fn example(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
/// let state = AppState { db: broker.sqlx_pool("readonly", PoolOptions::new().max_size(16)).await? };
/// println!("{:?}", customer_name(&state, 7).await?);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqlxPool {
    handle: Arc<Handle>,
}

struct Handle {
    pool: PgPool,
    state: Arc<State>,
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The rotation thread closes the leases on its way out: a join here could block a runtime worker.
        self.state.wake.stop();
    }
}

/// The pool as its rotation thread sees it.
struct SqlxRotation {
    state: Arc<State>,
    pool: PgPool,
    runtime: tokio::runtime::Handle,
}

impl Rotating for SqlxRotation {
    fn role(&self) -> &str {
        &self.state.role
    }

    fn current_lease(&self) -> (String, Duration) {
        let current = self.state.current();
        (current.lease_id.clone(), current.lease_duration)
    }

    fn rotate(&self, credential: Credential) -> (String, String) {
        let (now, old) = {
            let mut current = self.state.current.write();
            // Under the lock, so that no connection of the old credential is between its check and this.
            let now = Instant::now();
            // SETTLE after the old credential's last accepted connection, if that is later than now (a
            // connection held back until the old credential's own start counts from there); and never before
            // the old credential's start, so that two rotations close together cannot move it back.
            let accepted = current
                .last_accepted
                .lock()
                .map(|accepted| accepted + SETTLE);
            let since = accepted
                .map_or(now, |settled| settled.max(now))
                .max(current.since);
            let new = Arc::new(Generation::new(&credential, &self.state.base, since));
            // Under the lock: `after_connect` sees the new credential current exactly when sqlx uses it.
            self.pool.set_connect_options(new.options.clone());
            (now, std::mem::replace(&mut *current, new))
        };
        self.state.retired.lock().push(Retired {
            lease_id: old.lease_id.clone(),
            username: old.username.clone(),
            logins_over: now + self.state.login_bound,
        });
        (old.lease_id.clone(), old.username.clone())
    }

    /// Checks out every idle connection and returns it at once: `after_release` closes the retired ones.
    fn close_idle(&self) {
        // Returning a connection spawns a task on the pool's runtime.
        let _runtime = self.runtime.enter();
        let idle = self.pool.num_idle();
        let held: Vec<_> = (0..idle).map_while(|_| self.pool.try_acquire()).collect();
        drop(held);
    }

    fn take_drained(&self, shared: &Shared) -> Vec<String> {
        let now = Instant::now();
        let names: Vec<String> = self
            .state
            .retired
            .lock()
            .iter()
            .filter(|r| r.logins_over <= now)
            .map(|r| r.username.clone())
            .collect();
        if names.is_empty() {
            return Vec::new();
        }
        let busy: Vec<String> =
            match shared.with_client(|client| client.query(sql::ROLES_WITH_SESSIONS, &[&names])) {
                Ok(Ok(rows)) => rows.iter().map(|row| row.get(0)).collect(),
                Ok(Err(e)) => {
                    log::debug!(
                        "pool of role {}: could not count sessions: {e}",
                        self.state.role
                    );
                    return Vec::new();
                }
                Err(e) => {
                    log::debug!(
                        "pool of role {}: could not count sessions: {e}",
                        self.state.role
                    );
                    return Vec::new();
                }
            };
        let mut retired = self.state.retired.lock();
        let (drained, kept): (Vec<_>, Vec<_>) = retired
            .drain(..)
            .partition(|r| names.contains(&r.username) && !busy.contains(&r.username));
        *retired = kept;
        drained.into_iter().map(|r| r.lease_id).collect()
    }

    fn wake(&self) -> &Wake {
        &self.state.wake
    }
}

impl SqlxPool {
    pub(crate) async fn open(
        shared: &Arc<Shared>,
        role: &str,
        options: PoolOptions,
        broker_shutdown: ShutdownMode,
    ) -> Result<SqlxPool, Error> {
        let runtime = current_runtime("Broker::sqlx_pool")?;
        let rotate_before = options.checked_rotate_before(shared, role)?;
        let base = connect_options(
            &shared.revoke_settings.connection,
            options.database.as_deref(),
        )?;
        let credential = {
            let role = role.to_owned();
            blocking(shared, move |shared| crate::issue::creds(shared, &role)).await?
        };
        let first = Generation::new(&credential, &base, Instant::now());
        let state = Arc::new(State {
            role: role.to_owned(),
            base,
            current: RwLock::new(Arc::new(first)),
            retired: Mutex::new(Vec::new()),
            wake: Wake::default(),
            login_bound: options.connection_timeout,
        });
        let pool =
            pool_options(&state, &options).connect_lazy_with(state.current().options.clone());

        // One login now, so that a role that cannot log in fails here with PostgreSQL's reason, not at the
        // first acquire with a timeout.
        if let Err(e) = pool.acquire().await {
            pool.close().await;
            let err = login_refused(
                role,
                credential.lease_id(),
                credential.username(),
                &e.to_string(),
            );
            revoke_refused(shared, role, credential.lease_id()).await?;
            return Err(err);
        }

        let on_drop = options.on_drop.unwrap_or(broker_shutdown);
        let rotating = SqlxRotation {
            state: state.clone(),
            pool: pool.clone(),
            runtime,
        };
        rotation::spawn(shared, rotating, rotate_before, move |shared, rotating| {
            if rotating.state.wake.stopped() {
                let mut leases: Vec<String> = rotating
                    .state
                    .retired
                    .lock()
                    .drain(..)
                    .map(|r| r.lease_id)
                    .collect();
                leases.push(rotating.state.current().lease_id.clone());
                close_leases(shared, &rotating.state.role, &leases, on_drop);
            }
        })?;
        log::info!(
            "opened sqlx pool of role {role} (max {} connections) with lease {}; rotating {rotate_before:?} \
             before the max lease",
            options.max_size,
            credential.lease_id()
        );
        Ok(SqlxPool {
            handle: Arc::new(Handle {
                pool,
                state,
                shared: shared.clone(),
            }),
        })
    }

    /// The sqlx pool: a cheap clone of it serves as long as this handle (or a clone of it) is kept.
    ///
    /// # Examples
    ///
    /// Handing the `PgPool` to code that takes one, such as sqlx's transactions:
    ///
    /// ```no_run
    /// # async fn example(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = broker.sqlx_pool("readonly", credbroker::PoolOptions::new()).await?;
    /// let mut tx = pool.pool().begin().await?;
    /// sqlx::query("UPDATE jobs SET state = 'done' WHERE id = $1").bind(42i64).execute(&mut *tx).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn pool(&self) -> &PgPool {
        &self.handle.pool
    }

    /// The broker role this pool's credentials are issued for.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = broker.sqlx_pool("readonly", credbroker::PoolOptions::new()).await?;
    /// assert_eq!(pool.role(), "readonly");
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn role(&self) -> &str {
        &self.handle.state.role
    }

    /// The lease new connections log in with.
    ///
    /// # Examples
    ///
    /// Which connections of the pool are on which lease (`application_name` is the lease id):
    ///
    /// ```no_run
    /// # async fn example(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = broker.sqlx_pool("readonly", credbroker::PoolOptions::new()).await?;
    /// let sessions: Vec<(String, i64)> = sqlx::query_as(
    ///     "SELECT application_name, count(*) FROM pg_stat_activity WHERE usename = current_user GROUP BY 1",
    /// )
    /// .fetch_all(&*pool)
    /// .await?;
    /// println!("current lease {}: {sessions:?}", pool.lease_id());
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn lease_id(&self) -> String {
        self.handle.state.current().lease_id.clone()
    }

    /// The PostgreSQL user new connections log in as.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = broker.sqlx_pool("readonly", credbroker::PoolOptions::new()).await?;
    /// let user: String = sqlx::query_scalar("SELECT session_user::text").fetch_one(&*pool).await?;
    /// // Equal unless the pool rotated in between:
    /// println!("{user} (new connections: {})", pool.username());
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn username(&self) -> String {
        self.handle.state.current().username.clone()
    }

    /// The lease new connections log in with, as the broker's lease table holds it (`None` if it has just been
    /// revoked or has expired, and the pool is about to rotate).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = broker.sqlx_pool("readonly", credbroker::PoolOptions::new()).await?;
    /// if let Some(lease) = pool.lease() {
    ///     println!("{} valid until {:?}", lease.username(), lease.expires_at());
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn lease(&self) -> Option<Lease> {
        self.handle.shared.leases.lease(&self.lease_id())
    }
}

impl Deref for SqlxPool {
    type Target = PgPool;

    fn deref(&self) -> &PgPool {
        &self.handle.pool
    }
}

impl fmt::Debug for SqlxPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.handle.state.current();
        f.debug_struct("SqlxPool")
            .field("role", &self.role())
            .field("lease_id", &current.lease_id)
            .field("username", &current.username)
            .field("retired", &self.handle.state.retired.lock().len())
            .field("size", &self.handle.pool.size())
            .finish()
    }
}

/// The sqlx pool options: sizes and timeout from `options`, and the hooks that keep retired connections out.
fn pool_options(state: &Arc<State>, options: &PoolOptions) -> PgPoolOptions {
    let (on_connect, on_acquire, on_release) = (state.clone(), state.clone(), state.clone());
    PgPoolOptions::new()
        .max_connections(options.max_size)
        .min_connections(options.min_idle)
        .acquire_timeout(options.connection_timeout)
        .after_connect(move |conn, _| {
            let state = on_connect.clone();
            Box::pin(async move {
                // The login role: `current_user` is the group for a role with one (`Role::group`).
                let user: String = sqlx::query_scalar("SELECT session_user::text")
                    .fetch_one(&mut *conn)
                    .await?;
                let since = {
                    let current = state.current.read();
                    if current.username != user {
                        // Logged in with a credential rotated away from meanwhile: sqlx closes this connection
                        // and logs in again with the current one.
                        return Err(sqlx::Error::Configuration(
                            format!("credbroker: connection of a retired credential ({user}); reconnecting").into(),
                        ));
                    }
                    // Under the lock, so that a rotation sees it; sqlx stamps the connection once this returns,
                    // after any hold-back below.
                    let mut accepted = current.last_accepted.lock();
                    let now = Instant::now().max(current.since);
                    *accepted = Some(accepted.map_or(now, |earlier| earlier.max(now)));
                    drop(accepted);
                    current.since
                };
                let now = Instant::now();
                if now < since {
                    tokio::time::sleep(since - now).await;
                }
                Ok(())
            })
        })
        .before_acquire(move |_, meta| {
            let retired = on_acquire.is_retired(&meta);
            Box::pin(async move { Ok(!retired) })
        })
        .after_release(move |_, meta| {
            let retired = on_release.is_retired(&meta);
            if retired {
                on_release.wake.poke();
            }
            Box::pin(async move { Ok(!retired) })
        })
}

/// The admin connection's host, port, database and TLS settings as sqlx connect options, without user and
/// password.
///
/// sqlx cannot do everything the admin connection does, and where that would weaken it, this fails with
/// [`ErrorKind::Tls`]: sqlx has no channel binding (where the certificate is not checked the admin connection
/// requires it, so such a pool needs `channel_binding=prefer` as an explicit opt-out), and it checks a
/// certificate against its built-in public CAs as well as `sslrootcert`, which under `verify-ca` (no host name
/// check) would accept any publicly trusted certificate. Under `verify-full` the host name is checked too.
fn connect_options(
    connection: &Connection,
    database: Option<&str>,
) -> Result<PgConnectOptions, Error> {
    let config = &connection.config;
    let refuse = |why: &str| {
        Err(Error::new(
            ErrorKind::Tls,
            format!("a sqlx pool cannot use the admin connection's TLS settings: {why}"),
        ))
    };
    let mut options = match config.get_options() {
        Some(raw) if !raw.trim().is_empty() => {
            let encoded =
                percent_encoding::utf8_percent_encode(raw, percent_encoding::NON_ALPHANUMERIC);
            PgConnectOptions::from_str(&format!("postgres://localhost/?options={encoded}"))
                .map_err(|e| {
                    Error::new(
                        ErrorKind::InvalidConfig,
                        format!("the connection string's options cannot be given to sqlx: {e}"),
                    )
                })?
        }
        _ => PgConnectOptions::new_without_pgpass(),
    };
    let ssl_mode = match connection.ssl_mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer | SslMode::Require if connection.root_cert.is_none() => {
            if config.get_channel_binding() == ChannelBinding::Require {
                return refuse(
                    "the server's certificate is not checked, so the admin connection requires channel binding, \
                     which sqlx lacks (it would answer a request for the password in the clear). Check the \
                     certificate with sslmode=verify-full sslrootcert=/path/to/ca.crt, or accept the risk with \
                     channel_binding=prefer in the connection string",
                );
            }
            if connection.ssl_mode == SslMode::Prefer {
                PgSslMode::Prefer
            } else {
                PgSslMode::Require
            }
        }
        SslMode::Prefer | SslMode::Require | SslMode::VerifyCa => {
            return refuse(
                "sqlx checks the certificate against its built-in public CAs as well as sslrootcert, so without a \
                 host name check (verify-ca, or require with sslrootcert) it would accept any publicly trusted \
                 certificate; use sslmode=verify-full, which checks the host name too",
            );
        }
        SslMode::VerifyFull => PgSslMode::VerifyFull,
    };
    options = options.ssl_mode(ssl_mode);
    // `sslrootcert=system` means the platform's CAs; sqlx checks against its built-in public CAs (webpki-roots)
    // whatever it is given, so nothing is added.
    let system_roots = connection
        .root_cert
        .as_deref()
        .is_some_and(|path| path.as_os_str() == SYSTEM_ROOTS);
    if connection.ssl_mode == SslMode::VerifyFull && !system_roots {
        let default =
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt"));
        if let Some(path) = connection.root_cert.clone().or(default) {
            options = options.ssl_root_cert(path);
        }
    }
    // sqlx reads libpq's PGSSLCERT/PGSSLKEY: pool sessions would present that client certificate, which
    // credbroker's pools never do (a certificate is the admin's alone).
    for variable in ["PGSSLCERT", "PGSSLKEY"] {
        if std::env::var_os(variable).is_some() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "{variable} is set in the environment, and sqlx would present that client certificate on the \
                     pool's connections; unset it (give the admin's certificate as sslcert/sslkey in the \
                     connection string instead)"
                ),
            ));
        }
    }
    // sqlx connects to one host and has no `target_session_attrs`: after a failover it would keep dialling the
    // old primary.
    if config.get_hosts().len() > 1 {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            "the connection string names several hosts, and a sqlx pool connects to one (sqlx has no \
             target_session_attrs to find the primary after a failover); give a single host name that follows the \
             primary (a DNS name or a proxy), or use the RolePool or deadpool pool, which follow the admin's hosts",
        ));
    }
    options = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => options.host(host),
        Some(Host::Unix(path)) => options.socket(path),
        None => options.host("localhost"),
    };
    options = options.port(config.get_ports().first().copied().unwrap_or(5432));
    if let Some(db) = database.or(config.get_dbname()) {
        options = options.database(db);
    }
    Ok(options)
}
