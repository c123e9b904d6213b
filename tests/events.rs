//! Events reach the handler in order for each lease, and `stats()` counts what happened.

mod common;

use std::time::Duration;

use common::{eventually, Recorder};
use credbroker::{ErrorKind, Role};

#[test]
fn events_arrive_in_order_for_each_lease_and_stats_count_them() {
    let events = Recorder::default();
    let env = common::start_with(|b| {
        b.lease(Duration::from_secs(60), Duration::from_secs(600))
            .event_handler(events.clone())
    });
    env.admin()
        .batch_execute("CREATE TABLE revoked (username text)")
        .unwrap();
    env.broker.write_role("app", Role::new()).unwrap();
    env.broker
        .write_role(
            "short",
            Role::new().lease(Duration::from_secs(1), Duration::from_secs(10)),
        )
        .unwrap();
    env.broker
        .write_role(
            "audited",
            Role::new().revocation_sql(
                r#"INSERT INTO revoked VALUES ('{{name}}'); DROP ROLE IF EXISTS "{{name}}";"#,
            ),
        )
        .unwrap();

    let a = env.broker.creds("app").unwrap();
    let b = env.broker.creds("short").unwrap();
    let c = env.broker.creds("audited").unwrap();
    let stats = env.broker.stats();
    assert_eq!(stats.issued, 3);
    assert_eq!(
        stats.live.into_iter().collect::<Vec<_>>(),
        [
            ("app".to_owned(), 1),
            ("audited".to_owned(), 1),
            ("short".to_owned(), 1)
        ]
    );

    env.broker.renew(a.lease_id(), None).unwrap();
    env.broker
        .renew(a.lease_id(), Some(Duration::from_secs(30)))
        .unwrap();
    env.broker.revoke(a.lease_id()).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || env
            .broker
            .lease(b.lease_id())
            .is_none()),
        "the short lease never expired"
    );
    env.admin().batch_execute("DROP TABLE revoked").unwrap();
    let err = env.broker.revoke(c.lease_id()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Revocation);
    assert_eq!(env.broker.stats().failing, 1);
    env.broker.revoke_force(c.lease_id()).unwrap();

    assert_eq!(
        events.of(a.lease_id()),
        ["issued", "renewed", "renewed", "revoked"]
    );
    assert_eq!(events.of(b.lease_id()), ["issued", "expired"]);
    assert_eq!(
        events.of(c.lease_id()),
        ["issued", "revocation failed", "revoked (forced)"]
    );
    let stats = env.broker.stats();
    assert_eq!(
        (
            stats.issued,
            stats.renewed,
            stats.revoked,
            stats.expired,
            stats.revocation_failures,
            stats.failing
        ),
        (3, 2, 2, 1, 1, 0),
        "{stats:?}"
    );
    assert!(stats.live.is_empty(), "{stats:?}");
    assert_eq!(stats.sweeper_lag, Duration::ZERO);
    // Events never carry a password.
    let text = format!("{:?}", events.all());
    for secret in [a.password(), b.password(), c.password()] {
        assert!(!text.contains(secret));
    }
}

#[test]
fn sweeper_lag_shows_leases_waiting_while_the_database_is_down() {
    let env = common::start_with(|b| b.connect_timeout(Duration::from_secs(4)));
    // Leases of 2, 3 and 4 s (they start at a whole second, so each has at least 1, 2 and 3 s left).
    let creds: Vec<_> = (2..=4)
        .map(|secs| {
            let role = format!("r{secs}");
            let lease = Duration::from_secs(secs);
            env.broker
                .write_role(&role, Role::new().lease(lease, Duration::from_secs(60)))
                .unwrap();
            env.broker.creds(&role).unwrap()
        })
        .collect();
    assert_eq!(env.broker.stats().sweeper_lag, Duration::ZERO);

    // The sweeper takes a lease at its end and waits for a connection that cannot come (up to 4 s); the
    // leases that come due meanwhile wait. (Should the first be dropped before the server is down, the second
    // blocks the sweeper and the third waits.)
    let pg = &env.pg;
    let lag = std::thread::scope(|s| {
        s.spawn(|| pg.outage(Duration::from_secs(7)).expect("outage"));
        let mut most = Duration::ZERO;
        for _ in 0..60 {
            most = most.max(env.broker.stats().sweeper_lag);
            std::thread::sleep(Duration::from_millis(100));
        }
        most
    });
    assert!(lag >= Duration::from_millis(500), "lag {lag:?}");
    // Back up: all are revoked, and the lag is gone.
    assert!(eventually(Duration::from_secs(20), || {
        env.broker.leases().is_empty()
    }));
    for c in &creds {
        assert!(!env.role_exists(c.username()));
    }
    assert_eq!(env.broker.stats().sweeper_lag, Duration::ZERO);
}

