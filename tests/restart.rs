//! A server restart breaks every pooled connection; the broker's next calls succeed on fresh ones.

mod common;

use std::time::Duration;

use credbroker::Role;

#[test]
fn calls_after_a_server_restart_succeed_on_fresh_connections() {
    let env = common::start_with(|b| b.pool_size(4));
    env.broker.write_role("app", Role::new()).unwrap();
    let issued: Vec<_> = (0..4).map(|_| env.broker.creds("app").unwrap()).collect();
    // Let the pool fill all its slots, so that every one of them is broken by the restart.
    assert!(common::eventually(Duration::from_secs(10), || {
        let open: i64 = env
            .admin()
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'credbroker'",
                &[],
            )
            .unwrap()
            .get(0);
        open >= 4
    }));

    env.pg.restart().unwrap();

    let fresh = env.broker.creds("app").expect("creds after restart");
    env.pg.login(fresh.username(), fresh.password()).unwrap();
    let lease = env
        .broker
        .renew(issued[0].lease_id(), None)
        .expect("renew after restart");
    assert_eq!(
        env.valid_until(issued[0].username()),
        Some(lease.expires_at())
    );
    env.broker
        .revoke(issued[1].lease_id())
        .expect("revoke after restart");
    assert!(!env.role_exists(issued[1].username()));
    env.broker
        .write_role("other", Role::new())
        .expect("write_role after restart");
}
