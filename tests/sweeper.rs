//! The sweeper: expired leases are revoked without any call, while other calls keep working.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use credbroker::Role;

#[test]
fn a_two_second_lease_is_swept_without_any_call() {
    let env = common::start();
    env.broker
        .write_role(
            "brief",
            Role::new().lease(Duration::from_secs(2), Duration::from_secs(60)),
        )
        .unwrap();
    let creds = env.broker.creds("brief").unwrap();
    let lease = env.broker.lease(creds.lease_id()).unwrap();
    let mut session = env.pg.login(creds.username(), creds.password()).unwrap();

    // The lease leaves the table last, after the role is dropped and its sessions ended: wait for that.
    let revoked = || env.broker.lease(creds.lease_id()).is_none();
    assert!(
        common::eventually(Duration::from_secs(15), revoked),
        "the lease is revoked after expiry"
    );
    assert!(
        SystemTime::now() >= lease.expires_at(),
        "not before the lease ends"
    );
    assert!(!env.role_exists(creds.username()), "the role is dropped");
    assert!(
        env.pg.login(creds.username(), creds.password()).is_err(),
        "login refused after expiry"
    );
    assert!(
        session.simple_query("SELECT 1").is_err(),
        "the open session was ended too"
    );
}

#[test]
fn creds_keep_working_while_the_sweeper_drains_many_leases() {
    let env = common::start_with(|b| b.pool_size(4));
    env.broker
        .write_role(
            "brief",
            Role::new().lease(Duration::from_secs(1), Duration::from_secs(60)),
        )
        .unwrap();
    env.broker.write_role("long", Role::new()).unwrap();
    let brief: Vec<_> = (0..300)
        .map(|_| env.broker.creds("brief").unwrap())
        .collect();

    let broker = Arc::new(env.broker);
    let sweeping = Arc::new(AtomicBool::new(true));
    let issuer = {
        let (broker, sweeping) = (broker.clone(), sweeping.clone());
        std::thread::spawn(move || {
            let mut issued = 0;
            while sweeping.load(Ordering::Relaxed) {
                let _ = broker.creds("long").expect("creds during a sweep");
                issued += 1;
            }
            issued
        })
    };
    let drained = common::eventually(Duration::from_secs(60), || {
        broker.leases().iter().all(|l| l.role() == "long")
    });
    sweeping.store(false, Ordering::Relaxed);
    let issued = issuer.join().unwrap();
    assert!(drained, "all 300 expired leases were swept");
    assert!(issued > 0);
    assert_eq!(broker.leases().len(), issued);
    for c in &brief {
        assert!(env.pg.login(c.username(), c.password()).is_err());
    }
    assert!(common::roles_with_prefix(&env.pg, "brief-").is_empty());
}

#[test]
fn dropping_the_broker_stops_the_sweeper_and_leaves_live_roles() {
    let env = common::start();
    env.broker.write_role("app", Role::new()).unwrap();
    let creds = env.broker.creds("app").unwrap();
    let common::Env { broker, pg } = env;
    drop(broker);
    // Live leases are not revoked on drop: their roles expire through VALID UNTIL.
    pg.login(creds.username(), creds.password()).unwrap();
}

