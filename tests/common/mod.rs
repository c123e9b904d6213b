//! Helpers shared by the integration tests: a broker on its own throwaway server, and catalog queries.
#![allow(dead_code)] // each test binary uses a different subset

use std::time::{Duration, Instant, SystemTime};

use credbroker::testing::TestPostgres;
use credbroker::{Broker, BrokerBuilder};

/// A broker and its server; the broker is declared first so it is dropped (and its sweeper joined) first.
pub struct Env {
    pub broker: Broker,
    pub pg: TestPostgres,
}

pub fn start() -> Env {
    start_with(|b| b)
}

pub fn start_with(configure: impl FnOnce(BrokerBuilder) -> BrokerBuilder) -> Env {
    start_on(TestPostgres::start().expect("start PostgreSQL"), configure)
}

/// A default broker on a server that logs every statement, every failing one, and every connection.
pub fn start_logging_everything() -> Env {
    let pg = TestPostgres::builder()
        .setting("log_statement", "all")
        .setting("log_min_error_statement", "error")
        .setting("log_connections", "on")
        .start()
        .expect("start PostgreSQL");
    start_on(pg, |b| b)
}

fn start_on(pg: TestPostgres, configure: impl FnOnce(BrokerBuilder) -> BrokerBuilder) -> Env {
    let broker = configure(Broker::builder().connection(pg.connection_string()))
        .build()
        .expect("build broker");
    Env { broker, pg }
}

impl Env {
    pub fn admin(&self) -> postgres::Client {
        self.pg.admin_client().expect("admin login")
    }

    /// Whether a role of that name exists in the catalog.
    pub fn role_exists(&self, name: &str) -> bool {
        role_exists_on(&self.pg, name)
    }

    /// `pg_roles.rolvaliduntil` of a role.
    pub fn valid_until(&self, name: &str) -> Option<SystemTime> {
        self.admin()
            .query_one(
                "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1",
                &[&name],
            )
            .expect("query rolvaliduntil")
            .get(0)
    }

    /// Names of roles whose name starts with `prefix`, sorted.
    pub fn roles_with_prefix(&self, prefix: &str) -> Vec<String> {
        roles_with_prefix(&self.pg, prefix)
    }
}

/// Whether a role of that name exists on `pg`.
pub fn role_exists_on(pg: &TestPostgres, name: &str) -> bool {
    pg.admin_client()
        .expect("admin login")
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .expect("query pg_roles")
        .is_some()
}

/// Runs `f` on a plain thread and returns its result: async tests check the catalog with the blocking client,
/// which panics on a tokio runtime's threads.
pub fn on_plain_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().expect("helper thread"))
}

/// Names of roles on `pg` whose name starts with `prefix`, sorted.
pub fn roles_with_prefix(pg: &TestPostgres, prefix: &str) -> Vec<String> {
    pg.admin_client()
        .expect("admin login")
        .query(
            "SELECT rolname::text FROM pg_roles WHERE starts_with(rolname, $1) ORDER BY 1",
            &[&prefix],
        )
        .expect("query pg_roles")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A loopback port nothing listens on (bound for a moment, then released).
pub fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Polls `condition` every 50 ms until it holds or `limit` passes; returns whether it held.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Roles that carry the broker's default marker, sorted.
pub fn marked_roles(pg: &TestPostgres) -> Vec<String> {
    members_of(pg, credbroker::DEFAULT_MARKER_ROLE)
}

/// The direct members of `role`, sorted.
pub fn members_of(pg: &TestPostgres, role: &str) -> Vec<String> {
    pg.admin_client()
        .expect("admin login")
        .query(
            "SELECT r.rolname::text FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member \
             WHERE m.roleid = (SELECT oid FROM pg_roles WHERE rolname = $1) ORDER BY 1",
            &[&role],
        )
        .expect("query a role's members")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A superuser connection to `database` on `pg`.
pub fn admin_in(pg: &TestPostgres, database: &str) -> postgres::Client {
    pg.login_to(database, pg.admin_user(), pg.admin_password())
        .expect("admin login")
}

/// The owner of table `table` in `database`.
pub fn table_owner(pg: &TestPostgres, database: &str, table: &str) -> String {
    admin_in(pg, database)
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = $1",
            &[&table],
        )
        .expect("query the table's owner")
        .get(0)
}

/// The usernames of a broker's leases, sorted.
pub fn lease_usernames(broker: &Broker) -> Vec<String> {
    let mut names: Vec<String> = broker
        .leases()
        .iter()
        .map(|l| l.username().to_owned())
        .collect();
    names.sort();
    names
}

/// Captures what the crate logs, for the whole test binary.
pub mod logs {
    use std::sync::Once;

    use parking_lot::Mutex;

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
    static INSTALL: Once = Once::new();

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.target().starts_with("credbroker")
        }

        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata()) {
                LINES
                    .lock()
                    .push(format!("{} {}", record.level(), record.args()));
            }
        }

        fn flush(&self) {}
    }

    /// Starts capturing (once per process).
    pub fn install() {
        INSTALL.call_once(|| {
            log::set_logger(&Capture).expect("no other logger");
            log::set_max_level(log::LevelFilter::Trace);
        });
    }

    /// Every line captured so far, as `LEVEL message`.
    pub fn lines() -> Vec<String> {
        LINES.lock().clone()
    }
}

