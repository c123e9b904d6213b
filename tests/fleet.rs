//! A fleet of brokers on one server: connections held at rest and given back, revocation through a full server,
//! lease caps, and many brokers through a restart.

mod common;

use std::time::Duration;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, ErrorKind, Role};

/// How many sessions with `application_name = app` the server has.
fn sessions(observer: &mut postgres::Client, app: &str) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        )
        .expect("query pg_stat_activity")
        .get(0)
}

fn role_exists(observer: &mut postgres::Client, name: &str) -> bool {
    observer
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .expect("query pg_roles")
        .is_some()
}

/// A creation SQL that takes half a second, so that concurrent `creds` each hold a connection at once.
const SLOW_CREATION: &str = r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
    SELECT pg_sleep(0.5);"#;

#[test]
fn an_idle_broker_holds_one_connection_and_gives_back_the_rest() {
    let pg = TestPostgres::start().unwrap();
    let mut observer = pg.admin_client().unwrap();
    let app = "idle_test";
    let broker = Broker::builder()
        .connection(pg.connection_string_with(&format!("sslmode=disable application_name={app}")))
        .pool_size(4)
        .idle_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    broker
        .write_role("slow", Role::new().creation_sql(SLOW_CREATION))
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(60), || sessions(&mut observer, app)
            == 1),
        "at rest the broker holds min_idle = 1 connection, has {}",
        sessions(&mut observer, app)
    );

    // Work: four creds at once open more connections, up to pool_size.
    let mut peak = 0;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| broker.creds("slow").map(|c| c.lease_id().to_owned())))
            .collect();
        while !workers.iter().all(|w| w.is_finished()) {
            peak = peak.max(sessions(&mut observer, app));
            std::thread::sleep(Duration::from_millis(20));
        }
        for worker in workers {
            worker.join().unwrap().unwrap();
        }
    });
    assert!(
        peak >= 2,
        "four concurrent creds used more than one connection (peak {peak})"
    );

    // Given back: the pool's reaper runs every 30 s and closes connections idle for more than 1 s.
    assert!(
        common::eventually(Duration::from_secs(120), || sessions(&mut observer, app)
            == 1),
        "idle connections closed down to min_idle, still {}",
        sessions(&mut observer, app)
    );
    assert_eq!(broker.leases().len(), 4);
}

#[test]
fn min_idle_zero_holds_no_connection_at_rest_and_still_works() {
    let pg = TestPostgres::start().unwrap();
    let mut observer = pg.admin_client().unwrap();
    let app = "idle_zero";
    let broker = Broker::builder()
        .connection(pg.connection_string_with(&format!("sslmode=disable application_name={app}")))
        .min_idle(0)
        .idle_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    broker.write_role("app", Role::new()).unwrap();
    let creds = broker.creds("app").unwrap();
    assert!(
        common::eventually(Duration::from_secs(120), || sessions(&mut observer, app)
            == 0),
        "no connection held at rest, still {}: {:?}",
        sessions(&mut observer, app),
        observer
            .query(
                "SELECT state, left(query, 60), (now() - backend_start)::text, (now() - state_change)::text \
                 FROM pg_stat_activity WHERE application_name = $1",
                &[&app]
            )
            .map(|rows| rows
                .iter()
                .map(|r| format!(
                    "{:?} {:?} up {:?} since {:?}",
                    r.get::<_, Option<String>>(0),
                    r.get::<_, Option<String>>(1),
                    r.get::<_, Option<String>>(2),
                    r.get::<_, Option<String>>(3)
                ))
                .collect::<Vec<_>>())
    );
    broker.revoke(creds.lease_id()).unwrap();
    assert!(pg.login(creds.username(), creds.password()).is_err());
}

#[test]
fn pool_settings_are_validated() {
    let pg = TestPostgres::start().unwrap();
    let err = Broker::builder()
        .connection(pg.connection_string())
        .pool_size(2)
        .min_idle(3)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(
        err.to_string().contains("min_idle is 3 but pool_size is 2"),
        "{err}"
    );
    for bad in [Duration::ZERO, Duration::from_secs(25 * 3600)] {
        let err = Broker::builder()
            .connection(pg.connection_string())
            .idle_timeout(bad)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains("idle_timeout"), "{err}");
    }
}