/// Recovery at start and the orphan sweep report every role they adopt or drop, so an audit log sees each role
/// the broker creates and drops, across restarts.
#[test]
fn roles_adopted_and_dropped_at_start_are_events() {
    use credbroker::testing::TestPostgres;
    use credbroker::{Broker, BrokerBuilder, RecoveryMode};

    let pg = TestPostgres::start().expect("start PostgreSQL");
    let builder = |instance: &str| -> BrokerBuilder {
        Broker::builder()
            .connection(pg.connection_string())
            .instance_name(instance)
            .orphan_sweep_interval(Duration::from_secs(1))
    };
    // Leases end on a whole second (issue time rounded down, plus the lease), so a 1-second lease issued late
    // in a second ended within milliseconds, while its broker still ran, and was dropped by it (seen on CI):
    // 3 seconds leave at least 2 for the brokers to stop.
    let short = Role::new().lease(Duration::from_secs(3), Duration::from_secs(10));
    // An earlier run of instance "a" leaves a live lease and one that ends while no broker runs; instance "b"
    // dies leaving a role that becomes an orphan.
    let earlier = builder("a").build().expect("build a");
    earlier
        .write_role(
            "live",
            Role::new().lease(Duration::from_secs(600), Duration::from_secs(3600)),
        )
        .unwrap();
    earlier.write_role("short", short.clone()).unwrap();
    let live = earlier.creds("live").unwrap();
    let ended = earlier.creds("short").unwrap();
    let dead = builder("b").build().expect("build b");
    dead.write_role("short", short).unwrap();
    let orphan = dead.creds("short").unwrap();
    drop(earlier);
    drop(dead);
    // Past the orphan's end plus the orphan interval, by the server's clock.
    let mut admin = pg.admin_client().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || {
            admin
            .query_one(
                "SELECT now() > rolvaliduntil + interval '1.5 seconds' FROM pg_roles WHERE rolname = $1",
                &[&orphan.username()],
            )
            .unwrap()
            .get::<_, bool>(0)
        }),
        "the orphan's lease never ended"
    );

    let events = Recorder::default();
    let broker = builder("a")
        .event_handler(events.clone())
        .build()
        .expect("restart a");
    assert_eq!(events.of(live.lease_id()), ["adopted"]);
    assert_eq!(events.of(ended.lease_id()), ["dropped (ended)"]);
    assert_eq!(events.of(orphan.lease_id()), ["dropped (orphan)"]);
    assert_eq!(events.all().len(), 3, "{:?}", events.all());
    let stats = broker.stats();
    assert_eq!((stats.adopted, stats.roles_dropped), (1, 2));
    drop(broker);

    let events = Recorder::default();
    let broker = builder("a")
        .recovery(RecoveryMode::RevokeAll)
        .event_handler(events.clone())
        .build()
        .expect("restart a, revoking all");
    assert_eq!(
        events.all(),
        [("dropped (revoke all)", live.lease_id().to_owned())]
    );
    assert_eq!(broker.stats().roles_dropped, 1);
    for username in [live.username(), ended.username(), orphan.username()] {
        assert!(
            admin
                .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&username])
                .unwrap()
                .is_none(),
            "{username} is still there"
        );
    }
}
