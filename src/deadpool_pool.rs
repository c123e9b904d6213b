//! [`DeadpoolPool`] (feature `deadpool`): a deadpool pool of tokio-postgres clients that always log in with a
//! valid credential.
//!
//! The pool is deadpool's own [`Pool`](deadpool::managed::Pool), with [`DeadpoolManager`] as its manager: it logs
//! in with the current credential (and the admin connection's TLS, channel binding included), and counts each
//! credential's connections from the moment a login starts, as [`RolePool`](crate::RolePool) does. Deadpool asks
//! the manager to `recycle` a connection before handing it out again; the manager refuses those of a retired
//! credential, so they are closed then, never while checked out. The rotation thread (`rotation`) renews and
//! rotates, drops idle connections of a retired credential at once (`Pool::retain`), revokes its lease when its
//! last connection is gone, and stops once every clone of the pool is dropped.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use deadpool_postgres::ClientWrapper;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::blocking::{blocking, current_runtime, revoke_refused};
use crate::error::{Error, ErrorKind};
use crate::pool::{
    close_leases, login_failed, CloseIdle, Counted, Generation, Generations, PoolOptions,
};
use crate::rotation;
use crate::shared::Shared;
use crate::shutdown::ShutdownMode;

/// A deadpool pool whose connections always log in with a valid credential: see
/// [`Broker::deadpool`](crate::Broker::deadpool). `pool.get().await?` gives a [`DeadpoolClient`], which derefs to
/// deadpool-postgres' [`ClientWrapper`] (`prepare_cached`, `transaction`) and on to [`tokio_postgres::Client`].
///
/// # Examples
///
/// ```no_run
/// use credbroker::{DeadpoolPool, PoolOptions};
///
/// async fn customer_name(pool: &DeadpoolPool, id: i64) -> Result<Option<String>, Box<dyn std::error::Error>> {
///     let client = pool.get().await?;
///     let statement = client.prepare_cached("SELECT name FROM customers WHERE id = $1").await?;
///     Ok(client.query_opt(&statement, &[&id]).await?.map(|row| row.get(0)))
/// }
///
/// # async fn example(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
/// let pool = broker.deadpool("readonly", PoolOptions::new().max_size(16)).await?;
/// println!("{:?}", customer_name(&pool, 7).await?);
/// let status = pool.status();
/// println!("{} connections, {} idle", status.size, status.available);
/// # Ok(()) }
/// ```
pub type DeadpoolPool = managed::Pool<DeadpoolManager>;

/// The deadpool manager of a [`DeadpoolPool`]: logs in with the pool's current credential, and refuses to
/// recycle connections of a retired one.
///
/// It is made by [`Broker::deadpool`](crate::Broker::deadpool), never by hand; its name appears in the types
/// of what the pool hands out.
///
/// # Examples
///
/// A function that takes a connection checked out of the pool:
///
/// ```no_run
/// use credbroker::DeadpoolManager;
/// use deadpool::managed::Object;
///
/// async fn mark_done(client: &Object<DeadpoolManager>, job: i64) -> Result<u64, tokio_postgres::Error> {
///     client.execute("UPDATE jobs SET state = 'done' WHERE id = $1", &[&job]).await
/// }
///
/// # async fn example(pool: credbroker::DeadpoolPool) -> Result<(), Box<dyn std::error::Error>> {
/// let client = pool.get().await?;
/// mark_done(&client, 42).await?;
/// # Ok(()) }
/// ```
pub struct DeadpoolManager {
    generations: Arc<Generations<tokio_postgres::Config>>,
    tls: MakeRustlsConnect,
}

impl fmt::Debug for DeadpoolManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadpoolManager")
            .field("role", &self.generations.role)
            .field("current", &*self.generations.current())
            .finish_non_exhaustive()
    }
}

