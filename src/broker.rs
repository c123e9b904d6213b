//! The broker: configuration, roles, and the credential lifecycle (issue, renew, revoke).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock};
use postgres::error::SqlState;
use postgres::Client;
use r2d2::{Pool, PooledConnection};
use scheduled_thread_pool::ScheduledThreadPool;
use zeroize::Zeroizing;

use crate::admin_pool::{AdminManager, Reconnects, SpreadReconnects, RECONNECT_JITTER};
use crate::connection::{Connection, PasswordProvider, SslMode};
use crate::credential::{generate_lease_id, scram_verifier, Credential, DEFAULT_SCRAM_ITERATIONS};
use crate::error::{check_duration, describe};
use crate::error::{Error, ErrorKind};
use crate::events::{Events, HandleEvent, NopEventHandler, RevokeCause, Stats};
use crate::failover::{self, Failover};
use crate::lease::{pg_timestamp, Lease, LeasePolicy};
use crate::leases::{later, Claim, Leases, Why};
use crate::marker::{check_instance_name, default_instance_name, LeaseMark, DEFAULT_MARKER_ROLE};
use crate::owner::DEFAULT_OWNER_ROLE;
use crate::pool::{PoolOptions, RolePool};
use crate::preflight::{self, Needs, Reserved};
use crate::recovery::{self, RecoveryMode, DEFAULT_ORPHAN_INTERVAL};
use crate::revoke::{revoke_lease, revoke_leases, RevokeSettings, BATCH};
use crate::role::{check_role_name, CompiledRole, Role};
use crate::runtime::{off_runtime, OffRuntime};
use crate::shutdown::{revoke_all, ShutdownMode};
use crate::template::{Placeholder, Values};
use crate::{sql, sweeper, telemetry};
use postgres_protocol::escape::escape_identifier;

type Manager = AdminManager;

/// How many times `creds` tries fresh usernames when PostgreSQL reports one as taken.
const USERNAME_ATTEMPTS: usize = 3;

/// Configuration of a [`Broker`]; every setting has a default but the connection string.
///
/// | setting | default |
/// |---|---|
/// | [`connection`](BrokerBuilder::connection) | required |
/// | [`lease`](BrokerBuilder::lease) | 1 hour default, 24 hours max |
/// | [`pool_size`](BrokerBuilder::pool_size) | 4 connections |
/// | [`min_idle`](BrokerBuilder::min_idle) | 1 connection |
/// | [`idle_timeout`](BrokerBuilder::idle_timeout) | 60 seconds |
/// | [`max_leases`](BrokerBuilder::max_leases) | no cap |
/// | [`connect_timeout`](BrokerBuilder::connect_timeout) | 10 seconds |
/// | [`statement_timeout`](BrokerBuilder::statement_timeout) | 30 seconds |
/// | [`lock_timeout`](BrokerBuilder::lock_timeout) | 5 seconds |
/// | [`instance_name`](BrokerBuilder::instance_name) | `<host name>/<executable name>` |
/// | [`marker_role`](BrokerBuilder::marker_role) | [`DEFAULT_MARKER_ROLE`](crate::DEFAULT_MARKER_ROLE) (`credbroker_lease`) |
/// | [`reassign_owned_to`](BrokerBuilder::reassign_owned_to) | [`DEFAULT_OWNER_ROLE`](crate::DEFAULT_OWNER_ROLE) (`credbroker_owner`) |
/// | [`recovery`](BrokerBuilder::recovery) | [`RecoveryMode::Adopt`] |
/// | [`shutdown_mode`](BrokerBuilder::shutdown_mode) | [`ShutdownMode::Keep`] |
/// | [`terminate_sessions`](BrokerBuilder::terminate_sessions) | true |
/// | [`orphan_sweep_interval`](BrokerBuilder::orphan_sweep_interval) | 60 seconds |
/// | [`scram_iterations`](BrokerBuilder::scram_iterations) | 4096 ([`DEFAULT_SCRAM_ITERATIONS`](crate::DEFAULT_SCRAM_ITERATIONS)) |
/// | [`event_handler`](BrokerBuilder::event_handler) | [`NopEventHandler`](crate::NopEventHandler) |
/// | [`failover_window`](BrokerBuilder::failover_window) | 5 minutes |
pub struct BrokerBuilder {
    connection: Option<Zeroizing<String>>,
    default_lease: Duration,
    max_lease: Duration,
    pool_size: u32,
    min_idle: u32,
    idle_timeout: Duration,
    max_leases: Option<u32>,
    connect_timeout: Duration,
    statement_timeout: Duration,
    lock_timeout: Duration,
    instance_name: Option<String>,
    marker_role: String,
    reassign_owner: String,
    recovery: RecoveryMode,
    shutdown_mode: ShutdownMode,
    terminate_sessions: bool,
    orphan_interval: Duration,
    scram_iterations: u32,
    event_handler: Box<dyn HandleEvent>,
    password_provider: Option<PasswordProvider>,
    failover_window: Duration,
}