/// Whether `err` is PostgreSQL's "sorry, too many clients already" (or "remaining connection slots are reserved").
fn is_too_many_clients(err: &postgres::Error) -> bool {
    err.as_db_error()
        .is_some_and(|db| db.code().code() == "53300")
}

/// A server with 12 connection slots (3 reserved for superusers and, on 16+, 2 more in `reserved_connections`),
/// and an admin that may use a reserve: on 16+ a non-superuser member of `pg_use_reserved_connections`, before
/// that the superuser.
fn server_with_reserve() -> (TestPostgres, String, &'static str) {
    let pg = TestPostgres::builder()
        .setting("max_connections", "12")
        .start()
        .unwrap();
    if pg.major_version().unwrap() < 16 {
        let admin = pg.connection_string();
        return (pg, admin, "admin");
    }
    let mut superuser = pg.admin_client().unwrap();
    // ALTER SYSTEM refuses to run in the implicit transaction of a multi-statement query.
    superuser
        .batch_execute("ALTER SYSTEM SET reserved_connections = 2")
        .unwrap();
    superuser
        .batch_execute(
            "CREATE ROLE broker_admin LOGIN CREATEROLE PASSWORD 'broker-admin-pw-1';
             GRANT pg_signal_backend TO broker_admin;
             GRANT pg_use_reserved_connections TO broker_admin;",
        )
        .unwrap();
    pg.restart().unwrap();
    let admin = common::connection_as(&pg, "broker_admin", "broker-admin-pw-1");
    (pg, admin, "broker_admin")
}

#[test]
fn a_full_server_still_lets_the_broker_revoke_through_the_reserve() {
    common::logs::install();
    let (pg, admin, user) = server_with_reserve();
    let app = "reserve_test";
    let mut observer = pg.admin_client().unwrap();
    observer
        .batch_execute("CREATE ROLE filler LOGIN PASSWORD 'filler-pw-1'")
        .unwrap();
    let broker = Broker::builder()
        .connection(format!("{admin} application_name={app}"))
        .build()
        .unwrap();
    broker.write_role("app", Role::new()).unwrap();
    let creds = broker.creds("app").unwrap();
    assert!(
        !common::logs::lines()
            .iter()
            .any(|l| l.contains(&format!("admin user {user:?} cannot connect"))),
        "pre-flight finds the reserve usable"
    );

    // The broker's idle connection breaks: the revocation below needs a new one.
    observer
        .batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{app}'"
        ))
        .unwrap();
    assert!(common::eventually(Duration::from_secs(30), || {
        sessions(&mut observer, app) == 0
    }));

    // Another client takes every ordinary slot.
    let mut held = Vec::new();
    let refusal = loop {
        match pg.login("filler", "filler-pw-1") {
            Ok(client) => held.push(client),
            Err(e) => break e,
        }
        assert!(held.len() <= 12, "the server never filled up");
    };
    assert!(
        is_too_many_clients(&refusal),
        "the filler was refused for lack of slots: {refusal}"
    );
    assert!(!held.is_empty());

    broker.revoke(creds.lease_id()).unwrap();
    assert!(
        !role_exists(&mut observer, creds.username()),
        "revoked through the reserve"
    );
    assert!(
        sessions(&mut observer, app) >= 1,
        "the broker connected while the ordinary slots were full"
    );
    // The server is still full for ordinary clients.
    let err = pg.login("filler", "filler-pw-1").map(|_| ()).unwrap_err();
    assert!(is_too_many_clients(&err), "{err}");
    drop(held);
}

