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