impl Default for BrokerBuilder {
    fn default() -> BrokerBuilder {
        BrokerBuilder {
            connection: None,
            default_lease: Duration::from_secs(3600),
            max_lease: Duration::from_secs(24 * 3600),
            pool_size: 4,
            min_idle: DEFAULT_MIN_IDLE,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_leases: None,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            instance_name: None,
            marker_role: DEFAULT_MARKER_ROLE.to_owned(),
            reassign_owner: DEFAULT_OWNER_ROLE.to_owned(),
            recovery: RecoveryMode::Adopt,
            shutdown_mode: ShutdownMode::Keep,
            terminate_sessions: true,
            orphan_interval: DEFAULT_ORPHAN_INTERVAL,
            scram_iterations: DEFAULT_SCRAM_ITERATIONS,
            event_handler: Box::new(NopEventHandler),
            password_provider: None,
            failover_window: failover::DEFAULT_WINDOW,
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
            .field("min_idle", &self.min_idle)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_leases", &self.max_leases)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field("instance_name", &self.instance_name)
            .field("marker_role", &self.marker_role)
            .field("reassign_owner", &self.reassign_owner)
            .field("recovery", &self.recovery)
            .field("shutdown_mode", &self.shutdown_mode)
            .field("terminate_sessions", &self.terminate_sessions)
            .field("orphan_interval", &self.orphan_interval)
            .field("scram_iterations", &self.scram_iterations)
            .field("event_handler", &self.event_handler)
            .field(
                "password_provider",
                &self.password_provider.as_ref().map(|_| "<set>"),
            )
            .field("failover_window", &self.failover_window)
            .finish()
    }
}

impl BrokerBuilder {
    /// Asks `provider` for the admin password each time the broker opens an admin connection (at `build`, when
    /// the admin pool opens or replaces one, and for revocation's connections to other databases): an RDS IAM
    /// token generator, a file re-read after a Kubernetes secret rotates, any secret store. The connection
    /// string must then hold no password. [`RolePool`](crate::RolePool)s are not affected: they log in with
    /// issued credentials.
    ///
    /// The provider runs on a thread of its own, under no lock of the broker's; the login waits for it up to
    /// the connect timeout, then fails (the provider's thread is left to finish). A panic in it is caught and
    /// fails the login the same way, its message not shown. Its password is wiped from the
    /// broker's memory after the login (see the README's "Secrets in memory" for the copies the client
    /// library keeps) and never logged; an error it returns, a panic or a timeout fails the connection with
    /// [`ErrorKind::PasswordProvider`] (an error it returns as the source). There is no async variant yet.
    ///
    /// ```no_run
    /// use credbroker::Broker;
    ///
    /// let broker = Broker::builder()
    ///     .connection("host=db.internal user=credbroker_admin sslmode=verify-full sslrootcert=system")
    ///     .password_provider(|| std::fs::read_to_string("/var/run/secrets/pg-admin/password")
    ///         .map(|p| p.trim_end().to_owned()))
    ///     .build()?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn password_provider<F, E>(mut self, provider: F) -> BrokerBuilder
    where
        F: Fn() -> Result<String, E> + Send + Sync + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.password_provider = Some(Arc::new(move || provider().map_err(Into::into)));
        self
    }

    /// The admin connection: a libpq `key=value` string (`host=localhost user=username password=password`) or a
    /// `postgres://` URL. Without `sslmode`, TLS is required; `sslmode` may be `disable`, `prefer`, `require`,
    /// `verify-ca` or `verify-full` (the last two with `sslrootcert=/path/to/ca.crt`). Where the certificate is
    /// not checked (`prefer`, `require` without `sslrootcert`), `channel_binding=require` is the default: the
    /// password is never answered to a cleartext or MD5 request (`channel_binding=prefer` opts out). The user
    /// must be a superuser or have `CREATEROLE`.
    ///
    /// The admin may also log in without a password in the string: with a client certificate (`sslcert=…
    /// sslkey=…`), or with a [`password_provider`](BrokerBuilder::password_provider). `sslrootcert=system`
    /// trusts the platform's CAs (and implies `sslmode=verify-full`).
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

    /// The most admin connections the pool opens at once (at least 1). Each `creds`, `renew` and `revoke` holds
    /// one for the duration of its SQL; the sweeper uses the same pool. Connections beyond
    /// [`min_idle`](BrokerBuilder::min_idle) are opened only while there is work, and closed once idle for
    /// [`idle_timeout`](BrokerBuilder::idle_timeout).
    pub fn pool_size(mut self, size: u32) -> BrokerBuilder {
        self.pool_size = size;
        self
    }

    /// How many admin connections the broker keeps open while it has nothing to do (0 to
    /// [`pool_size`](BrokerBuilder::pool_size); default 1). One open connection means a revocation never needs a
    /// new one, even on a server with no free slot; 0 holds none at rest, and every burst of work connects first.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = credbroker::Broker::builder()
    ///     .pool_size(4)
    ///     .min_idle(1)
    ///     .idle_timeout(Duration::from_secs(60));
    /// ```
    pub fn min_idle(mut self, connections: u32) -> BrokerBuilder {
        self.min_idle = connections;
        self
    }

    /// How long an admin connection may sit unused before it is closed (1 second to 24 hours; default 60
    /// seconds). The pool looks every 30 seconds, so an idle connection closes between `idle_timeout` and
    /// `idle_timeout` + 30 s. The [`min_idle`](BrokerBuilder::min_idle) connections kept at rest are used (a
    /// ping) every `idle_timeout / 2`, so they stay open, and are reopened if they broke.
    pub fn idle_timeout(mut self, timeout: Duration) -> BrokerBuilder {
        self.idle_timeout = timeout;
        self
    }