#[test]
fn pre_flight_says_how_to_configure_the_reserve() {
    common::logs::install();
    let pg = TestPostgres::start().unwrap();
    pg.admin_client()
        .unwrap()
        .batch_execute(
            "CREATE ROLE plain_admin LOGIN CREATEROLE PASSWORD 'plain-admin-pw-1';
             GRANT pg_signal_backend TO plain_admin;",
        )
        .unwrap();
    let _broker = Broker::builder()
        .connection(common::connection_as(
            &pg,
            "plain_admin",
            "plain-admin-pw-1",
        ))
        .build()
        .unwrap();
    let lines = common::logs::lines();
    let advice: Vec<&String> = lines
        .iter()
        .filter(|l| {
            l.starts_with("WARN") && l.contains(r#"admin user "plain_admin" cannot connect"#)
        })
        .collect();
    assert_eq!(advice.len(), 1, "{lines:#?}");
    let expected = if pg.major_version().unwrap() >= 16 {
        // reserved_connections defaults to 0.
        r#"`ALTER SYSTEM SET reserved_connections = 3;` and restart PostgreSQL and `GRANT pg_use_reserved_connections TO "plain_admin";`"#
    } else {
        "before PostgreSQL 16 only superusers may use reserved slots"
    };
    assert!(advice[0].contains(expected), "{}", advice[0]);
}

/// How many brokers make the fleet, and the server's `max_connections`.
const FLEET: usize = 40;
const MAX_CONNECTIONS: &str = "60";

/// A fleet of brokers with default pool settings on `pg`, each with its own instance name and role `app`
/// (leases of `lease`), built one after another as instances come up.
fn fleet(pg: &TestPostgres, app: &str, lease: Duration) -> Vec<Broker> {
    (0..FLEET)
        .map(|i| {
            let broker = Broker::builder()
                .connection(
                    pg.connection_string_with(&format!("sslmode=disable application_name={app}")),
                )
                .instance_name(format!("{app}-{i}"))
                .build()
                .unwrap_or_else(|e| panic!("broker {i}: {e}"));
            broker
                .write_role("app", Role::new().lease(lease, lease))
                .unwrap();
            broker
        })
        .collect()
}

/// Samples the fleet's admin sessions every 50 ms until `stop`; returns the most seen at once.
fn peak_sessions(pg: &TestPostgres, app: &str, stop: &std::sync::atomic::AtomicBool) -> i64 {
    let mut observer = pg.admin_client().unwrap();
    let mut peak = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if let Ok(row) = observer.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&app],
        ) {
            peak = peak.max(row.get(0));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    peak
}

/// Lines of the crate's log that say a connection was refused for lack of slots.
fn too_many_clients_lines() -> usize {
    common::logs::lines()
        .iter()
        .filter(|l| l.contains("too many clients") || l.contains("remaining connection slots"))
        .count()
}

#[test]
fn forty_brokers_issue_and_expire_leases_on_sixty_connections() {
    common::logs::install();
    let pg = TestPostgres::builder()
        .setting("max_connections", MAX_CONNECTIONS)
        .start()
        .unwrap();
    let app = "fleet_expiry";
    let brokers = fleet(&pg, app, Duration::from_secs(2));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (peak, issued) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| peak_sessions(&pg, app, &stop));
        let workers: Vec<_> = brokers
            .iter()
            .map(|broker| {
                scope.spawn(move || {
                    let mut users = Vec::new();
                    for _ in 0..3 {
                        users.push(broker.creds("app").map(|c| c.username().to_owned())?);
                    }
                    Ok::<_, credbroker::Error>(users)
                })
            })
            .collect();
        let issued: Vec<Vec<String>> = workers
            .into_iter()
            .map(|w| w.join().unwrap().expect("creds on a fleet of 40"))
            .collect();
        // Every lease expires and is swept by its own broker.
        let swept = common::eventually(Duration::from_secs(120), || {
            brokers.iter().all(|b| b.leases().is_empty())
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(
            swept,
            "leases left: {}, failed: {:?}",
            brokers.iter().map(|b| b.leases().len()).sum::<usize>(),
            brokers
                .iter()
                .flat_map(|b| b.failed_leases())
                .map(|l| l.last_error().map(str::to_owned))
                .collect::<Vec<_>>()
        );
        (watcher.join().unwrap(), issued)
    });
    let mut observer = pg.admin_client().unwrap();
    for user in issued.iter().flatten() {
        assert!(!role_exists(&mut observer, user), "{user} dropped");
    }
    let stats: u64 = brokers.iter().map(|b| b.stats().expired).sum();
    assert_eq!(stats, 3 * FLEET as u64, "every lease expired, none failed");
    eprintln!(
        "{FLEET} brokers: peak {peak} admin sessions; {} refusals for lack of slots were retried",
        too_many_clients_lines()
    );
}

