//! The async API (feature `tokio`): [`AsyncBroker`], a cheap handle on a [`Broker`] whose lifecycle methods are
//! `async fn`s, and [`BrokerBuilder::build_async`].
//!
//! The broker's core stays synchronous (the `postgres` crate and r2d2). Each async method hands its database work
//! to tokio's blocking threads (`spawn_blocking`) and awaits the result over a oneshot channel, so a runtime's
//! worker thread never waits for PostgreSQL. Outside a tokio runtime (another executor) the work runs on a
//! thread of its own.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::error::{Error, ErrorKind};
use crate::events::RevokeCause;
use crate::leases::LeaseEnd;
use crate::shared::Shared;
use crate::{
    Broker, BrokerBuilder, Credential, Lease, PoolOptions, Role, RolePool, ShutdownMode, Stats,
};

/// What the blocking thread sends back: the result, or the panic to continue in the caller.
type Outcome<T> = Result<Result<T, Error>, Box<dyn Any + Send>>;

/// Runs `work` on a blocking thread and waits for it without blocking. Should the caller stop waiting (its future
/// dropped, by a timeout or a cancelled request) once `work` has succeeded, `unclaimed` gets the value nobody
/// received: `creds` revokes the credential, so that no role outlives the call that wanted it.
async fn off_worker<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
    unclaimed: impl FnOnce(T) + Send + 'static,
) -> Result<T, Error> {
    let (sender, receiver) = oneshot::channel::<Outcome<T>>();
    let job = move || {
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(work));
        if let Err(Ok(Ok(value))) = sender.send(outcome) {
            unclaimed(value);
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => drop(runtime.spawn_blocking(job)),
        Err(_) => {
            std::thread::Builder::new()
                .name("credbroker-async".into())
                .spawn(job)
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Connection,
                        "could not start a thread for the database work of an async call",
                    )
                    .with_source(e)
                })?;
        }
    }
    match receiver.await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => Err(Error::new(
            ErrorKind::ShutDown,
            "the tokio runtime shut down before the broker's work ran; nothing was done",
        )),
    }
}

/// [`off_worker`] for work whose result can simply be dropped when nobody waits for it.
async fn off_worker_with<T: Send + 'static>(
    shared: &Arc<Shared>,
    work: impl FnOnce(&Shared) -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    let shared = shared.clone();
    off_worker(move || work(&shared), drop).await
}

impl BrokerBuilder {
    /// [`build`](BrokerBuilder::build) for async code: connects, checks, recovers and starts the sweeper on a
    /// blocking thread, without holding a runtime worker thread. Turn the broker into an [`AsyncBroker`] with
    /// [`Broker::into_async`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example() -> Result<(), credbroker::Error> {
    /// let broker = credbroker::Broker::builder()
    ///     .connection("host=localhost user=username password=password")
    ///     .build_async()
    ///     .await?
    ///     .into_async();
    /// # Ok(()) }
    /// ```
    pub async fn build_async(self) -> Result<Broker, Error> {
        off_worker(move || self.build_here(), drop).await
    }
}

impl Broker {
    /// This broker as an [`AsyncBroker`]: the same broker (its lease table, roles and sweeper), with async
    /// lifecycle methods.
    ///
    /// # Examples
    ///
    /// A broker built with the blocking [`build`](BrokerBuilder::build) (before the runtime starts, say), then
    /// handed to async code:
    ///
    /// ```no_run
    /// let broker = credbroker::Broker::builder()
    ///     .connection("host=localhost user=username password=password")
    ///     .build()?
    ///     .into_async();
    /// let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    /// runtime.block_on(async move {
    ///     let creds = broker.creds("web").await?;
    ///     broker.revoke(creds.lease_id()).await
    /// })?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use = "the broker stops when the handle is dropped"]
    pub fn into_async(self) -> AsyncBroker {
        AsyncBroker::from(self)
    }
}