/// A connection of a [`DeadpoolPool`] and the credential it logged in with; derefs to deadpool-postgres'
/// [`ClientWrapper`].
///
/// # Examples
///
/// ```no_run
/// # async fn example(pool: credbroker::DeadpoolPool) -> Result<(), Box<dyn std::error::Error>> {
/// let mut client = pool.get().await?; // derefs to a DeadpoolClient, then to the tokio-postgres client
/// let tx = client.transaction().await?;
/// tx.execute("UPDATE jobs SET state = 'done' WHERE id = $1", &[&42i64]).await?;
/// tx.commit().await?;
/// println!("as {} under lease {}", client.username(), client.lease_id());
/// # Ok(()) }
/// ```
pub struct DeadpoolClient {
    client: ClientWrapper,
    generation: Arc<Generation<tokio_postgres::Config>>,
    generations: Arc<Generations<tokio_postgres::Config>>,
}

impl DeadpoolClient {
    /// The lease this connection logged in with (its `application_name` is this id, or its last 63 bytes).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = broker.deadpool("readonly", credbroker::PoolOptions::new()).await?;
    /// let client = pool.get().await?;
    /// if let Err(e) = client.batch_execute("REFRESH MATERIALIZED VIEW daily_totals").await {
    ///     eprintln!("refresh failed on the connection of lease {}: {e}", client.lease_id());
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn lease_id(&self) -> &str {
        &self.generation.lease_id
    }

    /// The PostgreSQL user this connection logged in as.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = broker.deadpool("readonly", credbroker::PoolOptions::new()).await?;
    /// let client = pool.get().await?;
    /// let user: String = client.query_one("SELECT session_user::text", &[]).await?.get(0);
    /// assert_eq!(user, client.username());
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn username(&self) -> &str {
        &self.generation.username
    }

    /// Whether the pool has rotated away from this connection's credential: it is closed instead of being
    /// handed out again.
    ///
    /// # Examples
    ///
    /// A task that holds a connection for a long time and takes a fresh one after a rotation, before the old
    /// lease reaches its max and its sessions are ended:
    ///
    /// ```no_run
    /// # async fn example(broker: &credbroker::Broker) -> Result<(), Box<dyn std::error::Error>> {
    /// # let pool = broker.deadpool("readonly", credbroker::PoolOptions::new()).await?;
    /// let mut client = pool.get().await?;
    /// loop {
    ///     client.batch_execute("SELECT pg_sleep(1)").await?; // a unit of work
    ///     if client.is_retired() {
    ///         client = pool.get().await?; // the old connection is closed, not handed out again
    ///     }
    /// #   break;
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn is_retired(&self) -> bool {
        self.generation.is_retired()
    }
}

impl Drop for DeadpoolClient {
    fn drop(&mut self) {
        self.generations.release(&self.generation);
    }
}

impl Deref for DeadpoolClient {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.client
    }
}

impl DerefMut for DeadpoolClient {
    fn deref_mut(&mut self) -> &mut ClientWrapper {
        &mut self.client
    }
}

impl fmt::Debug for DeadpoolClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadpoolClient")
            .field("lease_id", &self.lease_id())
            .field("username", &self.username())
            .field("retired", &self.is_retired())
            .finish()
    }
}

impl managed::Manager for DeadpoolManager {
    type Type = DeadpoolClient;
    type Error = Error;

    async fn create(&self) -> Result<DeadpoolClient, Error> {
        // Counted until the client holds the count: released if the login fails, and if this future is dropped
        // mid-login (a `get` that timed out or was cancelled), or a retired credential's count would never
        // reach zero and its lease would last to its max.
        let generation = self.generations.count_login();
        let login = CountedLogin {
            generation: Some(generation.clone()),
            generations: &self.generations,
        };
        match generation.config.connect(self.tls.clone()).await {
            Ok((client, connection)) => {
                let lease = generation.lease_id.clone();
                let task = tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        log::debug!("a connection of lease {lease} ended: {e}");
                    }
                });
                login.handed_over();
                Ok(DeadpoolClient {
                    client: ClientWrapper::new(client, task),
                    generation,
                    generations: self.generations.clone(),
                })
            }
            Err(e) => Err(login_failed(
                &self.generations.role,
                &generation.lease_id,
                &generation.username,
                e,
            )),
        }
    }

    async fn recycle(&self, client: &mut DeadpoolClient, _: &Metrics) -> RecycleResult<Error> {
        if client.is_retired() {
            return Err(RecycleError::message("retired by a rotation"));
        }
        if client.is_closed() {
            return Err(RecycleError::message("connection closed"));
        }
        Ok(())
    }
}