    /// Caps the leases this broker holds, all roles together (at least 1; default: no cap). Once `n` leases are
    /// issued and not yet dropped, [`creds`](Broker::creds) fails with [`ErrorKind::LeaseCap`] and creates
    /// nothing; leases adopted at start count but are never refused. Roles have caps of their own:
    /// [`Role::max_leases`].
    ///
    /// ```
    /// let builder = credbroker::Broker::builder().max_leases(10_000);
    /// ```
    pub fn max_leases(mut self, n: u32) -> BrokerBuilder {
        self.max_leases = Some(n);
        self
    }

    /// How long connecting to PostgreSQL, or waiting for a free pooled connection, may take before failing
    /// (more than zero, at most 1 hour).
    pub fn connect_timeout(mut self, timeout: Duration) -> BrokerBuilder {
        self.connect_timeout = timeout;
        self
    }

    /// The `statement_timeout` of the broker's own (admin) sessions: the longest any one statement it sends may
    /// run before PostgreSQL cancels it (1 ms to 24 hours; default 30 seconds). A revocation cancelled this way
    /// is a failed attempt: the role stays `NOLOGIN` and is retried with backoff. Application connections of a
    /// [`RolePool`] are not affected.
    pub fn statement_timeout(mut self, timeout: Duration) -> BrokerBuilder {
        self.statement_timeout = timeout;
        self
    }

    /// The `lock_timeout` of the broker's admin sessions: the longest a statement waits for a lock held by
    /// another session (a migration or `pg_dump` holding a table that a revoked role owns, say) before it fails
    /// (1 ms to 24 hours; default 5 seconds). Such a revocation is retried with backoff, and other leases are
    /// dropped on time meanwhile.
    pub fn lock_timeout(mut self, timeout: Duration) -> BrokerBuilder {
        self.lock_timeout = timeout;
        self
    }

    /// This broker's name among the instances sharing a database: 1–63 characters of `[A-Za-z0-9_.:@/-]`. It is
    /// written on every role it issues, and recovery at start adopts the roles of the same name. The default,
    /// `<host name>/<executable name>`, survives a restart; give each process that runs at the same time as
    /// another of the same program on the same host a name of its own.
    pub fn instance_name(mut self, name: impl Into<String>) -> BrokerBuilder {
        self.instance_name = Some(name.into());
        self
    }

    /// The `NOLOGIN` role every issued role is made a member of, so the catalog says which roles are
    /// credentials; created by [`build`](BrokerBuilder::build) if missing. Instances that share a marker role
    /// sweep each other's expired roles.
    pub fn marker_role(mut self, name: impl Into<String>) -> BrokerBuilder {
        self.marker_role = name.into();
        self
    }

    /// Who receives the objects a revoked role owned (`REASSIGN OWNED BY … TO owner`); default:
    /// [`DEFAULT_OWNER_ROLE`](crate::DEFAULT_OWNER_ROLE), a `NOLOGIN` role without other rights that
    /// [`build`](BrokerBuilder::build) creates if missing and makes the admin a member of. A role named here must
    /// exist and the admin must have its privileges; [`build`](BrokerBuilder::build) checks, and refuses a
    /// superuser (or the admin when it is one): objects a credential wrote, such as a `SECURITY DEFINER`
    /// function, would then run with the owner's rights. Not the marker role either: its members are the
    /// credentials.
    pub fn reassign_owned_to(mut self, owner: impl Into<String>) -> BrokerBuilder {
        self.reassign_owner = owner.into();
        self
    }

    /// What [`build`](BrokerBuilder::build) does with live roles an earlier run of this instance issued: adopt
    /// them (default) or revoke them all. Expired ones are always dropped.
    pub fn recovery(mut self, mode: RecoveryMode) -> BrokerBuilder {
        self.recovery = mode;
        self
    }

    /// What dropping the [`Broker`] does with the leases it still holds; [`Broker::shutdown`] takes the mode as
    /// an argument instead.
    pub fn shutdown_mode(mut self, mode: ShutdownMode) -> BrokerBuilder {
        self.shutdown_mode = mode;
        self
    }

    /// Whether revocation ends the sessions of the role it drops (default: true, which needs
    /// `pg_signal_backend`). `false` is a degraded mode: an open session outlives the revocation of its role,
    /// with every privilege it had, until it disconnects.
    pub fn terminate_sessions(mut self, terminate: bool) -> BrokerBuilder {
        self.terminate_sessions = terminate;
        self
    }

    /// How often this instance looks for orphans: marked roles that no lease table holds (a crashed instance's,
    /// say), expired for at least this long. Default: 60 seconds.
    pub fn orphan_sweep_interval(mut self, interval: Duration) -> BrokerBuilder {
        self.orphan_interval = interval;
        self
    }