/// A handle on a [`Broker`] for async code: the same lifecycle as `async fn`s that never block a runtime worker
/// thread for a database round trip (feature `tokio`).
///
/// Cloning is cheap (an `Arc`), and every clone is the same broker: one lease table, one sweeper. The broker
/// stops when the last handle is dropped (as a dropped [`Broker`] does), or at
/// [`shutdown`](AsyncBroker::shutdown). [`broker`](AsyncBroker::broker) gives the blocking API, for a
/// [`RolePool`]'s handle or code that runs on its own threads.
///
/// Each database call runs on tokio's blocking threads (`spawn_blocking`), at the cost of a hand-over there and
/// back. If the future of a call is dropped before it finishes (a timeout, a cancelled request), the call still
/// completes on its blocking thread; a credential that `creds` issued for a dropped future is revoked at once.
///
/// # Examples
///
/// ```no_run
/// use credbroker::{Broker, Role};
/// use std::time::Duration;
///
/// # async fn example() -> Result<(), credbroker::Error> {
/// let broker = Broker::builder()
///     .connection("host=localhost user=username password=password")
///     .build_async()
///     .await?
///     .into_async();
/// broker.write_role("web", Role::new()).await?;
///
/// let creds = broker.creds("web").await?;
/// // Connect with creds.username() and creds.password(), then:
/// broker.renew(creds.lease_id(), Some(Duration::from_secs(1800))).await?;
/// broker.revoke(creds.lease_id()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AsyncBroker {
    broker: Arc<Broker>,
}

impl From<Broker> for AsyncBroker {
    fn from(broker: Broker) -> AsyncBroker {
        AsyncBroker {
            broker: Arc::new(broker),
        }
    }
}

impl From<Arc<Broker>> for AsyncBroker {
    /// A handle on a broker already shared in an `Arc`; the broker stops when the last `Arc` and handle are gone.
    fn from(broker: Arc<Broker>) -> AsyncBroker {
        AsyncBroker { broker }
    }
}

impl std::fmt::Debug for AsyncBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AsyncBroker").field(&*self.broker).finish()
    }
}