#[test]
fn twenty_thousand_expired_leases_are_swept_in_bounded_batches() {
    use credbroker::testing::TestPostgres;
    use credbroker::Broker;

    const ROLES: usize = 20_000;
    let pg = TestPostgres::builder()
        .setting("log_statement", "ddl")
        .start()
        .unwrap();
    // 20,000 roles as an earlier run of instance "bulk" left them: marked, with their lease comment, and a
    // VALID UNTIL a little ahead. Created in SQL: issuing them one by one would take minutes of SCRAM hashing.
    let expires = SystemTime::now() + Duration::from_secs(10);
    let at = humantime::format_rfc3339_seconds(expires).to_string();
    let mut admin = pg.admin_client().unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {} NOLOGIN",
            credbroker::DEFAULT_MARKER_ROLE
        ))
        .unwrap();
    for chunk in 0..ROLES / 1000 {
        admin
            .batch_execute(&format!(
                "DO $$ DECLARE u text; BEGIN
                   FOR i IN {first}..{last} LOOP
                     u := 'bulk-1764000000-' || lpad(i::text, 16, '0');
                     EXECUTE format('CREATE ROLE %I LOGIN VALID UNTIL %L', u, '{at}');
                     EXECUTE format('GRANT {marker} TO %I', u);
                     EXECUTE format('COMMENT ON ROLE %I IS %L', u,
                       'credbroker lease=postgresql/creds/bulk/00000000-0000-0000-0000-' || lpad(to_hex(i), 12, '0') ||
                       ' role=bulk instance=bulk issued={at} max={at}');
                   END LOOP; END $$",
                first = chunk * 1000,
                last = chunk * 1000 + 999,
                marker = credbroker::DEFAULT_MARKER_ROLE,
            ))
            .unwrap();
    }
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .instance_name("bulk")
        .build()
        .unwrap();
    let adopted = broker.leases().len();
    assert_eq!(
        adopted, ROLES,
        "build() adopts every live marked role of its instance"
    );
    eprintln!(
        "adopted {adopted} leases, due in {:?}",
        expires.duration_since(SystemTime::now())
    );

    assert!(
        common::eventually(Duration::from_secs(240), || broker.leases().is_empty()),
        "the sweep completes; {} leases left",
        broker.leases().len()
    );
    eprintln!(
        "swept {:?} after expiry",
        SystemTime::now().duration_since(expires)
    );
    assert!(broker.failed_leases().is_empty());
    assert!(common::marked_roles(&pg).is_empty());

    // Every role was dropped by a DROP ROLE of at most 256 names (the bound), never one per transaction.
    let log = pg.log_contents().unwrap();
    let drops: Vec<usize> = log
        .lines()
        .filter_map(|l| {
            l.split_once("statement: DROP ROLE ")
                .map(|(_, names)| names)
        })
        .map(|names| names.matches("\"bulk-").count())
        .filter(|&n| n > 0)
        .collect();
    assert_eq!(drops.iter().sum::<usize>(), ROLES, "adopted {adopted}");
    assert!(drops.iter().all(|&n| n <= 256), "{drops:?}");
    assert!(drops.len() >= ROLES / 256, "{} batches", drops.len());
    assert!(!log.contains("out of shared memory"));
}

#[test]
fn one_role_that_cannot_be_dropped_does_not_hold_back_its_batch() {
    use credbroker::testing::TestPostgres;
    use credbroker::Broker;

    let pg = TestPostgres::start().unwrap();
    pg.admin_client()
        .unwrap()
        .batch_execute(
            "CREATE ROLE manager LOGIN CREATEROLE PASSWORD 'manager-password-1'; GRANT pg_signal_backend TO manager;",
        )
        .unwrap();
    let broker = Broker::builder()
        .connection(common::connection_as(&pg, "manager", "manager-password-1"))
        .build()
        .unwrap();
    broker
        .write_role(
            "brief",
            Role::new().lease(Duration::from_secs(2), Duration::from_secs(60)),
        )
        .unwrap();
    let issued: Vec<_> = (0..6).map(|_| broker.creds("brief").unwrap()).collect();
    // A superuser makes one of them a superuser: a CREATEROLE admin can no longer alter or drop it, so the
    // batch that holds it fails as a whole.
    let stuck = &issued[3];
    pg.admin_client()
        .unwrap()
        .batch_execute(&format!("ALTER ROLE \"{}\" SUPERUSER", stuck.username()))
        .unwrap();

    assert!(
        common::eventually(Duration::from_secs(20), || broker.leases().len() == 1),
        "the other five are dropped one by one after the batch failed"
    );
    for creds in issued.iter().filter(|c| c.lease_id() != stuck.lease_id()) {
        assert!(common::roles_with_prefix(&pg, creds.username()).is_empty());
    }
    assert!(common::eventually(Duration::from_secs(5), || !broker
        .failed_leases()
        .is_empty()));
    let failed = broker.failed_leases();
    assert_eq!(failed[0].id(), stuck.lease_id());
    // The wording differs between versions (15: "must be superuser to alter superuser roles or change superuser
    // attribute"; 16+: "permission denied to alter role"): the SQLSTATE, insufficient_privilege, does not.
    assert!(
        failed[0].last_error().unwrap().contains("42501"),
        "{:?}",
        failed[0].last_error()
    );
}