/// A connection string for `user` with `password` on `pg`, without TLS: a broker running as another admin.
pub fn connection_as(pg: &TestPostgres, user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=postgres sslmode=disable",
        pg.port()
    )
}

/// A creation SQL whose credentials may create tables in `public`, so they can come to own objects (the admin
/// needs `CREATE` on the schema `WITH GRANT OPTION` unless it is a superuser).
pub const CREATES_TABLES: &str = r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
    GRANT CREATE ON SCHEMA public TO "{{name}}";"#;

/// Logs in as `creds` and creates table `table`, so that the credential's role owns an object; logs out.
pub fn create_table_as(pg: &TestPostgres, creds: &credbroker::Credential, table: &str) {
    pg.login(creds.username(), creds.password())
        .expect("log in with the credential")
        .batch_execute(&format!("CREATE TABLE {table} (x int)"))
        .expect("create a table as the credential");
}

/// An event handler that records every event as `(kind, lease id)`, in arrival order; clones share the record.
#[derive(Debug, Clone, Default)]
pub struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<(&'static str, String)>>>);

impl Recorder {
    fn push(&self, kind: &'static str, id: &str) {
        self.0.lock().unwrap().push((kind, id.to_owned()));
    }

    /// Every event so far.
    pub fn all(&self) -> Vec<(&'static str, String)> {
        self.0.lock().unwrap().clone()
    }

    /// The kinds of the events of lease `id`, in order.
    pub fn of(&self, id: &str) -> Vec<&'static str> {
        self.all()
            .into_iter()
            .filter(|(_, lease)| lease == id)
            .map(|(kind, _)| kind)
            .collect()
    }
}

impl credbroker::HandleEvent for Recorder {
    fn handle_issued(&self, e: credbroker::IssuedEvent) {
        self.push("issued", e.lease.id());
    }
    fn handle_renewed(&self, e: credbroker::RenewedEvent) {
        self.push("renewed", e.lease.id());
    }
    fn handle_rotated(&self, e: credbroker::RotatedEvent) {
        self.push("rotated away", e.old.id());
        self.push("rotated to", e.new.id());
    }
    fn handle_revoked(&self, e: credbroker::RevokedEvent) {
        let kind = match e.cause {
            credbroker::RevokeCause::Requested => "revoked",
            credbroker::RevokeCause::Forced => "revoked (forced)",
            credbroker::RevokeCause::Rotated => "revoked (rotated)",
            credbroker::RevokeCause::PoolClosed => "revoked (pool closed)",
            credbroker::RevokeCause::Shutdown => "revoked (shutdown)",
            _ => "revoked (other)",
        };
        self.push(kind, e.lease.id());
    }
    fn handle_expired(&self, e: credbroker::ExpiredEvent) {
        assert!(e.revoked_at >= e.lease.expires_at());
        self.push("expired", e.lease.id());
    }
    fn handle_revocation_failed(&self, e: credbroker::RevocationFailedEvent) {
        self.push("revocation failed", e.lease.id());
    }
    fn handle_adopted(&self, e: credbroker::AdoptedEvent) {
        self.push("adopted", e.lease.id());
    }
    fn handle_role_dropped(&self, e: credbroker::RoleDroppedEvent) {
        let kind = match e.cause {
            credbroker::DropCause::Ended => "dropped (ended)",
            credbroker::DropCause::RevokeAll => "dropped (revoke all)",
            credbroker::DropCause::Orphan => "dropped (orphan)",
            _ => "dropped (other)",
        };
        self.push(kind, e.lease_id.as_deref().unwrap_or(&e.username));
    }
}

