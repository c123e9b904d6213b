//! The async API (feature `tokio`): the lifecycle as `async fn`s on the same broker as the blocking API, never
//! holding a runtime worker thread for a database round trip.
#![cfg(feature = "tokio")]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};
use std::time::{Duration, Instant};

use credbroker::testing::TestPostgres;
use credbroker::{AsyncBroker, Broker, ErrorKind, PoolOptions, Role, ShutdownMode};

mod common;
use common::on_plain_thread as blocking;

fn role_exists(pg: &TestPostgres, name: &str) -> bool {
    blocking(|| common::role_exists_on(pg, name))
}

fn roles_with_prefix(pg: &TestPostgres, prefix: &str) -> Vec<String> {
    blocking(|| common::roles_with_prefix(pg, prefix))
}

async fn start(pg: &TestPostgres) -> AsyncBroker {
    Broker::builder()
        .connection(pg.connection_string())
        .lock_timeout(Duration::from_secs(60))
        .build_async()
        .await
        .expect("build_async")
        .into_async()
}

/// Waits (bounded) for `done`.
async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn lifecycle() {
    let pg = TestPostgres::start().expect("start PostgreSQL");
    let broker = start(&pg).await;
    let role = Role::new().lease(Duration::from_secs(60), Duration::from_secs(600));
    broker.write_role("app", role).await.expect("write_role");
    assert_eq!(broker.roles(), ["app"]);
    assert!(broker.role("app").is_some());

    let creds = broker.creds("app").await.expect("creds");
    let user: String = blocking(|| {
        pg.login(creds.username(), creds.password())
            .expect("login with the credential")
            .query_one("SELECT current_user::text", &[])
            .expect("SELECT current_user")
            .get(0)
    });
    assert_eq!(user, creds.username());
    let before = broker.lease(creds.lease_id()).expect("lease in the table");
    let renewed = broker
        .renew(creds.lease_id(), Some(Duration::from_secs(300)))
        .await
        .expect("renew");
    assert!(renewed.expires_at() > before.expires_at());
    // The same broker behind both APIs: one lease table.
    assert_eq!(broker.broker().lease(creds.lease_id()), Some(renewed));
    assert_eq!(broker.leases().len(), 1);
    broker.revoke(creds.lease_id()).await.expect("revoke");
    assert!(!role_exists(&pg, creds.username()));
    assert_eq!(
        broker
            .revoke(creds.lease_id())
            .await
            .expect_err("gone")
            .kind(),
        ErrorKind::UnknownLease
    );

    let a = broker.creds("app").await.expect("creds a");
    // Issued by the blocking API, revoked by the async one.
    let b = broker.broker().creds("app").expect("creds b");
    assert_eq!(
        broker
            .revoke_prefix("postgresql/creds/app/")
            .await
            .expect("revoke_prefix"),
        2
    );
    assert!(!role_exists(&pg, a.username()) && !role_exists(&pg, b.username()));
    let forced = broker.creds("app").await.expect("creds to force");
    broker
        .revoke_force(forced.lease_id())
        .await
        .expect("revoke_force");
    assert!(!role_exists(&pg, forced.username()));
    assert!(broker.failed_leases().is_empty());

    let pool = broker
        .pool_with("app", PoolOptions::new().max_size(1).min_idle(0))
        .await
        .expect("pool_with");
    let pool_user = pool.get().expect("get").username().to_owned();
    drop(pool); // the broker's default shutdown mode keeps the pool's lease
    assert!(role_exists(&pg, &pool_user));

    let stats = broker.stats();
    assert_eq!((stats.issued, stats.renewed, stats.revoked), (5, 1, 4));

    broker.delete_role("app").await.expect("delete_role");
    assert_eq!(
        broker.creds("app").await.expect_err("deleted role").kind(),
        ErrorKind::UnknownRole
    );
    let other = broker.clone();
    broker
        .shutdown(ShutdownMode::Revoke {
            timeout: Duration::from_secs(30),
        })
        .await
        .expect("shutdown");
    assert!(!role_exists(&pg, &pool_user));
    // Every handle sees the shutdown.
    assert_eq!(
        other.creds("app").await.expect_err("shut down").kind(),
        ErrorKind::ShutDown
    );
    other
        .shutdown(ShutdownMode::Keep)
        .await
        .expect("second shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_a_multi_thread_runtime() {
    lifecycle().await;
}

#[tokio::test(flavor = "current_thread")]
async fn lifecycle_on_a_current_thread_runtime() {
    lifecycle().await;
}

/// The one sweeper expires leases issued through the async API.
#[tokio::test(flavor = "current_thread")]
async fn the_sweeper_expires_async_leases() {
    let pg = TestPostgres::start().expect("start PostgreSQL");
    let broker = start(&pg).await;
    broker
        .write_role(
            "short",
            Role::new().lease(Duration::from_secs(1), Duration::from_secs(2)),
        )
        .await
        .expect("write_role");
    let creds = broker.creds("short").await.expect("creds");
    wait_for("the sweeper to expire the lease", || {
        broker.lease(creds.lease_id()).is_none()
    })
    .await;
    assert!(!role_exists(&pg, creds.username()));
    assert_eq!(broker.stats().expired, 1);
}

/// On a current-thread runtime, a renewal waits on a lock that only another task of the same thread releases.
/// Had the renewal held the thread for its round trip, that task could not run: the renewal would fail at the
/// lock timeout instead.
#[tokio::test(flavor = "current_thread")]
async fn a_round_trip_leaves_the_worker_thread_free() {
    let pg = TestPostgres::start().expect("start PostgreSQL");
    let broker = start(&pg).await;
    broker
        .write_role("app", Role::new())
        .await
        .expect("write_role");
    let creds = broker.creds("app").await.expect("creds");

    // Another session changes the same role in a transaction left open until told to commit.
    let (locked_tx, locked) = tokio::sync::oneshot::channel();
    let (commit, commit_rx) = std::sync::mpsc::channel::<()>();
    let username = creds.username().to_owned();
    let mut admin = blocking(|| pg.admin_client().expect("admin login"));
    let holder = {
        std::thread::spawn(move || {
            let mut tx = admin.transaction().expect("BEGIN");
            tx.batch_execute(&format!("ALTER ROLE \"{username}\" CONNECTION LIMIT 5"))
                .expect("ALTER ROLE");
            locked_tx.send(()).expect("signal");
            commit_rx
                .recv_timeout(Duration::from_secs(120))
                .expect("told to commit");
            tx.commit().expect("COMMIT");
        })
    };
    locked.await.expect("the other session holds the role");
    let renew = broker.renew(creds.lease_id(), None);
    let release = async {
        // Give the renewal time to reach the server and wait on the lock (it succeeds either way).
        tokio::time::sleep(Duration::from_millis(200)).await;
        commit.send(()).expect("commit");
    };
    let (renewed, ()) = tokio::join!(renew, release);
    renewed.expect("renew after the other session committed");
    holder.join().expect("lock holder");
}

/// A `creds` future dropped before the credential reached it: the credential is revoked, no role is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_creds_call_revokes_its_credential() {
    let pg = TestPostgres::start().expect("start PostgreSQL");
    let broker = start(&pg).await;
    broker
        .write_role("gone", Role::new())
        .await
        .expect("write_role");
    {
        let mut call = pin!(broker.creds("gone"));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            call.as_mut().poll(&mut cx).is_pending(),
            "creds finished within its first poll"
        );
    } // dropped here, while the blocking thread issues the credential
    wait_for("the abandoned credential to be issued and revoked", || {
        let stats = broker.stats();
        stats.issued == 1 && stats.revoked == 1
    })
    .await;
    assert!(broker.leases().is_empty());
    assert_eq!(roles_with_prefix(&pg, "gone-"), Vec::<String>::new());
}
