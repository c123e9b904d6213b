//! The sqlx pool: a plain `PgPool` whose credential is renewed and rotated under load, on a real server.
#![cfg(feature = "sqlx")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::load::{runtime, Load};
use common::{eventually, Recorder};
use credbroker::testing::TestPostgres;
use credbroker::{Broker, ErrorKind, PoolOptions, Role, SqlxPool};

/// Four tasks query through `pool` for `time`, each on a connection it checks out per query and uses twice (so a
/// connection closed while checked out shows as an error), while a fifth holds one connection for 5 s at a time,
/// across rotations, querying it every 100 ms.
async fn load(pool: &SqlxPool, time: Duration) -> Arc<Load> {
    let (queried, held) = (pool.clone(), pool.clone());
    let query = move || {
        let pool = queried.clone();
        async move {
            let mut conn = pool.acquire().await.map_err(|e| format!("acquire: {e}"))?;
            let (user, pid): (String, i32) =
                sqlx::query_as("SELECT current_user::text, pg_backend_pid() FROM pg_sleep(0.002)")
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(|e| format!("query: {e}"))?;
            let again: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| format!("second query as {user}: {e}"))?;
            assert_eq!(pid, again);
            Ok(user)
        }
    };
    let hold = move || {
        let pool = held.clone();
        async move {
            let mut conn = pool
                .acquire()
                .await
                .map_err(|e| format!("acquire (held): {e}"))?;
            let lease = pool.lease_id();
            for _ in 0..50 {
                sqlx::query("SELECT 1")
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| format!("held connection: {e}"))?;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(pool.lease_id() != lease)
        }
    };
    common::load::run(time, query, hold).await
}

#[test]
fn four_tasks_query_through_rotations_without_an_error() {
    let events = Recorder::default();
    // 2-second leases renewed every second; a rotation every 4 s (6 s before the 10 s max); a retired lease is
    // revoked once its sessions are gone and the 4 s connection timeout has passed since the rotation.
    let env = common::start_with(|b| {
        b.lease(Duration::from_secs(2), Duration::from_secs(10))
            .event_handler(events.clone())
    });
    env.broker.write_role("readonly", Role::new()).unwrap();
    let rt = runtime();
    let options = PoolOptions::new()
        .rotate_before(Duration::from_secs(6))
        .connection_timeout(Duration::from_secs(4));
    let pool = rt
        .block_on(env.broker.sqlx_pool("readonly", options))
        .expect("sqlx pool");
    let load = rt.block_on(load(&pool, Duration::from_secs(15)));

    let current = pool.username();
    common::load::check(&env, &events, &load, &current);
    // The pool's sessions carry their lease id.
    let named = || {
        let sessions = env
            .admin()
            .query(
                "SELECT usename::text, application_name::text FROM pg_stat_activity WHERE usename LIKE 'readonly-%'",
                &[],
            )
            .unwrap();
        let leases = env.broker.leases();
        !sessions.is_empty()
            && sessions.iter().all(|row| {
                let (user, name): (String, String) = (row.get(0), row.get(1));
                leases
                    .iter()
                    .any(|l| l.username() == user && l.id().ends_with(&name) && !name.is_empty())
            })
    };
    assert!(
        eventually(Duration::from_secs(5), named),
        "sessions without their lease id"
    );
    rt.block_on(pool.close());
    drop(pool);
}

#[test]
fn a_pool_whose_lease_is_revoked_from_outside_rotates_and_serves_again() {
    let env = common::start();
    env.broker.write_role("app", Role::new()).unwrap();
    let rt = runtime();
    let pool = rt
        .block_on(env.broker.sqlx_pool("app", PoolOptions::new()))
        .expect("sqlx pool");
    let first = pool.lease_id();
    let first_user = pool.username();
    env.broker.revoke_prefix("postgresql/creds/app/").unwrap();
    assert!(!env.role_exists(&first_user));
    assert!(
        eventually(Duration::from_secs(10), || pool.lease_id() != first),
        "the pool kept a revoked lease"
    );
    let user: String = rt
        .block_on(sqlx::query_scalar("SELECT current_user::text").fetch_one(&*pool))
        .expect("a query after the rotation");
    assert_eq!(user, pool.username());
    assert_eq!(
        Some(user.as_str()),
        pool.lease().as_ref().map(|l| l.username())
    );
    drop(pool);
}