/// Load on an async pool: four tasks querying through it, a fifth holding connections across rotations.
pub mod load {
    use std::collections::BTreeSet;
    use std::future::Future;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// What a pool under [`run`] for 15 s over 2-second leases rotating every 4 s must show: no error, a
    /// connection held across a rotation, at least 3 users, every retired role dropped (all but `current`) before
    /// its lease's end, and each retired lease issued, rotated away and revoked by the pool.
    pub fn check(env: &super::Env, events: &super::Recorder, load: &Load, current: &str) {
        let errors = load.errors.lock().unwrap();
        assert!(
            errors.is_empty(),
            "{} errors: {:?}; {:?}",
            errors.len(),
            &errors[..errors.len().min(5)],
            env.broker.stats()
        );
        let users = load.users.lock().unwrap().clone();
        eprintln!(
            "{} queries, {} connections held across a rotation, users {users:?}",
            load.queries.load(Ordering::Relaxed),
            load.held_across_rotation.load(Ordering::Relaxed)
        );
        assert!(
            load.held_across_rotation.load(Ordering::Relaxed) >= 1,
            "no connection was held across a rotation"
        );
        assert!(
            users.len() >= 3,
            "current_user took {} values in 15 s: {users:?}",
            users.len()
        );
        let left = || {
            users
                .iter()
                .filter(|u| *u != current && env.role_exists(u))
                .cloned()
                .collect::<Vec<_>>()
        };
        assert!(
            super::eventually(Duration::from_secs(15), || left().is_empty()),
            "retired roles still exist: {:?}",
            left()
        );
        let stats = env.broker.stats();
        assert_eq!(stats.issued, stats.rotated + 1, "{stats:?}");
        assert!(
            stats.rotated >= 2 && stats.renewed >= stats.rotated,
            "{stats:?}"
        );
        assert_eq!(
            (stats.expired, stats.revocation_failures),
            (0, 0),
            "{stats:?}"
        );
        let first = events.all().first().map(|(_, id)| id.clone()).unwrap();
        let history = events.of(&first);
        assert_eq!(history.first(), Some(&"issued"), "{history:?}");
        assert_eq!(
            &history[history.len() - 2..],
            ["rotated away", "revoked (rotated)"],
            "{history:?}"
        );
    }

    /// A multi-thread runtime with two workers, as small as the test machine.
    pub fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    }

    /// What the tasks saw.
    #[derive(Default)]
    pub struct Load {
        pub users: Mutex<BTreeSet<String>>,
        pub errors: Mutex<Vec<String>>,
        pub queries: AtomicUsize,
        /// Connections held by the fifth task while the pool rotated away from their credential.
        pub held_across_rotation: AtomicUsize,
    }

    /// For `time`, four tasks call `query` in a loop (it returns `current_user`), and a fifth calls `hold` (it
    /// holds a connection for a while and returns whether the pool rotated away from it meanwhile).
    pub async fn run<Q, QF, H, HF>(time: Duration, query: Q, hold: H) -> Arc<Load>
    where
        Q: Fn() -> QF + Clone + Send + Sync + 'static,
        QF: Future<Output = Result<String, String>> + Send,
        H: Fn() -> HF + Send + Sync + 'static,
        HF: Future<Output = Result<bool, String>> + Send,
    {
        let load = Arc::new(Load::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (query, load, stop) = (query.clone(), load.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match query().await {
                        Ok(user) => {
                            load.users.lock().unwrap().insert(user);
                            load.queries.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => load.errors.lock().unwrap().push(e),
                    }
                }
            }));
        }
        {
            let (load, stop) = (load.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match hold().await {
                        Ok(true) => {
                            load.held_across_rotation.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => load.errors.lock().unwrap().push(e),
                    }
                }
            }));
        }
        tokio::time::sleep(time).await;
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.expect("a querying task panicked");
        }
        load
    }
}
