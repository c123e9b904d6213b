//! The application-side pool: connections that always hold a valid credential, across renewals and rotations.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{eventually, Recorder};
use credbroker::{ErrorKind, PoolOptions, Role, RolePool, ShutdownMode};

/// The one text value `sql` returns, on a connection of `pool`.
fn one(pool: &RolePool, sql: &str) -> String {
    pool.get()
        .expect("a connection")
        .query_one(sql, &[])
        .expect("query")
        .get(0)
}

#[test]
fn four_threads_query_through_rotations_without_an_error() {
    let env = common::start_with(|b| b.lease(Duration::from_secs(2), Duration::from_secs(4)));
    env.broker.write_role("readonly", Role::new()).unwrap();
    let pool = env.broker.pool("readonly").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let users = Arc::new(Mutex::new(BTreeSet::new()));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (pool, stop, users, errors, queries) = (
                pool.clone(),
                stop.clone(),
                users.clone(),
                errors.clone(),
                queries.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let result =
                        pool.get()
                            .map_err(|e| format!("get: {e}"))
                            .and_then(|mut client| {
                                client
                                    .query_one(
                                        "SELECT current_user::text, pg_sleep(0.002)::text",
                                        &[],
                                    )
                                    .map(|row| row.get::<_, String>(0))
                                    .map_err(|e| format!("query as {}: {e}", client.username()))
                            });
                    match result {
                        Ok(user) => {
                            users.lock().unwrap().insert(user);
                            queries.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.lock().unwrap().push(e),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(15));
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().expect("a worker thread panicked");
    }

    let errors = errors.lock().unwrap();
    // On failure, the stats say whether a lease of the pool expired (renewal too late) or was revoked.
    assert!(
        errors.is_empty(),
        "{} errors: {:?}; {:?}",
        errors.len(),
        &errors[..errors.len().min(5)],
        env.broker.stats()
    );
    let users = users.lock().unwrap().clone();
    assert!(
        users.len() >= 3,
        "current_user took {} values in 15 s: {users:?}",
        users.len()
    );
    eprintln!(
        "{} queries, {} distinct users",
        queries.load(Ordering::Relaxed),
        users.len()
    );
    // Every retired credential's role is dropped (the current one, and at most one rotated away from in the
    // last instant and still draining, may remain).
    let current = pool.lease().map(|l| l.username().to_owned());
    assert!(
        eventually(Duration::from_secs(5), || {
            users
                .iter()
                .filter(|u| Some(*u) != current.as_ref() && env.role_exists(u))
                .count()
                == 0
        }),
        "retired roles still exist: {:?}",
        users
            .iter()
            .filter(|u| Some(*u) != current.as_ref() && env.role_exists(u))
            .collect::<Vec<_>>()
    );
    // (A revocation leaves the table a moment before it is counted: read the stats once they agree.)
    let settled = || {
        let stats = env.broker.stats();
        let held = stats.live.get("readonly").copied().unwrap_or(0);
        (stats.revoked + held as u64 == stats.issued).then_some((stats, held))
    };
    eventually(Duration::from_secs(2), || settled().is_some());
    let Some((stats, held)) = settled() else {
        panic!("revoked + live != issued: {:?}", env.broker.stats());
    };
    assert!(held <= 2, "the broker holds {held} leases of the role");
    assert!(held >= 1);
    // The counts tell the same story: one credential per rotation plus the first, each retired one revoked (the
    // last perhaps still draining), none left to expire.
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
}

#[test]
fn a_connection_checked_out_across_a_rotation_works_until_returned_then_closes() {
    let events = Recorder::default();
    let env = common::start_with(|b| {
        b.lease(Duration::from_secs(2), Duration::from_secs(6))
            .event_handler(events.clone())
    });
    env.broker.write_role("app", Role::new()).unwrap();
    let pool = env
        .broker
        .pool_with(
            "app",
            PoolOptions::new().rotate_before(Duration::from_secs(3)),
        )
        .unwrap();
    let first_lease = pool.lease_id();
    let mut held = pool.get().unwrap();
    let old_user = held.username().to_owned();
    assert_eq!(held.lease_id(), first_lease);
    let pid: i32 = held
        .query_one("SELECT pg_backend_pid()", &[])
        .unwrap()
        .get(0);

    assert!(
        eventually(Duration::from_secs(10), || pool.lease_id() != first_lease),
        "the pool never rotated"
    );
    assert!(held.is_retired());
    // New connections use the new credential while the old one is still checked out.
    {
        let mut fresh = pool.get().unwrap();
        let user: String = fresh
            .query_one("SELECT current_user::text", &[])
            .unwrap()
            .get(0);
        assert_ne!(user, old_user);
        assert_eq!(fresh.lease_id(), pool.lease_id());
    }
    // The held connection keeps working, and its role is not revoked while it is out.
    std::thread::sleep(Duration::from_millis(500));
    let user: String = held
        .query_one("SELECT current_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(user, old_user);
    assert!(env.role_exists(&old_user));
    assert_eq!(
        events.of(&first_lease).last(),
        Some(&"rotated away"),
        "{:?}",
        events.of(&first_lease)
    );

    // Returned: the pool closes it and the old lease is revoked at once, well before its end.
    drop(held);
    assert!(
        eventually(Duration::from_secs(2), || !env.role_exists(&old_user)),
        "the old role outlived its last connection"
    );
    let sessions: i64 = env
        .admin()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .unwrap()
        .get(0);
    assert_eq!(sessions, 0, "the returned connection was closed");
    let history = events.of(&first_lease);
    assert_eq!(history.first(), Some(&"issued"));
    assert_eq!(
        &history[history.len() - 2..],
        ["rotated away", "revoked (rotated)"],
        "{history:?}"
    );
}

#[test]
fn application_name_names_the_lease() {
    let env = common::start();
    for role in ["readonly", "a_role_name_of_thirty_two_chars_"] {
        env.broker.write_role(role, Role::new()).unwrap();
        let pool = env.broker.pool(role).unwrap();
        let mut client = pool.get().unwrap();
        let (name, user): (String, String) = {
            let row = client
                .query_one(
                    "SELECT application_name::text, usename::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                    &[],
                )
                .unwrap();
            (row.get(0), row.get(1))
        };
        assert_eq!(user, client.username());
        let id = client.lease_id();
        assert!(id.len() > 63 || name == id, "{name} vs {id}");
        assert!(id.ends_with(&name), "{name} vs {id}");
        assert_eq!(name.len(), id.len().min(63));
        // What an operator sees: the session ties to the lease the broker lists.
        let listed: Vec<String> = env
            .broker
            .leases()
            .into_iter()
            .filter(|l| l.id().ends_with(&name))
            .map(|l| l.username().to_owned())
            .collect();
        assert_eq!(listed, [user]);
    }
}

#[test]
fn dropping_the_last_handle_revokes_or_keeps_as_the_mode_says() {
    let events = Recorder::default();
    let env = common::start_with(|b| b.event_handler(events.clone()));
    env.broker.write_role("app", Role::new()).unwrap();

    let pool = env
        .broker
        .pool_with(
            "app",
            PoolOptions::new().on_drop(ShutdownMode::Revoke {
                timeout: Duration::from_secs(5),
            }),
        )
        .unwrap();
    let clone = pool.clone();
    let user = pool.get().unwrap().username().to_owned();
    let id = pool.lease_id();
    drop(pool);
    assert!(env.role_exists(&user), "a clone still holds the pool");
    drop(clone);
    assert!(!env.role_exists(&user));
    assert!(env.broker.lease(&id).is_none());
    assert_eq!(events.of(&id), ["issued", "revoked (pool closed)"]);

    // The broker's default shutdown mode is Keep: the lease stays, unrenewed, for the sweeper at its end.
    let pool = env.broker.pool("app").unwrap();
    let user = pool.get().unwrap().username().to_owned();
    let id = pool.lease_id();
    drop(pool);
    assert!(env.role_exists(&user));
    assert!(env.broker.lease(&id).is_some());
}

#[test]
fn a_pool_uses_the_database_it_is_given() {
    let env = common::start();
    env.admin().batch_execute("CREATE DATABASE other").unwrap();
    env.broker.write_role("app", Role::new()).unwrap();
    let pool = env
        .broker
        .pool_with(
            "app",
            PoolOptions::new().database("other").max_size(2).min_idle(0),
        )
        .unwrap();
    assert_eq!(one(&pool, "SELECT current_database()::text"), "other");
}

#[test]
fn a_pool_whose_lease_is_revoked_from_outside_rotates_at_once() {
    let env = common::start();
    env.broker.write_role("app", Role::new()).unwrap();
    let pool = env.broker.pool("app").unwrap();
    let first = pool.lease_id();
    env.broker.revoke_prefix("postgresql/creds/app/").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || pool.lease_id() != first),
        "the pool kept a revoked lease"
    );
    let user = one(&pool, "SELECT current_user::text");
    assert_eq!(
        Some(user.as_str()),
        pool.lease().as_ref().map(|l| l.username())
    );
}

