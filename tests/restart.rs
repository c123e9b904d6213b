//! A server restart breaks every pooled connection; the broker's next calls succeed on fresh ones.

mod common;

use std::time::Duration;

use credbroker::Role;

#[test]
fn calls_after_a_server_restart_succeed_on_fresh_connections() {
    // min_idle = pool_size: the pool keeps all its slots open (checked every idle_timeout / 2 = 1 s).
    let env = common::start_with(|b| {
        b.pool_size(4)
            .min_idle(4)
            .idle_timeout(Duration::from_secs(2))
    });
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

#[test]
fn a_database_outage_under_load_fails_calls_clearly_and_leaves_the_table_equal_to_the_catalog() {
    use credbroker::ErrorKind;
    use parking_lot::Mutex;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};

    let env = common::start_with(|b| b.pool_size(4).connect_timeout(Duration::from_secs(2)));
    env.broker.write_role("app", Role::new()).unwrap();
    let stop = AtomicBool::new(false);
    let errors: Mutex<BTreeMap<String, (ErrorKind, String)>> = Mutex::new(BTreeMap::new());
    let ok_calls = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (env, stop, errors, ok_calls) = (&env, &stop, &errors, &ok_calls);
            s.spawn(move || {
                let mut round = 0;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let result = env.broker.creds("app").and_then(|c| {
                        env.broker.renew(c.lease_id(), None)?;
                        if (round + t) % 3 == 0 {
                            env.broker.revoke(c.lease_id())?;
                        }
                        Ok(())
                    });
                    match result {
                        Ok(()) => {
                            ok_calls.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            // One example of each kind of message is enough.
                            let key = format!(
                                "{:?} {}",
                                e.kind(),
                                e.to_string().chars().take(40).collect::<String>()
                            );
                            errors.lock().insert(key, (e.kind(), e.to_string()));
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500));
        let before = ok_calls.load(Ordering::Relaxed);
        env.pg.outage(Duration::from_secs(3)).unwrap();
        std::thread::sleep(Duration::from_secs(3));
        let after = ok_calls.load(Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        assert!(
            before > 0 && after > before,
            "calls succeed again after the restart: {before} then {after}"
        );
    });

    assert!(!errors.lock().is_empty(), "calls during the outage fail");
    for (kind, message) in errors.lock().values() {
        assert!(
            matches!(
                kind,
                ErrorKind::Connection | ErrorKind::Database | ErrorKind::Revocation
            ),
            "{kind:?}: {message}"
        );
        assert!(
            message.contains("PostgreSQL") || message.contains("could not"),
            "the error says what failed: {message}"
        );
    }
    // Whatever the outage cut short, the table and the catalog agree once the sweeper has settled it.
    let agree = || {
        env.broker.failed_leases().is_empty()
            && common::lease_usernames(&env.broker) == common::marked_roles(&env.pg)
    };
    assert!(
        common::eventually(Duration::from_secs(30), agree),
        "table {:?}\ncatalog {:?}",
        common::lease_usernames(&env.broker),
        common::marked_roles(&env.pg)
    );
    assert!(!env.broker.leases().is_empty());
    eprintln!("errors seen during the outage: {:#?}", errors.lock());
}
