//! The state a broker, its sweeper and its pools share: the admin connection pool, the lease table, the role
//! definitions and the settings fixed at build. Lower modules take a `&Shared`; none of them knows the
//! [`Broker`](crate::Broker) itself.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use postgres::Client;
use r2d2::{Pool, PooledConnection};

use crate::admin_pool::{AdminManager, Reconnects};
use crate::connection::SslMode;
use crate::drop_role::RevokeSettings;
use crate::error::{Error, ErrorKind};
use crate::failover::Failover;
use crate::lease::LeasePolicy;
use crate::leases::Leases;
use crate::role::CompiledRole;
use crate::runtime::OffRuntime;

type Manager = AdminManager;

/// State the sweeper and the callers share.
pub(crate) struct Shared {
    /// Dropped off any tokio runtime: dropping it closes its idle connections.
    pub(crate) pool: OffRuntime<Pool<Manager>>,
    /// Whether the pool's connection attempts are failing: then checkouts wait for the attempt under way.
    pub(crate) reconnects: Arc<Reconnects>,
    /// The lease table and every rule about changing it.
    pub(crate) leases: Leases,
    pub(crate) roles: RwLock<BTreeMap<String, Arc<CompiledRole>>>,
    pub(crate) policy: LeasePolicy,
    pub(crate) ssl_mode: SslMode,
    pub(crate) revoke_settings: RevokeSettings,
    /// The marker role every issued role is a member of.
    pub(crate) marker: String,
    /// PBKDF2 rounds of the SCRAM verifiers of issued passwords.
    pub(crate) scram_iterations: u32,
    /// This broker's instance name, written on every role it issues.
    pub(crate) instance: String,
    /// How often the sweeper looks for orphans, and how long past expiry a role must be to count as one.
    pub(crate) orphan_interval: Duration,
    /// The server identity seen, the roles dropped recently and the leases lost, for failovers.
    pub(crate) failover: Arc<Failover>,
    /// The broker's cap on leases in the table, if any.
    pub(crate) max_leases: Option<u32>,
    /// How many admin connections to keep open at rest.
    pub(crate) min_idle: u32,
    /// The longest one lease operation may take (a connection plus a few statements): how long a renewal waits
    /// for another renewal of its lease, and a revocation for the one in flight.
    pub(crate) op_bound: Duration,
}

impl Shared {
    /// A pooled admin connection. Once the broker is stopping, the wait is cut short at shutdown's deadline.
    pub(crate) fn connection(&self) -> Result<PooledConnection<Manager>, Error> {
        let mut timeout = self.pool.connection_timeout();
        if let Some(deadline) = self.leases.shutdown_deadline() {
            timeout = timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        if timeout.is_zero() {
            return Err(Error::new(
                ErrorKind::ShutDown,
                "the broker has shut down and its shutdown timeout has passed; no more revocations are tried",
            ));
        }
        let connection = self.reconnects.checkout(&self.pool, timeout).map_err(|e| {
            Error::new(
                ErrorKind::Connection,
                format!(
                    "no PostgreSQL connection available within {timeout:?}: {e}; check that the server is up, or raise pool_size"
                ),
            )
        })?;
        Ok(self.announced(connection))
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

    /// An idle pooled admin connection, if there is one; never opens one.
    pub(crate) fn idle_connection(&self) -> Option<PooledConnection<Manager>> {
        self.pool.try_get().map(|c| self.announced(c))
    }

    /// `connection`, after waking the sweeper to reconcile if a new connection found a new primary.
    fn announced(&self, connection: PooledConnection<Manager>) -> PooledConnection<Manager> {
        if self.failover.take_announcement() {
            self.leases.request_reconcile();
        }
        connection
    }

    /// A new admin connection for background work, unless a checkout is already waiting for one or connection
    /// attempts are failing: then the attempt under way serves that checkout, and the background work waits for
    /// its next turn. (Each such extra connection stays open until idle for `idle_timeout`; a fleet whose server
    /// restarted filled it with them.)
    pub(crate) fn new_connection(&self) -> Option<PooledConnection<Manager>> {
        self.reconnects
            .new_connection(&self.pool)
            .map(|c| self.announced(c))
    }

    /// Keeps `min_idle` admin connections open: takes that many idle ones (r2d2 hands out the most recently
    /// returned first, so the others keep ageing and are closed after `idle_timeout`) and pings each (a broken
    /// one is discarded when returned). Opens new ones only while fewer than `min_idle` are open, counting those
    /// at work: a busy broker needs no spare. Runs on the pool's threads; never long (bounded by the connect
    /// timeout) and never while the broker is stopping.
    pub(crate) fn keep_idle(&self) {
        if self.leases.is_shut_down() {
            return;
        }
        let wanted = self.min_idle as usize;
        let (mut kept, mut broken) = (Vec::new(), 0);
        // All are held until the end, so none is counted twice. A failure to open one is retried, with jitter,
        // at the next turn.
        while kept.len() - broken < wanted && kept.len() < 2 * wanted {
            let client = match self.pool.try_get() {
                Some(client) => client,
                None => {
                    let open = self.pool.state().connections as usize;
                    if open.saturating_sub(broken) >= wanted {
                        break;
                    }
                    match self.reconnects.new_connection(&self.pool) {
                        Some(client) => client,
                        None => break,
                    }
                }
            };
            kept.push(client);
            if kept.last_mut().is_some_and(|c| c.simple_query("").is_err()) {
                broken += 1;
            }
        }
    }

    /// How many connections may work on revocation at once: all but one of the pool's, so that `creds` and
    /// `renew` in other threads still find one.
    pub(crate) fn revocation_workers(&self) -> usize {
        usize::try_from(self.pool.max_size().saturating_sub(1).max(1)).unwrap_or(1)
    }

    /// `err`, or the reason a lease not in the table is gone if a failover lost it.
    pub(crate) fn lost(&self, id: &str, err: Error) -> Error {
        match err.kind() {
            ErrorKind::UnknownLease => self.failover.lost_error(id).unwrap_or(err),
            _ => err,
        }
    }

    /// The role currently defined under `name`, if any.
    pub(crate) fn current_role(&self, name: &str) -> Option<Arc<CompiledRole>> {
        self.roles.read().get(name).cloned()
    }
}

/// The error for a role name no definition has.
pub(crate) fn unknown_role(name: &str) -> Error {
    Error::new(
        ErrorKind::UnknownRole,
        format!("no role named {name:?} is defined; define it with Broker::write_role"),
    )
}