    /// The PBKDF2 iteration count of the SCRAM-SHA-256 verifiers sent for issued passwords (at least 1; default
    /// 4096, RFC 7677's and PostgreSQL's).
    ///
    /// Key stretching slows down guessing a *weak* password from a stolen verifier. The broker's passwords are 32
    /// random characters (191 bits): no number of guesses finds one, stretched or not. Meanwhile PostgreSQL 15
    /// re-derives the key of every new password it stores (about 3.3 ms of server CPU at 4096 iterations), and
    /// every login of a credential costs the client and the server the same again. A count of 1 removes that work
    /// (see the README's benchmark table for the measured effect). Keep the default where a policy or an auditor
    /// asks for it, or where the same verifier format is checked by tools that expect 4096.
    pub fn scram_iterations(mut self, iterations: u32) -> BrokerBuilder {
        self.scram_iterations = iterations;
        self
    }

    /// Where the broker's events go: every lease issued, renewed, rotated, revoked, expired or lost, and every
    /// failed revocation, with lease id, role, username and times (never a password). The default ignores them.
    /// See [`HandleEvent`] for when and where the handler is called.
    pub fn event_handler(mut self, handler: impl HandleEvent) -> BrokerBuilder {
        self.event_handler = Box::new(handler);
        self
    }

    /// How long the broker remembers each role it dropped, to drop it again if a failover brings it back
    /// (1 second to 24 hours; default 5 minutes; at most 100,000 roles, the oldest forgotten first).
    ///
    /// With asynchronous replication a failover loses the transactions the old primary committed last, and a
    /// role revoked then exists again on the promoted replica, with its password. The broker notices a new
    /// primary (its system identifier or timeline differs) on every new admin connection and in a probe every 5
    /// seconds on an idle one, drops again every role it dropped within this window before, and reports every
    /// live lease whose role the new primary lacks ([`HandleEvent::handle_lost`]; `renew` fails with
    /// [`ErrorKind::LeaseLost`]). Make it longer than your replicas' worst lag plus the time a failover takes.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// let broker = credbroker::Broker::builder()
    ///     .connection("host=db1,db2 port=5432,5432 target_session_attrs=read-write user=admin password=secret")
    ///     .failover_window(Duration::from_secs(600))
    ///     .build()?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn failover_window(mut self, window: Duration) -> BrokerBuilder {
        self.failover_window = window;
        self
    }

    /// Connects, runs the pre-flight check of the admin's rights (creating the marker role if missing), recovers
    /// the roles an earlier run of this instance left, and starts the sweeper.
    ///
    /// Fails with [`ErrorKind::InvalidConfig`] for bad settings, [`ErrorKind::SslNotEnabled`] when TLS is
    /// required but the server has no SSL, [`ErrorKind::Tls`] when the certificate check fails,
    /// [`ErrorKind::Connection`] when the server cannot be reached or refuses the login, and
    /// [`ErrorKind::Permission`] listing every right the admin user lacks, each with the `GRANT` that fixes it.
    ///
    /// Inside a tokio runtime it works too, blocking the calling worker thread until the broker is ready (see
    /// the README's "Async services"); with feature `tokio`, `build_async` does not block it.
    pub fn build(self) -> Result<Broker, Error> {
        off_runtime(|| self.build_here())
    }

    /// [`build`](BrokerBuilder::build), on this thread.
    pub(crate) fn build_here(self) -> Result<Broker, Error> {
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
        if self.min_idle > self.pool_size {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "min_idle is {} but pool_size is {}; give a min_idle of at most pool_size (1 is the default)",
                    self.min_idle, self.pool_size
                ),
            ));
        }
        if self.max_leases == Some(0) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "max_leases is 0; give at least 1, or leave it unset for no cap",
            ));
        }
        check_duration(
            "idle_timeout",
            self.idle_timeout,
            Duration::from_secs(1),
            MAX_IDLE_TIMEOUT,
            "Duration::from_secs(60)",
        )?;
        check_duration(
            "connect_timeout",
            self.connect_timeout,
            Duration::from_millis(1),
            MAX_CONNECT_TIMEOUT,
            "Duration::from_secs(10)",
        )?;
        for (setting, value, example) in [
            (
                "statement_timeout",
                self.statement_timeout,
                "Duration::from_secs(30)",
            ),
            ("lock_timeout", self.lock_timeout, "Duration::from_secs(5)"),
        ] {
            check_duration(
                setting,
                value,
                Duration::from_millis(1),
                MAX_STATEMENT_TIMEOUT,
                example,
            )?;
        }
        if self.scram_iterations == 0 {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "scram_iterations is 0; give at least 1 (4096 is the default)",
            ));
        }
        check_duration(
            "orphan_sweep_interval",
            self.orphan_interval,
            Duration::from_millis(1),
            MAX_ORPHAN_INTERVAL,
            "Duration::from_secs(60)",
        )?;
        check_duration(
            "failover_window",
            self.failover_window,
            Duration::from_secs(1),
            failover::MAX_WINDOW,
            "Duration::from_secs(300)",
        )?;
        let instance = match self.instance_name {
            Some(name) => {
                check_instance_name(&name)?;
                name
            }
            None => default_instance_name(),
        };
        check_identifier("marker_role", &self.marker_role)?;
        check_identifier("reassign_owned_to", &self.reassign_owner)?;
        if self.reassign_owner == self.marker_role {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "reassign_owned_to {:?} is the marker role, whose members are the credentials: they would all \
                     get what revoked credentials owned; leave reassign_owned_to unset or name another role",
                    self.reassign_owner
                ),
            ));
        }
        let mut connection = Connection::parse(&source, self.connect_timeout)?
            .with_limits(self.statement_timeout, self.lock_timeout);
        if let Some(provider) = self.password_provider {
            connection = connection.with_password_provider(provider)?;
        }
        drop(source);

        let mut client = connection.connect()?;
        let admin = preflight::check(
            &mut client,
            &Needs {
                owner: &self.reassign_owner,
                marker: &self.marker_role,
                terminate_sessions: self.terminate_sessions,
            },
        )?;
        drop(client);

        let reconnects = Arc::new(Reconnects::default());
        let failover = Arc::new(Failover::new(self.failover_window));
        // Reads every new connection's server identity, to notice a failover.
        let manager = AdminManager {
            connection: connection.clone(),
            reconnects: reconnects.clone(),
            failover: failover.clone(),
        };
        // r2d2's default: three threads for its reaper and background connects, here shared with `keep_idle`.
        let threads = Arc::new(
            ScheduledThreadPool::builder()
                .num_threads(3)
                .thread_name_pattern("credbroker-admin-pool-{}")
                .build(),
        );
        let pool = Pool::builder()
            .max_size(self.pool_size)
            // r2d2's `min_idle` keeps that many connections *idle*: it opens one more whenever the last idle one
            // is checked out, doubling a quiet broker's connections at each operation. So r2d2 keeps none, closes
            // whatever sits idle past `idle_timeout`, and `keep_idle` below holds our `min_idle` open.
            .min_idle(Some(0))
            .idle_timeout(Some(self.idle_timeout))
            .thread_pool(threads.clone())
            // The connection was just verified; a ping before every operation would double the round trips.
            .test_on_check_out(false)
            .connection_timeout(self.connect_timeout)
            .error_handler(Box::new(SpreadReconnects {
                max: RECONNECT_JITTER.min(self.connect_timeout / 2),
            }))
            .build_unchecked(manager);
        log::info!(
            "instance {instance} connected to PostgreSQL at {} as {}{} (sslmode={}), pool of {}",
            connection.target(),
            admin.user,
            if admin.superuser { " (superuser)" } else { "" },
            connection.ssl_mode,
            self.pool_size
        );
        if !self.terminate_sessions {
            log::warn!("terminate_sessions(false): sessions of revoked credentials stay open until they disconnect");
        }

        let ssl_mode = connection.ssl_mode;
        let shared = Arc::new(Shared {
            pool: OffRuntime::new(pool),
            reconnects,
            leases: Leases::new(Events::new(self.event_handler)),
            roles: RwLock::new(BTreeMap::new()),
            policy,
            ssl_mode,
            revoke_settings: RevokeSettings {
                connection,
                owner: self.reassign_owner,
                terminate_sessions: self.terminate_sessions,
            },
            marker: self.marker_role,
            scram_iterations: self.scram_iterations,
            instance,
            orphan_interval: self.orphan_interval,
            failover,
            max_leases: self.max_leases,
            min_idle: self.min_idle,
            op_bound: self
                .connect_timeout
                .saturating_add(self.statement_timeout.saturating_mul(4)),
        });
        if self.min_idle > 0 {
            // Twice per idle timeout, so a kept connection is never idle long enough to be reaped; first after
            // that long, as the build's own statements below open the first connection. A weak reference: the
            // job lives on the pool's threads, which the pool owns.
            let weak = Arc::downgrade(&shared);
            let period = self.idle_timeout / 2;
            threads.execute_at_fixed_rate(period, period, move || {
                if let Some(shared) = weak.upgrade() {
                    shared.keep_idle();
                }
            });
        }
        let recovered = recovery::recover(&shared, self.recovery)?;
        log::info!(
            "recovery: adopted {} live leases, dropped {} roles of earlier runs ({} left to retry)",
            recovered.adopted,
            recovered.dropped,
            recovered.failed
        );
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
            sweeper: Mutex::new(Some(sweeper)),
            shutdown_mode: self.shutdown_mode,
        })
    }
}

