//! Lease caps: per role and per broker, counted with the lease table so that concurrent `creds` never overshoot,
//! and nothing is created when a cap is reached.

mod common;

use credbroker::{Broker, ErrorKind, Role};

#[test]
fn a_role_cap_refuses_with_a_typed_error_and_creates_nothing() {
    let env = common::start();
    let broker = &env.broker;
    broker
        .write_role("capped", Role::new().max_leases(2))
        .unwrap();
    broker.write_role("free", Role::new()).unwrap();
    let first = broker.creds("capped").unwrap();
    let _second = broker.creds("capped").unwrap();
    let err = broker.creds("capped").map(|_| ()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LeaseCap);
    let text = err.to_string();
    assert!(
        text.contains(r#"role "capped" has 2 live leases"#) && text.contains("Role::max_leases(2)"),
        "{text}"
    );
    assert_eq!(common::marked_roles(&env.pg).len(), 2, "nothing created");
    assert_eq!(broker.leases().len(), 2);
    // Another role is not held back, and a revoked lease makes room again.
    let _ = broker.creds("free").unwrap();
    broker.revoke(first.lease_id()).unwrap();
    let _ = broker.creds("capped").unwrap();
    assert_eq!(common::marked_roles(&env.pg).len(), 3);
}

#[test]
fn a_broker_cap_counts_every_role() {
    let env = common::start_with(|b| b.max_leases(3));
    let broker = &env.broker;
    broker.write_role("a", Role::new()).unwrap();
    broker.write_role("b", Role::new()).unwrap();
    let _ = broker.creds("a").unwrap();
    let _ = broker.creds("b").unwrap();
    let _ = broker.creds("b").unwrap();
    let err = broker.creds("a").map(|_| ()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LeaseCap);
    assert!(
        err.to_string().contains("BrokerBuilder::max_leases(3)"),
        "{err}"
    );
    assert_eq!(common::marked_roles(&env.pg).len(), 3, "nothing created");
}

#[test]
fn concurrent_creds_never_overshoot_a_cap() {
    let env = common::start_with(|b| b.pool_size(4));
    let broker = &env.broker;
    broker
        .write_role("capped", Role::new().max_leases(5))
        .unwrap();
    let results: Vec<_> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..16)
            .map(|_| scope.spawn(|| broker.creds("capped").map(|c| c.lease_id().to_owned())))
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let issued = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(issued, 5, "{results:?}");
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(err.kind(), ErrorKind::LeaseCap, "{err}");
    }
    assert_eq!(common::marked_roles(&env.pg).len(), 5);
    assert_eq!(broker.stats().live.get("capped"), Some(&5));
}

#[test]
fn a_failed_creds_gives_its_slot_back() {
    let env = common::start();
    let broker = &env.broker;
    env.admin()
        .batch_execute("CREATE TABLE gate (open bool); INSERT INTO gate VALUES (true);")
        .unwrap();
    // Fails (division by zero) once the gate is closed.
    broker
        .write_role(
            "gated",
            Role::new().max_leases(1).creation_sql(
                r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
                   SELECT 1 / (CASE WHEN open THEN 1 ELSE 0 END) FROM gate;"#,
            ),
        )
        .unwrap();
    env.admin()
        .batch_execute("UPDATE gate SET open = false")
        .unwrap();
    for _ in 0..3 {
        let err = broker.creds("gated").map(|_| ()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Database, "{err}");
    }
    env.admin()
        .batch_execute("UPDATE gate SET open = true")
        .unwrap();
    let _ = broker.creds("gated").unwrap();
    assert_eq!(common::marked_roles(&env.pg).len(), 1);
}

#[test]
fn a_zero_cap_is_refused() {
    let env = common::start();
    let err = env
        .broker
        .write_role("none", Role::new().max_leases(0))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("max_leases is 0"), "{err}");
    let err = Broker::builder()
        .connection(env.pg.connection_string())
        .max_leases(0)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("max_leases is 0"), "{err}");
}

/// A pool holds two leases of its role while it rotates: a role capped below 2 cannot have one.
#[test]
fn a_pool_of_a_role_capped_below_two_is_refused() {
    let env = common::start();
    env.broker
        .write_role("single", Role::new().max_leases(1))
        .unwrap();
    let err = env.broker.pool("single").map(|_| ()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("max_leases(1)"), "{err}");
    assert_eq!(env.broker.stats().issued, 0, "nothing issued");
    env.broker
        .write_role("pair", Role::new().max_leases(2))
        .unwrap();
    let pool = env.broker.pool("pair").expect("a pool under a cap of 2");
    drop(pool);
}
