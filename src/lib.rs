//! `credbroker` hands out dynamic PostgreSQL credentials from inside the application that needs them: the job of
//! HashiCorp Vault's `postgresql` secret backend, as a library, with no server to run.
//!
//! Give a [`Broker`] an admin connection string once, define roles, and call [`Broker::creds`] whenever an
//! instance needs database access. Each call creates a fresh PostgreSQL login role with a random password and a
//! `VALID UNTIL`, and returns a [`Credential`] with its lease. Every instance gets its own SQL username, so a
//! questionable query can be traced to one instance. Renewing a lease moves `VALID UNTIL`; revoking it, or letting
//! it expire, ends the role's sessions and drops the role. A background thread (the sweeper) revokes expired
//! leases on time.
//!
//! # Quick start
//!
//! ```no_run
//! use credbroker::{Broker, Role};
//! use std::time::Duration;
//!
//! let broker = Broker::builder()
//!     .connection("host=localhost user=username password=password sslmode=disable")
//!     .lease(Duration::from_secs(3600), Duration::from_secs(24 * 3600))
//!     .build()?;
//!
//! broker.write_role("production", Role::new())?;
//! let creds = broker.creds("production")?;
//! println!("lease_id       {}", creds.lease_id());
//! println!("lease_duration {}", creds.lease_duration().as_secs());
//! println!("username       {}", creds.username());
//!
//! // Connect with creds.username() and creds.password(), then:
//! broker.renew(creds.lease_id(), Some(Duration::from_secs(1800)))?;
//! broker.revoke(creds.lease_id())?;
//! # Ok::<(), credbroker::Error>(())
//! ```
//!
//! `cargo run --example quickstart` runs this against a throwaway PostgreSQL server.
//!
//! # A pool that always holds a valid credential
//!
//! ```no_run
//! # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
//! let pool = broker.pool("readonly")?; // Clone + Send + Sync; renews and rotates its credential
//! let mut client = pool.get()?; // derefs to postgres::Client, back to the pool on drop
//! let user: String = client.query_one("SELECT current_user::text", &[])?.get(0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [`RolePool`] renews its lease in the background and, before the lease reaches its max, rotates to a new
//! credential without closing a connection that is checked out. [`BrokerBuilder::event_handler`] receives every
//! lease event, and [`Broker::stats`] counts them. `cargo run --example pool` shows a pool across rotations.
//!
//! # Async services
//!
//! Every method works inside a tokio runtime, blocking the calling worker thread for its round trip (see
//! [`Broker`]). With feature `tokio`, `AsyncBroker` has the lifecycle as `async fn`s that leave the worker
//! thread free:
//!
//! ```no_run
//! # #[cfg(feature = "tokio")]
//! # async fn example() -> Result<(), credbroker::Error> {
//! let broker = credbroker::Broker::builder()
//!     .connection("host=localhost user=username password=password")
//!     .build_async()
//!     .await?
//!     .into_async(); // Clone: share it with every handler
//! broker.write_role("web", credbroker::Role::new()).await?;
//! let creds = broker.creds("web").await?;
//! # Ok(()) }
//! ```
//!
//! # Metrics
//!
//! With feature `metrics`, the broker records through the [`metrics`](https://docs.rs/metrics/0.24) facade, so
//! the recorder an application installs (`metrics-exporter-prometheus`, say) exports these without code:
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `credbroker_issued_total` | counter | `role` | credentials issued |
//! | `credbroker_renewed_total` | counter | `role` | renewals that succeeded |
//! | `credbroker_rotated_total` | counter | `role` | pool rotations |
//! | `credbroker_revoked_total` | counter | `role`, `cause` | leases revoked before their end |
//! | `credbroker_expired_total` | counter | `role` | leases the sweeper revoked at their end |
//! | `credbroker_revocation_failures_total` | counter | `role` | failed attempts to drop a role (each retried) |
//! | `credbroker_adopted_total` | counter | `role` | leases of an earlier run adopted at start |
//! | `credbroker_roles_dropped_total` | counter | `cause` | roles without a lease dropped at start, as orphans, or again after a failover |
//! | `credbroker_lost_total` | counter | `role` | leases whose role a failover lost (see `HandleEvent::handle_lost`) |
//! | `credbroker_leases` | gauge | `role` | live leases |
//! | `credbroker_sweeper_lag_seconds` | gauge | | how late the sweeper is |
//! | `credbroker_creds_duration_seconds` | histogram | `role`, `outcome` | `creds` calls |
//! | `credbroker_renew_duration_seconds` | histogram | `outcome` | `renew` calls (pools' included) |
//! | `credbroker_revoke_duration_seconds` | histogram | `outcome` | `revoke` calls (pools' included) |
//!
//! `outcome` is `ok` or `error`; `cause` is a [`RevokeCause`] or a [`DropCause`], as displayed (`requested`,
//! `orphan`, …). Lease ids are never labels. [`Broker::stats`] has the same counts without the feature.
//!
//! # What reaches PostgreSQL
//!
//! Passwords are 32 characters of `[A-Za-z0-9-]` (191 bits) from the operating system's CSPRNG. The broker sends
//! only their SCRAM-SHA-256 verifier, which PostgreSQL stores as given, so the plaintext never appears in the
//! server, its logs or `pg_stat_activity`. By default usernames are
//! `<role lowercased>-<unix seconds>-<16 random [a-z0-9]>`, at most 60 bytes (a username template may use up to
//! 63; PostgreSQL silently truncates beyond 63). `{{expiration}}` is the lease's end in UTC with an explicit
//! offset, so a server in any time zone reads it right.
//!
//! # Module map
//!
//! One file per thing a reader looks for, grouped by topic. The picture has no circle: `broker` imports the
//! modules that do its work, and only `builder` and `asynchronous`, which build and wrap it, import `broker`
//! (`tests/layout.rs` checks both).
//!
//! - `broker`: [`Broker`], the public face of the lifecycle, and the role definitions. `builder`:
//!   [`BrokerBuilder`], every setting and what `build()` does. `asynchronous` (feature `tokio`): `AsyncBroker`.
//! - `issue`: where `creds` creates a role. `renew`: where `VALID UNTIL` moves. `revoke`: where a lease is
//!   revoked before its end, and where every drop of a lease's role goes through. `drop_role`: the statements
//!   that drop a role (one at a time, in every database, or in batches).
//! - `sweeper`: the background thread where leases expire. `shutdown`: keep or revoke leases when the broker
//!   stops. `recovery`: what `build()` does with roles an earlier run left, and the orphan sweep.
//!   `failover`: noticing a new primary; `reconcile`: dropping again the roles a failover brought back.
//! - `pool`: [`RolePool`], the application's connection pool on one role; `rotation`: its thread, where a
//!   pool's lease is renewed and its credential rotated (for every kind of pool). `sqlx_pool` (feature `sqlx`)
//!   and `deadpool_pool` (feature `deadpool`): the same for async pools; `blocking`: how they call the broker.
//! - `shared`: the state all of the above share (admin pool, lease table, roles, settings). `admin_pool`: the
//!   admin connections, one connection attempt at a time.
//! - `leases`: the lease table behind its lock, with the rules of who may renew or revoke a lease when, and the
//!   queue of events. `lease_table`: the compact in-memory table. `lease`: lease time arithmetic.
//! - `events`: [`HandleEvent`], the events and the counters behind [`Stats`]. `telemetry`: the metrics
//!   (feature `metrics`).
//! - `role`: role definitions and their templates (`template`). `credential`: usernames, passwords, SCRAM
//!   verifiers, lease ids; `username`, `password`: their templates and policies.
//! - `marker`: the marker role and lease comment every issued role carries, so the catalog holds the truth.
//!   `owner`: the role that receives a revoked credential's objects. `preflight`: the admin rights `build()`
//!   checks.
//! - `connection`: connection strings and TLS. `sql`: every statement the broker builds. `runtime`: the
//!   blocking API inside a tokio runtime. `backoff`: retry delays with jitter.
//! - `error`: [`Error`] and [`ErrorKind`]. `guide`: the reference, operations and benchmarks pages.
//! - `testing` (feature `testing`): a throwaway PostgreSQL server for tests. `bench_internals` (feature
//!   `bench-internals`, hidden): what this crate's own benches drive.
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod admin_pool;
#[cfg(feature = "tokio")]
mod asynchronous;
mod backoff;
#[cfg(any(feature = "sqlx", feature = "deadpool"))]
mod blocking;
mod broker;
mod builder;
mod connection;
mod credential;
#[cfg(feature = "deadpool")]
mod deadpool_pool;
mod drop_role;
mod error;
mod events;
mod failover;
pub mod guide;
mod issue;
mod lease;
mod lease_table;
mod leases;
mod marker;
mod owner;
mod password;
mod pool;
mod preflight;
mod reconcile;
mod recovery;
mod renew;
mod revoke;
mod role;
mod rotation;
mod runtime;
mod shared;
mod shutdown;
mod sql;
#[cfg(feature = "sqlx")]
mod sqlx_pool;
mod sweeper;
mod telemetry;
mod template;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "bench-internals")]
#[doc(hidden)]
#[path = "bench_internals.rs"]
pub mod __bench;
pub mod username;