/// Checks a role name the builder was given: PostgreSQL truncates identifiers beyond 63 bytes.
fn check_identifier(setting: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 63 || name.contains('\0') {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "{setting} {name:?} must be 1–63 bytes long (PostgreSQL's limit for role names), without NUL"
            ),
        ));
    }
    Ok(())
}

/// Default [`BrokerBuilder::statement_timeout`].
const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default [`BrokerBuilder::lock_timeout`].
const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest [`BrokerBuilder::connect_timeout`].
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest statement and lock timeouts (PostgreSQL takes milliseconds as a 32-bit integer).
const MAX_STATEMENT_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Default [`BrokerBuilder::min_idle`].
const DEFAULT_MIN_IDLE: u32 = 1;
/// Default [`BrokerBuilder::idle_timeout`].
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest [`BrokerBuilder::idle_timeout`].
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Longest [`BrokerBuilder::orphan_sweep_interval`].
const MAX_ORPHAN_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// How long stopping the broker with [`ShutdownMode::Keep`] waits for revocations in flight before leaving
/// them to finish in the background.
pub(crate) const KEEP_SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// State the sweeper and the callers share.
pub(crate) struct Shared {
    /// Dropped off any tokio runtime: dropping it closes its idle connections.
    pool: OffRuntime<Pool<Manager>>,
    /// Whether the pool's connection attempts are failing: then checkouts wait for the attempt under way.
    reconnects: Arc<Reconnects>,
    /// The lease table and every rule about changing it.
    pub(crate) leases: Leases,
    roles: RwLock<BTreeMap<String, Arc<CompiledRole>>>,
    pub(crate) policy: LeasePolicy,
    ssl_mode: SslMode,
    pub(crate) revoke_settings: RevokeSettings,
    /// The marker role every issued role is a member of.
    pub(crate) marker: String,
    /// PBKDF2 rounds of the SCRAM verifiers of issued passwords.
    scram_iterations: u32,
    /// This broker's instance name, written on every role it issues.
    pub(crate) instance: String,
    /// How often the sweeper looks for orphans, and how long past expiry a role must be to count as one.
    pub(crate) orphan_interval: Duration,
    /// The server identity seen, the roles dropped recently and the leases lost, for failovers.
    pub(crate) failover: Arc<Failover>,
    /// The broker's cap on leases in the table, if any.
    max_leases: Option<u32>,
    /// How many admin connections to keep open at rest.
    min_idle: u32,
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
    fn keep_idle(&self) {
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
    fn lost(&self, id: &str, err: Error) -> Error {
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

/// The credential lifecycle, shared by the [`Broker`] and its [`RolePool`](crate::RolePool)s.
impl Shared {
    /// Revokes lease `id` now, or joins the revocation of it in flight; see [`Broker::revoke`].
    pub(crate) fn revoke(&self, id: &str, why: Why) -> Result<(), Error> {
        let started = telemetry::start();
        let result = match self
            .leases
            .claim(id, self.op_bound)
            .map_err(|e| self.lost(id, e))
        {
            Ok(Claim::Claimed(lease)) => revoke_lease(self, &lease, why),
            Ok(Claim::Joined) => Ok(()),
            Ok(Claim::JoinedFailed(err)) | Err(err) => Err(err),
        };
        telemetry::latency(telemetry::REVOKE, started, result.is_ok());
        result
    }

    /// See [`Broker::write_role`].
    pub(crate) fn write_role(&self, name: &str, role: Role) -> Result<(), Error> {
        let compiled = CompiledRole::compile(name, role, self.policy)?;
        compiled.check_for_instance(&self.instance)?;
        let reserved = Reserved {
            marker: &self.marker,
            owner: &self.revoke_settings.owner,
        };
        self.with_client(|client| {
            let group = compiled.role.get_group();
            let group_exists = match group {
                Some(group) => preflight::check_credentials_group(client, name, group, &reserved)?,
                None => true,
            };
            compiled.try_on_server(client, &self.revoke_settings, &self.instance, group_exists)?;
            match group {
                Some(group) => preflight::ensure_credentials_group(
                    client,
                    name,
                    group,
                    group_exists,
                    &reserved,
                ),
                None => Ok(()),
            }
        })??;
        self.roles
            .write()
            .insert(name.to_owned(), Arc::new(compiled));
        log::info!("wrote role {name}");
        Ok(())
    }

    /// See [`Broker::revoke_prefix`].
    pub(crate) fn revoke_prefix(&self, prefix: &str) -> Result<usize, Error> {
        let ids = self.leases.ids_with_prefix(prefix);
        let mut revoked = 0;
        let mut failures = Vec::new();
        // As many batches at once as revocation may use connections.
        for chunk in ids.chunks(BATCH * self.revocation_workers()) {
            // Leases already being revoked (by the sweeper, another thread) are joined one by one below.
            let mut claimed = Vec::new();
            let mut joined = Vec::new();
            for id in chunk {
                match self.leases.try_claim(id) {
                    Some(Ok(lease)) => claimed.push(lease),
                    Some(Err(())) => joined.push(id),
                    None => {}
                }
            }
            let why = Why::Revoke(RevokeCause::Requested);
            for result in revoke_leases(self, &claimed, why) {
                match result {
                    Ok(()) => revoked += 1,
                    Err(e) => failures.push(e),
                }
            }
            for id in joined {
                match self.revoke(id, why) {
                    Ok(()) => revoked += 1,
                    Err(e) if e.kind() == ErrorKind::UnknownLease => {}
                    Err(e) => failures.push(e),
                }
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

    /// See [`Broker::revoke_force`].
    pub(crate) fn revoke_force(&self, id: &str) -> Result<(), Error> {
        let why = Why::Revoke(RevokeCause::Forced);
        let lease = loop {
            match self
                .leases
                .claim(id, self.op_bound)
                .map_err(|e| self.lost(id, e))?
            {
                Claim::Claimed(lease) => break lease,
                Claim::Joined => return Ok(()),
                // Claim it now that the other revocation has let go, and force it.
                Claim::JoinedFailed(_) => {}
            }
        };
        let Err(err) = revoke_lease(self, &lease, why) else {
            return Ok(());
        };
        // `settle` has taken the lease out of the table; now the marker, so that recovery leaves the role alone.
        let unmark = sql::unmark(&self.marker, &lease.username);
        let unmarked = match self.with_client(|client| client.batch_execute(&unmark)) {
            Ok(Ok(())) => "the marker was taken away".to_owned(),
            Ok(Err(e)) => format!("the marker could not be taken away ({})", describe(&e)),
            Err(e) => format!("the marker could not be taken away ({e})"),
        };
        log::warn!(
            "forced revocation: forgot lease {id}, whose role {} could not be dropped: {err}; {unmarked}. \
             The role is NOLOGIN if revocation got that far; drop it by hand (DROP OWNED BY / DROP ROLE {})",
            lease.username,
            escape_identifier(&lease.username)
        );
        Ok(())
    }

    /// See [`Broker::creds`].
    pub(crate) fn creds(&self, name: &str) -> Result<Credential, Error> {
        let started = telemetry::start();
        let result = self.issue(name);
        telemetry::creds_latency(name, started, result.is_ok());
        result
    }

    fn issue(&self, name: &str) -> Result<Credential, Error> {
        check_role_name(name)?;
        if self.leases.is_shut_down() {
            return Err(Error::new(
                ErrorKind::ShutDown,
                format!("cannot issue a credential for role {name:?}: the broker has shut down"),
            ));
        }
        let role = self.current_role(name).ok_or_else(|| unknown_role(name))?;
        // Counted with the table under its lock, before anything is created: released on any failure below.
        let slot = self.leases.reserve(&role, self.max_leases)?;
        let now = SystemTime::now();
        let (issued_at, expires_at, max_expires_at) = role.policy.issue(now);
        let password = role.new_password()?;
        let verifier = scram_verifier(&password, self.scram_iterations)?;
        let expiration = pg_timestamp(expires_at);

        let mut uncertain: Vec<(LeaseMark, String)> = Vec::new();
        let mut attempt = 0;
        let outcome = loop {
            attempt += 1;
            let username = role.new_username(&self.instance, now)?;
            let mark = LeaseMark {
                lease_id: generate_lease_id(name)?,
                role: name.to_owned(),
                instance: self.instance.clone(),
                issued_at,
                max_expires_at,
            };
            let sql =
                Zeroizing::new(self.creation_sql(&role, &username, &verifier, &expiration, &mark));
            let result = self.with_client(|client| {
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
                    if e.code() == Some(&SqlState::DUPLICATE_OBJECT)
                        && attempt < USERNAME_ATTEMPTS =>
                {
                    log::warn!("username {username} was taken; retrying with another");
                }
                Ok(Err(e)) => {
                    let err = Error::postgres(
                        ErrorKind::Database,
                        format!(
                            "could not create a credential for role {name:?}; nothing was created"
                        ),
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
            self.sweep_uncertain(mark, username, &role);
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
        &self,
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
            &self.marker,
            &crate::marker::admin_group(&self.marker),
            username,
            &mark.comment(),
        ));
        sql
    }

    /// Records a creation whose outcome was lost with its connection as an expired lease: the sweeper drops
    /// its role if the transaction committed after all, and forgets the lease either way.
    fn sweep_uncertain(&self, mark: LeaseMark, username: String, role: &Arc<CompiledRole>) {
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
        self.leases.adopt(lease, role);
    }

    /// See [`Broker::renew`].
    pub(crate) fn renew(&self, id: &str, increment: Option<Duration>) -> Result<Lease, Error> {
        let started = telemetry::start();
        let result = self.extend(id, increment);
        telemetry::latency(telemetry::RENEW, started, result.is_ok());
        result
    }

    fn extend(&self, id: &str, increment: Option<Duration>) -> Result<Lease, Error> {
        let turn = self
            .leases
            .begin_renewal(id, self.op_bound)
            .map_err(|e| self.lost(id, e))?;
        let now = SystemTime::now();
        let username = turn.username.clone();
        let role = self
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
        self.with_client(|client| alter_role(client, &sql))?
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
}

/// The credential broker. See the [crate documentation](crate) for a walk-through.
///
/// `Broker` is `Send + Sync`: share it by reference or in an `Arc`. Dropping it stops the sweeper, then does
/// what the builder's [`shutdown_mode`](BrokerBuilder::shutdown_mode) says: by default leases still live are
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
    sweeper: Mutex<Option<JoinHandle<()>>>,
    shutdown_mode: ShutdownMode,
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
    /// A builder with the defaults listed on [`BrokerBuilder`].
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }

    /// Creates or replaces the role `name`.
    ///
    /// The name must be 1–32 characters of `[A-Za-z0-9_-]`. The templates are parsed, then run against the
    /// server in a transaction with sample values and rolled back, so SQL errors (a typo, an unknown group role)
    /// show here and not at the first `creds`. The creation SQL must create a role named `{{name}}` and must not
    /// commit or roll back on its own; a revocation SQL must drop that role. A [group](Role::group) is checked
    /// (and created if missing) here too. Leases already issued under an earlier definition of the role are
    /// renewed and revoked with the new one.
    pub fn write_role(&self, name: &str, role: Role) -> Result<(), Error> {
        off_runtime(|| self.shared.write_role(name, role))
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
    /// `VALID UNTIL` at the lease's end, marks it (membership in the marker role and a comment recording the
    /// lease), in one transaction, and records the lease.
    ///
    /// The password leaves the process only as a SCRAM-SHA-256 verifier. On any failure nothing is left behind:
    /// no role in PostgreSQL, no lease in the table; the error carries PostgreSQL's message. (If the connection
    /// is lost while the transaction commits, the outcome is unknown: the broker then records the attempt as an
    /// expired lease, so the sweeper makes sure its role is gone.)
    pub fn creds(&self, name: &str) -> Result<Credential, Error> {
        off_runtime(|| self.shared.creds(name))
    }

    /// Renews lease `id`: its new end is now plus `increment` (`None`: the role's default lease), capped at the
    /// issue time plus the max lease. PostgreSQL's `VALID UNTIL` moves first, then the lease table.
    ///
    /// Fails with [`ErrorKind::UnknownLease`] for an id not in the table and [`ErrorKind::LeaseExpired`] for a
    /// lease past its end or being revoked.
    pub fn renew(&self, id: &str, increment: Option<Duration>) -> Result<Lease, Error> {
        off_runtime(|| self.shared.renew(id, increment))
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
    /// the lease has left the table, it fails with [`ErrorKind::UnknownLease`].
    pub fn revoke(&self, id: &str) -> Result<(), Error> {
        off_runtime(|| self.shared.revoke(id, Why::Revoke(RevokeCause::Requested)))
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
    /// connection's `application_name` is its lease id (see the README's section on the pool). Fails as
    /// [`creds`](Broker::creds) does, with [`ErrorKind::InvalidConfig`] for bad options, and with
    /// [`ErrorKind::Connection`] if the credential cannot log in.
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
    /// settings where sqlx can honour them, and fails with [`ErrorKind::Tls`] where it cannot (sqlx has no
    /// channel binding, and checks certificates against public CAs too: give `sslmode=verify-full`, `disable`,
    /// or `channel_binding=prefer` as an explicit opt-out). `sslrootcert=system` means sqlx's built-in public CAs.
    /// A connection string with several hosts is refused with [`ErrorKind::InvalidConfig`] (sqlx connects to one
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
        off_runtime(|| self.shared.revoke_prefix(prefix))
    }

    /// Revokes lease `id`, and if its role cannot be dropped, forgets the lease anyway: it leaves the table, the
    /// reason is logged at warn level, and the role loses the marker (so recovery and orphan sweeps leave it
    /// alone too). The role stays `NOLOGIN` if revocation got that far, for an operator to drop by hand. For a
    /// role that an operator has taken out of the broker's hands, or a revocation that can never succeed.
    ///
    /// Fails with [`ErrorKind::UnknownLease`], or with [`ErrorKind::Revocation`] if another revocation of the
    /// lease is still running after the bound on one operation (`connect_timeout` plus four statement
    /// timeouts).
    pub fn revoke_force(&self, id: &str) -> Result<(), Error> {
        off_runtime(|| self.shared.revoke_force(id))
    }

    /// Stops the broker: stops and joins the sweeper, then keeps or revokes the leases still in the table as
    /// `mode` says. With [`ShutdownMode::Revoke`], fails with [`ErrorKind::Revocation`] if some leases could not
    /// be revoked within the timeout (their roles stay fenced by `VALID UNTIL`, for the next start or another
    /// instance to drop).
    pub fn shutdown(self, mode: ShutdownMode) -> Result<(), Error> {
        off_runtime(|| self.stop(mode))
    }

    /// Stops the broker, on this thread; the calls after the first return `Ok` at once.
    pub(crate) fn stop(&self, mode: ShutdownMode) -> Result<(), Error> {
        let Some(sweeper) = self.sweeper.lock().take() else {
            return Ok(());
        };
        let deadline = match mode {
            ShutdownMode::Keep => later(KEEP_SHUTDOWN_WAIT),
            ShutdownMode::Revoke { timeout } => later(timeout),
        };
        self.shared.leases.begin_shutdown(deadline);
        // The sweeper only waits and hands out work, so it returns at once; its workers are waited for below.
        if sweeper.join().is_err() {
            log::error!("the sweeper thread panicked");
        }
        match mode {
            ShutdownMode::Keep => {
                let running = self.shared.leases.wait_for_workers(deadline);
                if running > 0 {
                    log::warn!(
                        "shut down while {running} revocations were still running (blocked or slow); they go on in \
                         the background, each bounded by the statement and lock timeouts"
                    );
                }
                let left = self.shared.leases.len();
                log::info!(
                    "shut down; kept {left} leases: their roles work until VALID UNTIL, and the next start of \
                     instance {} adopts them",
                    self.shared.instance
                );
                Ok(())
            }
            ShutdownMode::Revoke { timeout } => {
                revoke_all(&self.shared, timeout, deadline).map(|_| ())
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Err(err) = off_runtime(|| self.stop(self.shutdown_mode)) {
            log::error!("{err}");
        }
    }
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

/// Runs `sql` as one transaction in one round trip: `BEGIN; …; COMMIT; RESET …` in a single simple query. A statement
/// that fails skips the rest, COMMIT included, and leaves the transaction aborted; it is then rolled back so the
/// pooled connection is clean. (Templates cannot end the transaction early: `write_role` refuses those.)
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

pub(crate) fn unknown_role(name: &str) -> Error {
    Error::new(
        ErrorKind::UnknownRole,
        format!("no role named {name:?} is defined; define it with Broker::write_role"),
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
