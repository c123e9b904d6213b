//! The deadpool pool: tokio-postgres connections whose credential is renewed and rotated under load, on a real
//! server.
#![cfg(feature = "deadpool")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::load::{runtime, Load};
use common::{eventually, Recorder};
use credbroker::{DeadpoolPool, ErrorKind, PoolOptions, Role, ShutdownMode};

/// Four tasks query through `pool` for `time`, twice per checkout (a connection closed while checked out shows as
/// an error), while a fifth holds one connection for 5 s at a time, querying it every 100 ms.
async fn load(pool: &DeadpoolPool, time: Duration) -> Arc<Load> {
    let (queried, held) = (pool.clone(), pool.clone());
    let query = move || {
        let pool = queried.clone();
        async move {
            let client = pool.get().await.map_err(|e| format!("get: {e}"))?;
            let row = client
                .query_one(
                    "SELECT current_user::text, pg_backend_pid() FROM pg_sleep(0.002)",
                    &[],
                )
                .await
                .map_err(|e| format!("query as {}: {e}", client.username()))?;
            let again: i32 = client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .map_err(|e| format!("second query as {}: {e}", client.username()))?
                .get(0);
            assert_eq!(row.get::<_, i32>(1), again);
            Ok(row.get(0))
        }
    };
    let hold = move || {
        let pool = held.clone();
        async move {
            let client = pool.get().await.map_err(|e| format!("get (held): {e}"))?;
            for _ in 0..50 {
                client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(|e| format!("held connection: {e}"))?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(client.is_retired())
        }
    };
    common::load::run(time, query, hold).await
}

#[test]
fn four_tasks_query_through_rotations_without_an_error() {
    let events = Recorder::default();
    // 2-second leases renewed every second; a rotation every 4 s (6 s before the 10 s max).
    let env = common::start_with(|b| {
        b.lease(Duration::from_secs(2), Duration::from_secs(10))
            .event_handler(events.clone())
    });
    env.broker.write_role("readonly", Role::new()).unwrap();
    let rt = runtime();
    let options = PoolOptions::new().rotate_before(Duration::from_secs(6));
    let pool = rt
        .block_on(env.broker.deadpool("readonly", options))
        .expect("deadpool pool");
    let load = rt.block_on(load(&pool, Duration::from_secs(15)));

    let current = rt.block_on(pool.get()).unwrap().username().to_owned();
    common::load::check(&env, &events, &load, &current);
}

#[test]
fn a_pool_whose_lease_is_revoked_from_outside_rotates_and_serves_again() {
    let env = common::start();
    env.broker.write_role("app", Role::new()).unwrap();
    let rt = runtime();
    let pool = rt
        .block_on(env.broker.deadpool("app", PoolOptions::new()))
        .expect("deadpool pool");
    let first = rt.block_on(pool.get()).unwrap().lease_id().to_owned();
    env.broker.revoke_prefix("postgresql/creds/app/").unwrap();
    assert!(env.broker.lease(&first).is_none());
    // The killed idle connection is not recycled; a new one logs in with the next credential.
    let mut user = String::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            let result = rt.block_on(async {
                let client = pool.get().await.map_err(|e| e.to_string())?;
                let row = client
                    .query_one("SELECT current_user::text", &[])
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((client.lease_id().to_owned(), row.get::<_, String>(0)))
            });
            match result {
                Ok((lease, current)) if lease != first => {
                    user = current;
                    true
                }
                _ => false,
            }
        }),
        "the pool never served again"
    );
    assert!(env.broker.leases().iter().any(|l| l.username() == user));
}

#[test]
fn dropping_the_pool_revokes_its_lease_when_asked_and_bad_roles_fail_at_open() {
    let env = common::start();
    env.broker.write_role("app", Role::new()).unwrap();
    let rt = runtime();
    let options = PoolOptions::new().on_drop(ShutdownMode::Revoke {
        timeout: Duration::from_secs(5),
    });
    let pool = rt
        .block_on(env.broker.deadpool("app", options))
        .expect("deadpool pool");
    let user = rt.block_on(pool.get()).unwrap().username().to_owned();
    let clone = pool.clone();
    drop(pool);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(env.role_exists(&user), "a clone still holds the pool");
    drop(clone);
    assert!(
        eventually(Duration::from_secs(10), || !env.role_exists(&user)),
        "the dropped pool's role remains"
    );

    env.broker
        .write_role(
            "nologin",
            Role::new().creation_sql(
                "CREATE ROLE \"{{name}}\" WITH NOLOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            ),
        )
        .unwrap();
    let before = env.broker.leases().len();
    let err = rt
        .block_on(env.broker.deadpool("nologin", PoolOptions::new()))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.to_string().contains("grants LOGIN"), "{err}");
    assert_eq!(
        env.broker.leases().len(),
        before,
        "a refused pool kept its lease"
    );
}
