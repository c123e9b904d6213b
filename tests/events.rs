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
        [
            "issued",
            "revocation failed",
            "revocation failed",
            "revoked (forced)"
        ]
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
        (3, 2, 2, 1, 2, 0),
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
    let env = common::start_with(|b| b.connect_timeout(Duration::from_secs(3)));
    env.broker
        .write_role(
            "one",
            Role::new().lease(Duration::from_secs(1), Duration::from_secs(60)),
        )
        .unwrap();
    env.broker
        .write_role(
            "two",
            Role::new().lease(Duration::from_secs(2), Duration::from_secs(60)),
        )
        .unwrap();
    let first = env.broker.creds("one").unwrap();
    let second = env.broker.creds("two").unwrap();
    assert_eq!(env.broker.stats().sweeper_lag, Duration::ZERO);

    // The sweeper takes the first lease at its end and waits for a connection that cannot come; the second
    // comes due meanwhile and waits too.
    let pg = &env.pg;
    let lag = std::thread::scope(|s| {
        s.spawn(|| pg.outage(Duration::from_secs(5)).expect("outage"));
        let mut most = Duration::ZERO;
        for _ in 0..40 {
            most = most.max(env.broker.stats().sweeper_lag);
            std::thread::sleep(Duration::from_millis(100));
        }
        most
    });
    assert!(lag >= Duration::from_millis(500), "lag {lag:?}");
    // Back up: both are revoked, and the lag is gone.
    assert!(eventually(Duration::from_secs(15), || {
        env.broker.leases().is_empty()
    }));
    assert!(!env.role_exists(first.username()) && !env.role_exists(second.username()));
    assert_eq!(env.broker.stats().sweeper_lag, Duration::ZERO);
}
