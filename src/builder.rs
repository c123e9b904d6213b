//! Building a broker: every setting, its default and its check, then what `build()` does (connect, check the
//! admin's rights, open the admin pool, recover the roles an earlier run left, start the sweeper).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use r2d2::Pool;
use scheduled_thread_pool::ScheduledThreadPool;
use zeroize::Zeroizing;

use crate::admin_pool::{AdminManager, Reconnects, SpreadReconnects, RECONNECT_JITTER};
use crate::broker::Broker;
use crate::connection::{Connection, PasswordProvider};
use crate::credential::DEFAULT_SCRAM_ITERATIONS;
use crate::drop_role::RevokeSettings;
use crate::error::{check_duration, Error, ErrorKind};
use crate::events::{Events, HandleEvent, NopEventHandler};
use crate::failover::{self, Failover};
use crate::lease::LeasePolicy;
use crate::leases::Leases;
use crate::marker::{check_instance_name, default_instance_name, DEFAULT_MARKER_ROLE};
use crate::owner::DEFAULT_OWNER_ROLE;
use crate::preflight::{self, Needs};
use crate::recovery::{self, RecoveryMode, DEFAULT_ORPHAN_INTERVAL};
use crate::runtime::{off_runtime, OffRuntime};
use crate::shared::Shared;
use crate::shutdown::ShutdownMode;
use crate::sweeper;