/// A role with a group: sessions run as the group (`current_user`), while the pool knows its connections by
/// their login (`session_user`).
#[test]
fn a_pool_of_a_group_role_logs_in_and_acts_as_the_group() {
    let env = common::start();
    env.broker
        .write_role("grouped", Role::new().group("sqlx_app"))
        .unwrap();
    let rt = runtime();
    let pool = rt
        .block_on(env.broker.sqlx_pool("grouped", PoolOptions::new()))
        .expect("a sqlx pool of a role with a group");
    let (current, session): (String, String) = rt
        .block_on(sqlx::query_as("SELECT current_user::text, session_user::text").fetch_one(&*pool))
        .expect("a query");
    assert_eq!(current, "sqlx_app");
    assert_eq!(session, pool.username());
    drop(pool);
}

/// sqlx connects to one host: a multi-host string is refused with a typed error, and nothing is issued.
#[test]
fn a_multi_host_connection_string_is_refused() {
    let env = common::start();
    let pg = &env.pg;
    let broker = Broker::builder()
        .connection(format!(
            "host=127.0.0.1,127.0.0.1 port={},{} user={} password={} dbname=postgres sslmode=disable \
             target_session_attrs=read-write",
            pg.port(),
            pg.port(),
            pg.admin_user(),
            pg.admin_password()
        ))
        .build()
        .unwrap();
    broker.write_role("app", Role::new()).unwrap();
    let err = runtime()
        .block_on(broker.sqlx_pool("app", PoolOptions::new()))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("several hosts"), "{err}");
    assert_eq!(
        broker.stats().issued,
        0,
        "a refused pool issued a credential"
    );
}

#[test]
fn tls_follows_the_admin_connection_where_sqlx_can() {
    let pg = TestPostgres::builder()
        .tls(true)
        .start()
        .expect("start PostgreSQL");
    let ca = pg.ca_cert().unwrap().display().to_string();
    let rt = runtime();
    // Certificate checked: the pool's sessions are encrypted.
    let verified = format!(
        "host=localhost port={} user={} password={} dbname=postgres sslmode=verify-full sslrootcert={ca}",
        pg.port(),
        pg.admin_user(),
        pg.admin_password()
    );
    assert!(
        pool_uses_tls(&rt, &verified),
        "the pool's session is not encrypted"
    );

    // Certificate unchecked: the admin connection insists on channel binding, which sqlx lacks.
    let broker = Broker::builder()
        .connection(pg.connection_string_with("sslmode=require"))
        .build()
        .unwrap();
    broker.write_role("app", Role::new()).unwrap();
    let err = rt
        .block_on(broker.sqlx_pool("app", PoolOptions::new()))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("channel_binding=prefer"), "{err}");
    assert_eq!(
        broker.stats().issued,
        0,
        "a refused pool issued a credential"
    );
    // ... unless the connection string opts out.
    drop(broker);
    assert!(pool_uses_tls(
        &rt,
        &pg.connection_string_with("sslmode=require channel_binding=prefer")
    ));
}

/// Whether a sqlx pool of a broker on `connection` logs in over TLS.
fn pool_uses_tls(rt: &tokio::runtime::Runtime, connection: &str) -> bool {
    let broker = Broker::builder().connection(connection).build().unwrap();
    broker.write_role("app", Role::new()).unwrap();
    let pool = rt
        .block_on(broker.sqlx_pool("app", PoolOptions::new()))
        .expect("a sqlx pool");
    rt.block_on(
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(&*pool),
    )
    .unwrap()
}

#[test]
fn a_role_that_cannot_log_in_fails_at_open_and_leaves_no_lease() {
    let env = common::start();
    env.broker
        .write_role(
            "nologin",
            Role::new().creation_sql(
                "CREATE ROLE \"{{name}}\" WITH NOLOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';",
            ),
        )
        .unwrap();
    let rt = runtime();
    let err = rt
        .block_on(env.broker.sqlx_pool(
            "nologin",
            PoolOptions::new().connection_timeout(Duration::from_secs(2)),
        ))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    assert!(err.to_string().contains("grants LOGIN"), "{err}");
    assert!(env.broker.leases().is_empty());
    let err = rt
        .block_on(env.broker.sqlx_pool("unknown", PoolOptions::new()))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownRole, "{err}");
}