/// A login counted against its credential, released on drop unless handed over to the new client.
struct CountedLogin<'a> {
    generation: Option<Arc<Generation<tokio_postgres::Config>>>,
    generations: &'a Generations<tokio_postgres::Config>,
}

impl CountedLogin<'_> {
    /// The client now holds the count and releases it when dropped.
    fn handed_over(mut self) {
        self.generation = None;
    }
}

impl Drop for CountedLogin<'_> {
    fn drop(&mut self) {
        if let Some(generation) = self.generation.take() {
            self.generations.release(&generation);
        }
    }
}

impl CloseIdle for managed::WeakPool<DeadpoolManager> {
    fn close_idle(&self) {
        if let Some(pool) = self.upgrade() {
            // The removed connections are dropped here: uncounted, and closed by their connection task.
            drop(pool.retain(|client, _| !client.is_retired()));
        }
    }

    /// The rotation thread holds the pool weakly: once the application has dropped every clone, it stops.
    fn is_closed(&self) -> bool {
        self.upgrade().is_none()
    }
}

/// Opens the pool: see [`Broker::deadpool`](crate::Broker::deadpool).
pub(crate) async fn open(
    shared: &Arc<Shared>,
    role: &str,
    options: PoolOptions,
    broker_shutdown: ShutdownMode,
) -> Result<DeadpoolPool, Error> {
    current_runtime("Broker::deadpool")?;
    let rotate_before = options.checked_rotate_before(shared, role)?;
    let connection = &shared.revoke_settings.connection;
    let base = connection.async_config.clone();
    let credential = {
        let role = role.to_owned();
        blocking(shared, move |shared| crate::issue::creds(shared, &role)).await?
    };
    let first = Generation::new(&credential, &base, options.database.as_deref());
    let generations = Arc::new(Generations::new(
        role,
        base,
        options.database.clone(),
        first,
    ));
    let manager = DeadpoolManager {
        generations: generations.clone(),
        tls: connection.tls.clone(),
    };
    let built = managed::Pool::builder(manager)
        .max_size(usize::try_from(options.max_size).unwrap_or(usize::MAX))
        .wait_timeout(Some(options.connection_timeout))
        .create_timeout(Some(options.connection_timeout))
        .runtime(deadpool::Runtime::Tokio1)
        .build();
    // One login now, so that a role that cannot log in fails here with PostgreSQL's reason.
    let checked = match built {
        Ok(pool) => match pool.get().await {
            Ok(client) => {
                drop(client);
                Ok(pool)
            }
            Err(managed::PoolError::Backend(e)) => Err(e),
            Err(e) => Err(Error::new(
                ErrorKind::Connection,
                format!("pool of role {role:?} could not open a connection: {e}"),
            )),
        },
        Err(e) => Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("deadpool refused the pool: {e}"),
        )),
    };
    let pool = match checked {
        Ok(pool) => pool,
        Err(err) => {
            revoke_refused(shared, role, credential.lease_id()).await?;
            return Err(err);
        }
    };
    let on_drop = options.on_drop.unwrap_or(broker_shutdown);
    let rotating = Counted {
        generations,
        pool: pool.weak(),
    };
    rotation::spawn(shared, rotating, rotate_before, move |shared, rotating| {
        if rotating.pool.is_closed() {
            let leases = rotating.generations.all_leases();
            close_leases(shared, &rotating.generations.role, &leases, on_drop);
        }
    })?;
    log::info!(
        "opened deadpool pool of role {role} (max {} connections) with lease {}; rotating {rotate_before:?} \
         before the max lease",
        options.max_size,
        credential.lease_id()
    );
    Ok(pool)
}