impl Broker {
    /// A builder with the defaults listed on [`BrokerBuilder`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::Broker;
    ///
    /// let broker = Broker::builder()
    ///     .connection("host=db.internal user=credbroker_admin password=secret sslrootcert=/etc/ssl/pg-ca.crt")
    ///     .build()?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    ///
    /// Every setting but the connection string has a default, and the settings are checked before anything is
    /// contacted, so this fails at once:
    ///
    /// ```
    /// use credbroker::{Broker, ErrorKind};
    ///
    /// let err = Broker::builder().build().unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::InvalidConfig); // "no connection string; ..."
    /// ```
    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::default()
    }
}

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
///
/// The setters take and return the builder by value; nothing is checked or contacted until
/// [`build`](BrokerBuilder::build).
///
/// # Examples
///
/// A production configuration: TLS with the server's certificate checked, the admin password from a mounted
/// secret, leases of 15 minutes renewable up to 8 hours, a cap on live leases, and an audit handler:
///
/// ```no_run
/// use credbroker::{Broker, HandleEvent, IssuedEvent, RecoveryMode, ShutdownMode};
/// use std::time::Duration;
///
/// #[derive(Debug)]
/// struct Audit;
///
/// impl HandleEvent for Audit {
///     fn handle_issued(&self, event: IssuedEvent) {
///         println!("issued {} as {}", event.lease.id(), event.lease.username());
///     }
/// }
///
/// let broker = Broker::builder()
///     .connection("host=db.internal dbname=app user=credbroker_admin sslmode=verify-full sslrootcert=system")
///     .password_provider(|| {
///         std::fs::read_to_string("/var/run/secrets/pg-admin/password").map(|p| p.trim_end().to_owned())
///     })
///     .lease(Duration::from_secs(15 * 60), Duration::from_secs(8 * 3600))
///     .max_leases(5_000)
///     .instance_name("orders-api/eu-1")
///     .recovery(RecoveryMode::Adopt)
///     .shutdown_mode(ShutdownMode::Keep)
///     .event_handler(Audit)
///     .build()?;
/// # Ok::<(), credbroker::Error>(())
/// ```
#[must_use = "a BrokerBuilder does nothing until .build()"]
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
    /// The provider runs on a thread of its own, under no lock of the broker's; the login waits for it up to the
    /// connect timeout, then fails (the provider's thread is left to finish). A panic in it is caught and fails the
    /// login the same way, its message not shown. Its password is wiped from the broker's memory after the login (see
    /// [Secrets in memory](crate::guide::operations#in-memory) for the copies the client library keeps) and never
    /// logged; an error it returns, a panic or a timeout fails the connection with [`ErrorKind::PasswordProvider`] (an
    /// error it returns as the source). There is no async variant yet.
    ///
    /// # Examples
    ///
    /// A password file that a secret manager rewrites on rotation, read again at every new admin connection:
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
    ///
    /// # Examples
    ///
    /// The same settings as a `key=value` string and as a URL:
    ///
    /// ```no_run
    /// use credbroker::Broker;
    ///
    /// let broker = Broker::builder()
    ///     .connection("host=db.internal dbname=app user=admin password=secret sslmode=verify-full sslrootcert=ca.crt")
    ///     .build()?;
    /// # drop(broker);
    /// let broker = Broker::builder()
    ///     .connection("postgres://admin:secret@db.internal:5432/app?sslmode=verify-full&sslrootcert=ca.crt")
    ///     .build()?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    ///
    /// Against a local development server without TLS, say so (without `sslmode`, TLS is required):
    ///
    /// ```no_run
    /// let broker = credbroker::Broker::builder()
    ///     .connection("host=localhost user=postgres password=postgres sslmode=disable")
    ///     .build()?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn connection(mut self, connection: impl Into<String>) -> BrokerBuilder {
        self.connection = Some(Zeroizing::new(connection.into()));
        self
    }

    /// The lease a credential gets by default, and the longest a lease may live from its issue, renewals
    /// included. Roles may override both (their max no higher than this max).
    ///
    /// # Examples
    ///
    /// Credentials of 15 minutes, renewable for up to a working day; a default above the max is refused by
    /// [`build`](BrokerBuilder::build) before anything is contacted:
    ///
    /// ```
    /// use credbroker::{Broker, ErrorKind};
    /// use std::time::Duration;
    ///
    /// let builder = Broker::builder().lease(Duration::from_secs(15 * 60), Duration::from_secs(8 * 3600));
    ///
    /// let err = Broker::builder()
    ///     .connection("host=localhost user=username password=password")
    ///     .lease(Duration::from_secs(2 * 3600), Duration::from_secs(3600))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    /// ```
    pub fn lease(mut self, default: Duration, max: Duration) -> BrokerBuilder {
        self.default_lease = default;
        self.max_lease = max;
        self
    }

    /// The most admin connections the pool opens at once (at least 1). Each `creds`, `renew` and `revoke` holds
    /// one for the duration of its SQL; the sweeper uses the same pool. Connections beyond
    /// [`min_idle`](BrokerBuilder::min_idle) are opened only while there is work, and closed once idle for
    /// [`idle_timeout`](BrokerBuilder::idle_timeout).
    ///
    /// # Examples
    ///
    /// A broker that issues credentials from many threads at once needs more than the default 4:
    ///
    /// ```
    /// let builder = credbroker::Broker::builder().pool_size(16);
    /// ```
    ///
    /// Checked by [`build`](BrokerBuilder::build) before anything is contacted:
    ///
    /// ```
    /// use credbroker::{Broker, ErrorKind};
    ///
    /// let err = Broker::builder()
    ///     .connection("host=localhost user=username password=password")
    ///     .pool_size(0)
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    /// ```
    pub fn pool_size(mut self, size: u32) -> BrokerBuilder {
        self.pool_size = size;
        self
    }

    /// How many admin connections the broker keeps open while it has nothing to do (0 to
    /// [`pool_size`](BrokerBuilder::pool_size); default 1). One open connection means a revocation never needs a
    /// new one, even on a server with no free slot; 0 holds none at rest, and every burst of work connects first.
    ///
    /// # Examples
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
    ///
    /// # Examples
    ///
    /// Behind a firewall or load balancer that drops connections idle for five minutes, keep the pings well
    /// inside that:
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = credbroker::Broker::builder().idle_timeout(Duration::from_secs(120));
    /// ```
    pub fn idle_timeout(mut self, timeout: Duration) -> BrokerBuilder {
        self.idle_timeout = timeout;
        self
    }

    /// Caps the leases this broker holds, all roles together (at least 1; default: no cap). Once `n` leases are
    /// issued and not yet dropped, [`creds`](Broker::creds) fails with [`ErrorKind::LeaseCap`] and creates
    /// nothing; leases adopted at start count but are never refused. Roles have caps of their own:
    /// [`Role::max_leases`](crate::Role::max_leases).
    ///
    /// # Examples
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
    ///
    /// # Examples
    ///
    /// Failing fast when the server is unreachable, where the caller has a fallback:
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = credbroker::Broker::builder().connect_timeout(Duration::from_secs(3));
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> BrokerBuilder {
        self.connect_timeout = timeout;
        self
    }

    /// The `statement_timeout` of the broker's own (admin) sessions: the longest any one statement it sends may
    /// run before PostgreSQL cancels it (1 ms to 24 hours; default 30 seconds). A revocation cancelled this way
    /// is a failed attempt: the role stays `NOLOGIN` and is retried with backoff. Application connections of a
    /// [`RolePool`](crate::RolePool) are not affected.
    ///
    /// # Examples
    ///
    /// Revocation SQL that drops many objects a credential owned may take longer than the default 30 seconds:
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = credbroker::Broker::builder().statement_timeout(Duration::from_secs(120));
    /// ```
    pub fn statement_timeout(mut self, timeout: Duration) -> BrokerBuilder {
        self.statement_timeout = timeout;
        self
    }

    /// The `lock_timeout` of the broker's admin sessions: the longest a statement waits for a lock held by
    /// another session (a migration or `pg_dump` holding a table that a revoked role owns, say) before it fails
    /// (1 ms to 24 hours; default 5 seconds). Such a revocation is retried with backoff, and other leases are
    /// dropped on time meanwhile.
    ///
    /// # Examples
    ///
    /// Timeouts for a busy server where DDL waits behind long transactions: give up on a lock sooner, and retry
    /// the revocation later, rather than queue other sessions behind it:
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = credbroker::Broker::builder()
    ///     .connect_timeout(Duration::from_secs(5))
    ///     .statement_timeout(Duration::from_secs(30))
    ///     .lock_timeout(Duration::from_secs(1));
    /// ```
    pub fn lock_timeout(mut self, timeout: Duration) -> BrokerBuilder {
        self.lock_timeout = timeout;
        self
    }

    /// This broker's name among the instances sharing a database: 1–63 characters of `[A-Za-z0-9_.:@/-]`. It is
    /// written on every role it issues, and recovery at start adopts the roles of the same name. The default,
    /// `<host name>/<executable name>`, survives a restart; give each process that runs at the same time as
    /// another of the same program on the same host a name of its own.
    ///
    /// # Examples
    ///
    /// Several workers of one program on one host, each with a name that is the same at its next start (a process
    /// id would not be), so each adopts its own roles:
    ///
    /// ```
    /// let worker = std::env::var("WORKER_INDEX").unwrap_or_else(|_| "0".to_owned());
    /// let builder = credbroker::Broker::builder().instance_name(format!("orders-worker/{worker}"));
    /// ```
    pub fn instance_name(mut self, name: impl Into<String>) -> BrokerBuilder {
        self.instance_name = Some(name.into());
        self
    }

    /// The `NOLOGIN` role every issued role is made a member of, so the catalog says which roles are
    /// credentials; created by [`build`](BrokerBuilder::build) if missing. Instances that share a marker role
    /// sweep each other's expired roles.
    ///
    /// # Examples
    ///
    /// Two independent fleets on one server, each sweeping only its own credentials:
    ///
    /// ```
    /// let builder = credbroker::Broker::builder().marker_role("billing_credentials");
    /// ```
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
    ///
    /// # Examples
    ///
    /// Tables that credentials create (in a scratch schema, say) go to the role that owns the application's
    /// objects, rather than to `credbroker_owner`:
    ///
    /// ```no_run
    /// let broker = credbroker::Broker::builder()
    ///     .connection("host=localhost user=username password=password")
    ///     .reassign_owned_to("app_owner") // must exist, must not be a superuser
    ///     .build()?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn reassign_owned_to(mut self, owner: impl Into<String>) -> BrokerBuilder {
        self.reassign_owner = owner.into();
        self
    }

    /// What [`build`](BrokerBuilder::build) does with live roles an earlier run of this instance issued: adopt
    /// them (default) or revoke them all. Expired ones are always dropped.
    ///
    /// # Examples
    ///
    /// A service whose credentials were handed to processes that do not survive its restart:
    ///
    /// ```no_run
    /// use credbroker::{Broker, RecoveryMode};
    ///
    /// let broker = Broker::builder()
    ///     .connection("host=localhost user=username password=password")
    ///     .recovery(RecoveryMode::RevokeAll)
    ///     .build()?;
    /// assert!(broker.leases().is_empty()); // the last run's live roles were dropped, none adopted
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn recovery(mut self, mode: RecoveryMode) -> BrokerBuilder {
        self.recovery = mode;
        self
    }

    /// What dropping the [`Broker`] does with the leases it still holds; [`Broker::shutdown`] takes the mode as
    /// an argument instead.
    ///
    /// # Examples
    ///
    /// Credentials that must not outlive the process, even when the broker is dropped without
    /// [`Broker::shutdown`]:
    ///
    /// ```no_run
    /// use credbroker::{Broker, ShutdownMode};
    /// use std::time::Duration;
    ///
    /// let broker = Broker::builder()
    ///     .connection("host=localhost user=username password=password")
    ///     .shutdown_mode(ShutdownMode::Revoke { timeout: Duration::from_secs(10) })
    ///     .build()?;
    /// // ...
    /// drop(broker); // revokes every lease still live, for at most 10 seconds
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn shutdown_mode(mut self, mode: ShutdownMode) -> BrokerBuilder {
        self.shutdown_mode = mode;
        self
    }

    /// Whether revocation ends the sessions of the role it drops (default: true, which needs
    /// `pg_signal_backend`). `false` is a degraded mode: an open session outlives the revocation of its role,
    /// with every privilege it had, until it disconnects.
    ///
    /// # Examples
    ///
    /// A managed service where the admin may not be granted `pg_signal_backend`:
    ///
    /// ```no_run
    /// let broker = credbroker::Broker::builder()
    ///     .connection("host=localhost user=username password=password")
    ///     .terminate_sessions(false) // logged as a warning at build
    ///     .build()?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn terminate_sessions(mut self, terminate: bool) -> BrokerBuilder {
        self.terminate_sessions = terminate;
        self
    }

    /// How often this instance looks for orphans: marked roles that no lease table holds (a crashed instance's,
    /// say), expired for at least this long. Default: 60 seconds.
    ///
    /// # Examples
    ///
    /// Many instances on one server: each looks less often, as any of them drops a crashed one's roles:
    ///
    /// ```
    /// # use std::time::Duration;
    /// let builder = credbroker::Broker::builder().orphan_sweep_interval(Duration::from_secs(600));
    /// ```
    pub fn orphan_sweep_interval(mut self, interval: Duration) -> BrokerBuilder {
        self.orphan_interval = interval;
        self
    }

    /// The PBKDF2 iteration count of the SCRAM-SHA-256 verifiers sent for issued passwords (at least 1; default
    /// 4096, RFC 7677's and PostgreSQL's).
    ///
    /// Key stretching slows down guessing a *weak* password from a stolen verifier. The broker's passwords are 32
    /// random characters (191 bits): no number of guesses finds one, stretched or not. Meanwhile PostgreSQL 15
    /// re-derives the key of every new password it stores (about 3.3 ms of server CPU at 4096 iterations), and every
    /// login of a credential costs the client and the server the same again. A count of 1 removes that work (see [the
    /// benchmarks](crate::guide::benchmarks) for the measured effect). Keep the default where a policy or an auditor
    /// asks for it, or where the same verifier format is checked by tools that expect 4096.
    ///
    /// # Examples
    ///
    /// ```
    /// // Issues credentials at a high rate; the passwords are random, so stretching adds nothing.
    /// let builder = credbroker::Broker::builder().scram_iterations(1);
    /// ```
    pub fn scram_iterations(mut self, iterations: u32) -> BrokerBuilder {
        self.scram_iterations = iterations;
        self
    }

    /// Where the broker's events go: every lease issued, renewed, rotated, revoked, expired or lost, and every
    /// failed revocation, with lease id, role, username and times (never a password). The default ignores them.
    /// See [`HandleEvent`] for when and where the handler is called.
    ///
    /// # Examples
    ///
    /// A handler that logs revocations and alerts on failed ones; the methods it leaves out ignore their events:
    ///
    /// ```no_run
    /// use credbroker::{Broker, HandleEvent, RevocationFailedEvent, RevokedEvent};
    ///
    /// #[derive(Debug)]
    /// struct Audit;
    ///
    /// impl HandleEvent for Audit {
    ///     fn handle_revoked(&self, event: RevokedEvent) {
    ///         println!("revoked {} ({}): {}", event.lease.id(), event.lease.username(), event.cause);
    ///     }
    ///
    ///     fn handle_revocation_failed(&self, event: RevocationFailedEvent) {
    ///         // Called on the revoking thread: hand anything slow (a pager call) to a channel.
    ///         eprintln!(
    ///             "could not drop {}: {}",
    ///             event.lease.username(),
    ///             event.lease.last_error().unwrap_or_default()
    ///         );
    ///     }
    /// }
    ///
    /// let broker = Broker::builder()
    ///     .connection("host=localhost user=username password=password")
    ///     .event_handler(Audit)
    ///     .build()?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
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
    /// # Examples
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
    /// Inside a tokio runtime it works too, blocking the calling worker thread until the broker is ready (see [Async
    /// services](crate::guide::reference#async-services)); with feature `tokio`, `build_async` does not block it.
    ///
    /// # Examples
    ///
    /// At start, telling an admin user that lacks rights (the message lists the `GRANT`s to run) from a server
    /// that is not up yet:
    ///
    /// ```no_run
    /// use credbroker::{Broker, ErrorKind};
    /// use std::time::Duration;
    ///
    /// let broker = loop {
    ///     match Broker::builder()
    ///         .connection("host=db.internal user=credbroker_admin password=secret sslrootcert=system")
    ///         .build()
    ///     {
    ///         Ok(broker) => break broker,
    ///         Err(e) if e.kind() == ErrorKind::Connection => {
    ///             eprintln!("{e}; retrying in 5 s");
    ///             std::thread::sleep(Duration::from_secs(5));
    ///         }
    ///         // InvalidConfig, Tls, Permission, ...: retrying will not help.
    ///         Err(e) => return Err(e),
    ///     }
    /// };
    /// # Ok::<(), credbroker::Error>(())
    /// ```
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