impl AsyncBroker {
    /// The broker itself, for its blocking API.
    ///
    /// # Examples
    ///
    /// A [`RolePool`]'s connections block, so they are used on tokio's blocking threads:
    ///
    /// ```no_run
    /// type BoxError = Box<dyn std::error::Error + Send + Sync>;
    ///
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), BoxError> {
    /// let pool = broker.broker().pool("reports")?;
    /// let orders: i64 = tokio::task::spawn_blocking(move || -> Result<i64, BoxError> {
    ///     Ok(pool.get()?.query_one("SELECT count(*) FROM orders", &[])?.get(0))
    /// })
    /// .await??;
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.broker.shared
    }

    /// [`Broker::write_role`]: creates or replaces role `name`, after trying its SQL on the server.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), credbroker::Error> {
    /// use credbroker::Role;
    /// broker
    ///     .write_role("readonly", Role::new().creation_sql(
    ///         r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
    ///            GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{name}}";"#,
    ///     ))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn write_role(&self, name: &str, role: Role) -> Result<(), Error> {
        let name = name.to_owned();
        off_worker_with(self.shared(), move |shared| {
            crate::broker::write_role(shared, &name, role)
        })
        .await
    }

    /// [`Broker::delete_role`]: no new credentials for role `name`. (No database work: it returns at once.)
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), credbroker::Error> {
    /// broker.delete_role("readonly").await?;
    /// # Ok(()) }
    /// ```
    pub async fn delete_role(&self, name: &str) -> Result<(), Error> {
        self.broker.delete_role(name)
    }

    /// [`Broker::role`]: the definition of role `name`, if defined.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), credbroker::Error> {
    /// if let Some(role) = broker.role("readonly") {
    ///     println!("readonly leases: {:?}", role.get_lease());
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn role(&self, name: &str) -> Option<Role> {
        self.broker.role(name)
    }

    /// [`Broker::roles`]: the names of the defined roles, sorted.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), credbroker::Error> {
    /// for name in broker.roles() {
    ///     println!("{name}: {} live leases", broker.stats().live.get(&name).copied().unwrap_or(0));
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn roles(&self) -> Vec<String> {
        self.broker.roles()
    }

    /// [`Broker::creds`]: issues a credential for role `name`. Should this future be dropped before the
    /// credential reaches it, the credential is revoked.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), credbroker::Error> {
    /// let creds = broker.creds("readonly").await?;
    /// println!("{} until its lease ends in {:?}", creds.username(), creds.lease_duration());
    /// # Ok(()) }
    /// ```
    pub async fn creds(&self, name: &str) -> Result<Credential, Error> {
        let name = name.to_owned();
        let shared = self.shared().clone();
        let undo = shared.clone();
        off_worker(
            move || crate::issue::creds(&shared, &name),
            move |credential: Credential| {
                let id = credential.lease_id();
                match crate::revoke::revoke(&undo, id, LeaseEnd::Revoked(RevokeCause::Requested)) {
                    Ok(()) => log::info!(
                        "revoked lease {id}: the async creds call that issued it was dropped before it finished"
                    ),
                    Err(e) => log::warn!(
                        "lease {id} was issued for an async creds call dropped before it finished, and could not \
                         be revoked now ({e}); the sweeper revokes it"
                    ),
                }
            },
        )
        .await
    }

    /// [`Broker::renew`]: moves lease `id`'s end to now plus `increment` (`None`: the role's default lease).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker, id: &str) -> Result<(), credbroker::Error> {
    /// let lease = broker.renew(id, Some(std::time::Duration::from_secs(1800))).await?;
    /// println!("valid until {:?}", lease.expires_at());
    /// # Ok(()) }
    /// ```
    pub async fn renew(&self, id: &str, increment: Option<Duration>) -> Result<Lease, Error> {
        let id = id.to_owned();
        off_worker_with(self.shared(), move |shared| {
            crate::renew::renew(shared, &id, increment)
        })
        .await
    }

    /// [`Broker::revoke`]: revokes lease `id` now (ends its sessions, drops its role).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker, id: &str) -> Result<(), credbroker::Error> {
    /// broker.revoke(id).await?;
    /// # Ok(()) }
    /// ```
    pub async fn revoke(&self, id: &str) -> Result<(), Error> {
        let id = id.to_owned();
        off_worker_with(self.shared(), move |shared| {
            crate::revoke::revoke(shared, &id, LeaseEnd::Revoked(RevokeCause::Requested))
        })
        .await
    }

    /// [`Broker::revoke_prefix`]: revokes every lease whose id starts with `prefix`; returns how many.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), credbroker::Error> {
    /// let revoked = broker.revoke_prefix("postgresql/creds/readonly/").await?;
    /// # Ok(()) }
    /// ```
    pub async fn revoke_prefix(&self, prefix: &str) -> Result<usize, Error> {
        let prefix = prefix.to_owned();
        off_worker_with(self.shared(), move |shared| {
            crate::revoke::revoke_prefix(shared, &prefix)
        })
        .await
    }

    /// [`Broker::revoke_force`]: revokes lease `id`, and forgets it even if its role cannot be dropped.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker, id: &str) -> Result<(), credbroker::Error> {
    /// broker.revoke_force(id).await?;
    /// # Ok(()) }
    /// ```
    pub async fn revoke_force(&self, id: &str) -> Result<(), Error> {
        let id = id.to_owned();
        off_worker_with(self.shared(), move |shared| {
            crate::revoke::revoke_force(shared, &id)
        })
        .await
    }

    /// [`Broker::lease`]: the lease `id`, if in the table. Reads memory only, so it is not `async`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker, id: &str) -> Result<(), credbroker::Error> {
    /// match broker.lease(id) {
    ///     Some(lease) => println!("valid until {}", humantime::format_rfc3339_seconds(lease.expires_at())),
    ///     None => println!("revoked or expired"),
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn lease(&self, id: &str) -> Option<Lease> {
        self.broker.lease(id)
    }

    /// [`Broker::leases`]: every lease in the table, sorted by id.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), credbroker::Error> {
    /// for lease in broker.leases() {
    ///     println!("{} {} {}", lease.id(), lease.username(), humantime::format_rfc3339_seconds(lease.expires_at()));
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn leases(&self) -> Vec<Lease> {
        self.broker.leases()
    }

    /// [`Broker::failed_leases`]: leases whose revocation has failed at least once.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), credbroker::Error> {
    /// for lease in broker.failed_leases() {
    ///     eprintln!("{}: {}", lease.username(), lease.last_error().unwrap_or_default());
    /// }
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn failed_leases(&self) -> Vec<Lease> {
        self.broker.failed_leases()
    }

    /// [`Broker::stats`]: counts of what the broker did, live leases per role, sweeper lag.
    ///
    /// # Examples
    ///
    /// A task that reports once a minute:
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), credbroker::Error> {
    /// tokio::spawn(async move {
    ///     let mut every_minute = tokio::time::interval(Duration::from_secs(60));
    ///     loop {
    ///         every_minute.tick().await;
    ///         let stats = broker.stats();
    ///         println!("{} issued, {} failing, sweeper {:?} late", stats.issued, stats.failing, stats.sweeper_lag);
    ///     }
    /// });
    /// # Ok(()) }
    /// ```
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.broker.stats()
    }

    /// [`Broker::pool`]: a [`RolePool`] for role `name` with the default [`PoolOptions`]; see
    /// [`pool_with`](AsyncBroker::pool_with).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// type BoxError = Box<dyn std::error::Error + Send + Sync>;
    ///
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), BoxError> {
    /// let pool = broker.pool("reports").await?; // opened without blocking this task
    /// let handle = pool.clone();
    /// let orders: i64 = tokio::task::spawn_blocking(move || -> Result<i64, BoxError> {
    ///     Ok(handle.get()?.query_one("SELECT count(*) FROM orders", &[])?.get(0))
    /// })
    /// .await??;
    /// # Ok(()) }
    /// ```
    pub async fn pool(&self, name: &str) -> Result<RolePool, Error> {
        self.pool_with(name, PoolOptions::new()).await
    }

    /// [`Broker::pool_with`]: a [`RolePool`] for role `name`, opened (one credential issued, one login tried)
    /// on a blocking thread. Its connections are blocking `postgres::Client`s: query them inside
    /// `tokio::task::spawn_blocking`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), credbroker::Error> {
    /// use credbroker::PoolOptions;
    ///
    /// let pool = broker.pool_with("reports", PoolOptions::new().max_size(4)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn pool_with(&self, name: &str, options: PoolOptions) -> Result<RolePool, Error> {
        let name = name.to_owned();
        let broker = self.broker.clone();
        off_worker(move || broker.pool_here(&name, options), drop).await
    }

    /// Stops the broker for every handle, as [`Broker::shutdown`] does: stops the sweeper, then keeps or
    /// revokes the leases as `mode` says. Calls of other handles then fail with [`ErrorKind::ShutDown`]; a
    /// second `shutdown` returns `Ok` at once.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(broker: credbroker::AsyncBroker) -> Result<(), credbroker::Error> {
    /// use credbroker::ShutdownMode;
    /// use std::time::Duration;
    /// broker.shutdown(ShutdownMode::Revoke { timeout: Duration::from_secs(10) }).await?;
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self, mode: ShutdownMode) -> Result<(), Error> {
        let broker = self.broker.clone();
        off_worker(
            move || crate::shutdown::stop(&broker.shared, &broker.sweeper, mode),
            drop,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send<T: Send>(_: T) {}

    #[test]
    fn handles_are_send_sync_and_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<AsyncBroker>();
    }

    /// Never called: it compiles only if every future is `Send` (axum and tonic need that).
    #[allow(dead_code)]
    fn futures_are_send(broker: &AsyncBroker) {
        send(broker.creds("r"));
        send(broker.renew("id", None));
        send(broker.revoke("id"));
        send(broker.revoke_prefix("p"));
        send(broker.revoke_force("id"));
        send(broker.write_role("r", Role::new()));
        send(broker.delete_role("r"));
        send(broker.pool("r"));
        send(broker.pool_with("r", PoolOptions::new()));
        send(broker.shutdown(ShutdownMode::Keep));
        send(Broker::builder().build_async());
    }
}