#[test]
fn a_pool_that_outlives_its_broker_serves_until_its_lease_ends() {
    let common::Env { broker, pg } = common::start();
    broker
        .write_role(
            "app",
            Role::new().lease(Duration::from_secs(1), Duration::from_secs(3)),
        )
        .unwrap();
    let pool = broker
        .pool_with(
            "app",
            PoolOptions::new()
                .max_size(2)
                .min_idle(0)
                .rotate_before(Duration::from_secs(1))
                .connection_timeout(Duration::from_secs(1)),
        )
        .unwrap();
    drop(broker);
    let first = pool.get().unwrap();
    assert!(first.username().starts_with("app-"));
    drop(first);
    // Past the lease's max: the open connection still works (no sweeper ends it), but a new login is refused.
    std::thread::sleep(Duration::from_millis(3500));
    let _open = pool.get().unwrap();
    let err = pool.get().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ShutDown, "{err}");
    assert!(err.to_string().contains("keep the Broker alive"), "{err}");
    drop(pg);
}

#[test]
fn after_a_server_restart_idle_connections_are_checked_and_replaced() {
    let env = common::start();
    env.broker.write_role("app", Role::new()).unwrap();
    let pool = env
        .broker
        .pool_with("app", PoolOptions::new().max_size(4).min_idle(4))
        .unwrap();
    // Four connections in use at once, then idle in the pool.
    let held: Vec<_> = (0..4).map(|_| pool.get().unwrap()).collect();
    drop(held);
    env.pg.restart().expect("restart PostgreSQL");
    // Idle for longer than the pool trusts a connection without a check.
    std::thread::sleep(Duration::from_millis(700));
    for _ in 0..20 {
        assert!(one(&pool, "SELECT current_user::text").starts_with("app-"));
    }
}
