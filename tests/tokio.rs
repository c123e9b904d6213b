//! The blocking API called from inside a tokio runtime, in both flavours: every method works (the `postgres`
//! crate's client would panic there: "Cannot start a runtime from within a runtime"), including the drops that
//! close connections (a broker, a pool, a pooled connection of a retired credential).

use std::time::{Duration, Instant};

use credbroker::testing::TestPostgres;
use credbroker::{Broker, ErrorKind, PoolOptions, Role, ShutdownMode};

mod common;
use common::on_plain_thread as blocking;

fn role_exists(pg: &TestPostgres, name: &str) -> bool {
    blocking(|| common::role_exists_on(pg, name))
}

fn current_user(pg: &TestPostgres, user: &str, password: &str) -> String {
    blocking(|| {
        pg.login(user, password)
            .expect("login with the credential")
            .query_one("SELECT current_user::text", &[])
            .expect("SELECT current_user")
            .get(0)
    })
}

/// Every method of the blocking API, from a task of the runtime the test runs in.
async fn every_method_works_inside_the_runtime() {
    let pg = TestPostgres::start().expect("start PostgreSQL");
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .instance_name("tokio-test")
        .build()
        .expect("build inside a runtime");
    let role = Role::new().lease(Duration::from_secs(60), Duration::from_secs(600));
    broker.write_role("app", role.clone()).expect("write_role");

    let creds = broker.creds("app").expect("creds");
    assert_eq!(
        current_user(&pg, creds.username(), creds.password()),
        creds.username()
    );
    let lease = broker
        .renew(creds.lease_id(), Some(Duration::from_secs(120)))
        .expect("renew");
    assert_eq!(broker.lease(creds.lease_id()), Some(lease));
    assert_eq!(broker.stats().renewed, 1);
    broker.revoke(creds.lease_id()).expect("revoke");
    assert!(!role_exists(&pg, creds.username()));

    let a = broker.creds("app").expect("creds a");
    let b = broker.creds("app").expect("creds b");
    assert_eq!(
        broker
            .revoke_prefix("postgresql/creds/app/")
            .expect("revoke_prefix"),
        2
    );
    assert!(!role_exists(&pg, a.username()) && !role_exists(&pg, b.username()));

    let forced = broker.creds("app").expect("creds to force");
    broker
        .revoke_force(forced.lease_id())
        .expect("revoke_force");
    assert!(!role_exists(&pg, forced.username()));

    // A pool: get() works here; the client's own queries block, so they belong on spawn_blocking.
    let pool = broker
        .pool_with("app", PoolOptions::new().max_size(2).min_idle(0))
        .expect("pool");
    let client = pool.get().expect("get");
    let first = client.lease_id().to_owned();
    let client = tokio::task::spawn_blocking(move || {
        let mut client = client;
        let user: String = client
            .query_one("SELECT current_user::text", &[])
            .expect("query on a pooled connection")
            .get(0);
        assert_eq!(user, client.username());
        client
    })
    .await
    .expect("spawn_blocking");
    // Revoked from outside: the connection's session ends, the pool rotates to a new credential.
    broker.revoke(&first).expect("revoke the pool's lease");
    let deadline = Instant::now() + Duration::from_secs(60);
    while pool.lease_id() == first {
        assert!(Instant::now() < deadline, "the pool did not rotate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(client.is_retired());
    // Returned on this runtime thread: the pool closes it, and a postgres::Client's drop blocks.
    drop(client);
    let client = pool.get().expect("get after the rotation");
    assert_ne!(client.lease_id(), first);
    drop(client);
    drop(pool);

    let kept = broker.creds("app").expect("creds to revoke at shutdown");
    broker.delete_role("app").expect("delete_role");
    assert_eq!(
        broker.creds("app").expect_err("deleted role").kind(),
        ErrorKind::UnknownRole
    );
    broker
        .shutdown(ShutdownMode::Revoke {
            timeout: Duration::from_secs(30),
        })
        .expect("shutdown inside a runtime");
    assert!(!role_exists(&pg, kept.username()));

    // Dropped inside the runtime, with a pool's idle connection open: the sweeper stops, connections close.
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .instance_name("tokio-test")
        .build()
        .expect("second build inside a runtime");
    broker.write_role("app", role).expect("write_role");
    let pool = broker.pool("app").expect("pool");
    drop(pool.get().expect("get"));
    drop(pool);
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_api_inside_a_multi_thread_runtime() {
    every_method_works_inside_the_runtime().await;
}

#[tokio::test(flavor = "current_thread")]
async fn blocking_api_inside_a_current_thread_runtime() {
    every_method_works_inside_the_runtime().await;
}

/// A broker built outside a runtime and used from tasks spawned onto one, then dropped by the last task.
#[test]
fn a_broker_shared_with_tasks_is_dropped_by_one() {
    let pg = TestPostgres::start().expect("start PostgreSQL");
    let broker = std::sync::Arc::new(
        Broker::builder()
            .connection(pg.connection_string())
            .build()
            .expect("build"),
    );
    broker.write_role("app", Role::new()).expect("write_role");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let usernames = runtime.block_on(async move {
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let broker = broker.clone();
                tokio::spawn(async move {
                    let creds = broker.creds("app").expect("creds in a task");
                    broker.revoke(creds.lease_id()).expect("revoke in a task");
                    creds.username().to_owned()
                })
            })
            .collect();
        drop(broker);
        let mut usernames = Vec::new();
        for task in tasks {
            usernames.push(task.await.expect("task"));
        }
        usernames
    });
    for username in usernames {
        assert!(!role_exists(&pg, &username));
    }
}