#[cfg(feature = "tokio")]
pub use asynchronous::AsyncBroker;
pub use broker::Broker;
pub use builder::BrokerBuilder;
pub use credential::{Credential, DEFAULT_SCRAM_ITERATIONS};
#[cfg(feature = "deadpool")]
pub use deadpool_pool::{DeadpoolClient, DeadpoolManager, DeadpoolPool};
pub use error::{Error, ErrorKind};
pub use events::{
    AdoptedEvent, DropCause, ExpiredEvent, HandleEvent, IssuedEvent, LostEvent, NopEventHandler,
    RenewedEvent, RevocationFailedEvent, RevokeCause, RevokedEvent, RoleDroppedEvent, RotatedEvent,
    Stats,
};
pub use lease::{Lease, MAX_LEASE};
pub use marker::{admin_group, DEFAULT_MARKER_ROLE, MAX_INSTANCE_NAME_LEN};
pub use owner::DEFAULT_OWNER_ROLE;
pub use password::{PasswordPolicy, MAX_PASSWORD_LEN, MIN_PASSWORD_BITS};
pub use pool::{PoolOptions, PooledClient, RolePool};
pub use recovery::RecoveryMode;
pub use role::{Role, DEFAULT_CREATION_SQL, MAX_ROLE_NAME_LEN};
pub use shutdown::ShutdownMode;
#[cfg(feature = "sqlx")]
pub use sqlx_pool::SqlxPool;
pub use username::MIN_RANDOM_CHARS;