#[test]
fn forty_brokers_recover_from_a_server_restart() {
    common::logs::install();
    let pg = TestPostgres::builder()
        .setting("max_connections", MAX_CONNECTIONS)
        .start()
        .unwrap();
    let app = "fleet_restart";
    let brokers = fleet(&pg, app, Duration::from_secs(3600));
    let before: Vec<String> = brokers
        .iter()
        .map(|b| b.creds("app").unwrap().lease_id().to_owned())
        .collect();

    let stop = std::sync::atomic::AtomicBool::new(false);
    let restarted = parking_lot::Mutex::new(None::<std::time::Instant>);
    let errors = parking_lot::Mutex::new(Vec::<(std::time::Instant, String)>::new());
    let (mut peak_before, mut peak_after) = (0, 0);
    let watching = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for broker in &brokers {
            let (stop, errors) = (&stop, &errors);
            scope.spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // An error is dated by when its call started: a call that began during the restart may
                    // wait out the 10 s connect timeout before it fails.
                    let started = std::time::Instant::now();
                    let result = broker.creds("app").and_then(|c| {
                        broker.renew(c.lease_id(), None)?;
                        broker.revoke(c.lease_id())
                    });
                    if let Err(e) = result {
                        errors.lock().push((started, e.to_string()));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
        let watcher = scope.spawn(|| peak_sessions(&pg, app, &watching));
        std::thread::sleep(Duration::from_secs(8));
        watching.store(true, std::sync::atomic::Ordering::Relaxed);
        peak_before = watcher.join().unwrap();
        pg.restart().unwrap();
        *restarted.lock() = Some(std::time::Instant::now());
        // Long enough for every broker to go round its loop many times after the restart, under load.
        let watcher = scope.spawn(|| peak_sessions(&pg, app, &stop));
        std::thread::sleep(Duration::from_secs(30));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        peak_after = watcher.join().unwrap();
    });
    let restarted = restarted.lock().expect("restarted");
    let errors = errors.into_inner();
    let late: Vec<&(std::time::Instant, String)> = errors
        .iter()
        .filter(|(at, _)| at.saturating_duration_since(restarted) > Duration::from_secs(10))
        .collect();
    assert!(
        late.is_empty(),
        "errors more than 10 s after the restart: {:?}",
        late.iter().map(|(_, e)| e).collect::<Vec<_>>()
    );
    // Leases issued before the restart are still the brokers' to renew and revoke.
    for (broker, id) in brokers.iter().zip(&before) {
        broker.renew(id, None).unwrap();
        broker.revoke(id).unwrap();
    }
    // Each broker works one call at a time, so it needs one connection (two when its sweeper works at the same
    // moment). The server (60, of which 3 kept for superusers) was full twice: with the sweeper's failover
    // probe opening a connection while the broker's one was at work, every broker kept two; and with reconnect
    // attempts unlimited while the server was down, each asked for up to its whole pool (4) and got them when it
    // came back, so others were refused.
    let full = MAX_CONNECTIONS.parse::<i64>().unwrap() - 3;
    assert!(
        peak_before < full && peak_after < full,
        "admin sessions at once: {peak_before} before the restart, {peak_after} after; the server was full"
    );
    let refused = pg
        .log_contents()
        .unwrap()
        .lines()
        .filter(|l| l.contains("too many clients") || l.contains("remaining connection slots"))
        .count();
    assert_eq!(refused, 0, "connections refused for lack of slots");
    eprintln!(
        "{FLEET} brokers through a restart: {} errors, all within 10 s of it; peak {peak_before} admin sessions \
         before it and {peak_after} after; no connection refused for lack of slots",
        errors.len(),
    );
}
