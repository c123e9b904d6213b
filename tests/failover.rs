//! Multi-host connection strings and failover, on a real primary and a streaming replica of it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use credbroker::testing::TestPostgres;
use credbroker::{Broker, ErrorKind, HandleEvent, LostEvent, PoolOptions, Role};

/// `host=a,b port=p,r target_session_attrs=read-write` with the replica named first.
fn multi_host(
    primary: &TestPostgres,
    replica: &TestPostgres,
    hosts_first: &TestPostgres,
) -> String {
    let (first, second) = if std::ptr::eq(hosts_first, primary) {
        (primary.port(), replica.port())
    } else {
        (replica.port(), primary.port())
    };
    format!(
        "host=127.0.0.1,127.0.0.1 port={first},{second} user={} password={} dbname=postgres sslmode=disable \
         target_session_attrs=read-write",
        primary.admin_user(),
        primary.admin_password()
    )
}

#[test]
fn a_replica_streams_and_a_multi_host_string_finds_the_primary() {
    let primary = TestPostgres::start().expect("start primary");
    let replica = TestPostgres::replica_of(&primary).expect("start replica");
    let broker = Broker::builder()
        .connection(multi_host(&primary, &replica, &replica))
        .build()
        .expect("build on the primary behind the replica");
    broker.write_role("app", Role::new()).expect("write role");
    let creds = broker.creds("app").expect("creds");
    replica.wait_for_replay(&primary).expect("replay");
    replica
        .login(creds.username(), creds.password())
        .expect("the credential works on the replica once replicated");
    let pool = broker.pool("app").expect("pool");
    let mut client = pool.get().expect("pool connection");
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .expect("query")
        .get(0);
    assert!(!in_recovery, "the pool's connection must be on the primary");

    // The same as a URL with several hosts.
    let url = format!(
        "postgres://{}:{}@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write&sslmode=disable",
        primary.admin_user(),
        primary.admin_password(),
        replica.port(),
        primary.port()
    );
    let broker = Broker::builder()
        .connection(url)
        .instance_name("url")
        .build()
        .expect("build from a multi-host URL");
    broker.write_role("app", Role::new()).expect("write role");
    let creds = broker.creds("app").expect("creds");
    primary
        .login(creds.username(), creds.password())
        .expect("issued on the primary");
}

/// Keeps the lost events.
#[derive(Debug, Default, Clone)]
struct LostLeases(Arc<Mutex<Vec<LostEvent>>>);

impl HandleEvent for LostLeases {
    fn handle_lost(&self, event: LostEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// Waits up to 90 s for `done`, retrying; fails the test naming `what`.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn role_exists(pg: &TestPostgres, name: &str) -> bool {
    pg.admin_client()
        .expect("admin login")
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&name])
        .expect("query pg_roles")
        .is_some()
}

/// A primary, a replica streaming from it, and a broker on both through a multi-host string.
fn cluster(handler: LostLeases) -> (Broker, TestPostgres, TestPostgres) {
    let primary = TestPostgres::start().expect("start primary");
    let replica = TestPostgres::replica_of(&primary).expect("start replica");
    let broker = Broker::builder()
        .connection(multi_host(&primary, &replica, &primary))
        .connect_timeout(Duration::from_secs(3))
        .failover_window(Duration::from_secs(600))
        .event_handler(handler)
        .build()
        .expect("build broker");
    broker.write_role("app", Role::new()).expect("write role");
    (broker, primary, replica)
}

/// Waits until the broker, without being asked, has noticed the promoted replica and reconciled.
fn wait_for_reconciliation(broker: &Broker) {
    wait_for("the broker to reconcile with the new primary", || {
        broker.stats().failovers >= 1
    });
}

#[test]
fn a_revocation_the_failover_lost_is_done_again_and_the_credential_cannot_log_in() {
    common::logs::install();
    let (broker, primary, replica) = cluster(LostLeases::default());
    let revoked = broker.creds("app").expect("creds");
    replica.wait_for_replay(&primary).expect("replay");
    replica.pause_replication().expect("pause the WAL receiver");

    broker
        .revoke(revoked.lease_id())
        .expect("revoke on the primary");
    assert!(!role_exists(&primary, revoked.username()));
    primary.stop_immediately().expect("crash the primary");
    // The loss is real: the standby never heard of the revocation, and the credential logs in there.
    assert!(role_exists(&replica, revoked.username()));
    replica
        .login(revoked.username(), revoked.password())
        .expect("the revoked credential logs in on the replica before the failover is noticed");

    replica.promote().expect("promote the replica");
    wait_for_reconciliation(&broker);
    assert!(
        !role_exists(&replica, revoked.username()),
        "the revoked role must be dropped again on the new primary"
    );
    assert!(
        common::eventually(Duration::from_secs(10), || broker.stats().roles_dropped
            >= 1),
        "dropping it again is a RoleDroppedEvent (cause Failover)"
    );
    let err = replica
        .login(revoked.username(), revoked.password())
        .map(|_| ())
        .expect_err("the revoked credential must not log in after the failover");
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::INVALID_PASSWORD),
        "{err}"
    );
    // The broker works on the new primary.
    let fresh = broker.creds("app").expect("creds after the failover");
    replica
        .login(fresh.username(), fresh.password())
        .expect("a new credential logs in on the new primary");
    assert_eq!(broker.stats().lost, 0);

    // What was done is logged at warn, without a secret.
    let lines = common::logs::lines();
    assert!(
        lines.iter().any(|l| l.starts_with("WARN")
            && l.contains(revoked.username())
            && l.contains("dropped it again")),
        "{lines:#?}"
    );
    assert!(lines
        .iter()
        .any(|l| l.starts_with("WARN") && l.contains("failover reconciled")));
    for secret in [
        revoked.password(),
        fresh.password(),
        primary.admin_password(),
    ] {
        assert!(!lines.iter().any(|l| l.contains(secret)));
    }
}

#[test]
fn leases_the_failover_lost_are_reported_renewals_restored_and_pools_reissue() {
    common::logs::install();
    let lost_events = LostLeases::default();
    let (broker, primary, replica) = cluster(lost_events.clone());
    let kept = broker.creds("app").expect("creds");
    replica.wait_for_replay(&primary).expect("replay");
    replica.pause_replication().expect("pause the WAL receiver");

    // Not replicated: a credential, a pool's credential, and a renewal of the kept lease.
    let lost = broker.creds("app").expect("creds");
    let pool = broker
        .pool_with("app", PoolOptions::new().max_size(2).min_idle(0))
        .expect("pool");
    let pool_lease = pool.lease_id();
    let pool_user = pool.get().expect("pool connection").username().to_owned();
    let renewed = broker
        .renew(kept.lease_id(), Some(Duration::from_secs(7200)))
        .expect("renew");
    primary.stop_immediately().expect("crash the primary");
    assert!(!role_exists(&replica, lost.username()));
    assert!(!role_exists(&replica, &pool_user));

    replica.promote().expect("promote the replica");
    wait_for_reconciliation(&broker);

    let err = broker
        .renew(lost.lease_id(), None)
        .expect_err("renew of a lost lease");
    assert_eq!(err.kind(), ErrorKind::LeaseLost, "{err}");
    assert!(
        err.to_string().contains("failover") && err.to_string().contains(lost.lease_id()),
        "{err}"
    );
    assert_eq!(
        broker.revoke(lost.lease_id()).unwrap_err().kind(),
        ErrorKind::LeaseLost
    );
    assert!(broker.lease(lost.lease_id()).is_none());
    let reported: Vec<String> = lost_events
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.lease.id().to_owned())
        .collect();
    assert!(
        reported.contains(&lost.lease_id().to_owned()),
        "{reported:?}"
    );
    assert!(reported.contains(&pool_lease), "{reported:?}");
    assert!(
        !reported.contains(&kept.lease_id().to_owned()),
        "{reported:?}"
    );
    assert!(broker.stats().lost >= 2);
    let lines = common::logs::lines();
    assert!(
        lines.iter().any(|l| l.starts_with("WARN")
            && l.contains(lost.lease_id())
            && l.contains("was lost")),
        "{lines:#?}"
    );

    // The kept lease lives on, with the renewal the failover lost set again.
    let valid_until: SystemTime = replica
        .admin_client()
        .expect("admin")
        .query_one(
            "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1",
            &[&kept.username()],
        )
        .expect("rolvaliduntil")
        .get(0);
    assert_eq!(valid_until, renewed.expires_at());
    broker
        .renew(kept.lease_id(), None)
        .expect("renew of a lease that survived the failover");
    replica
        .login(kept.username(), kept.password())
        .expect("the kept credential logs in");

    // The pool re-issues: it gets a connection again, as a new user, on the new primary.
    wait_for("the pool to obtain a new credential", || {
        pool.get().is_ok_and(|c| c.username() != pool_user)
    });
    let mut client = pool.get().expect("pool connection");
    let user: String = client
        .query_one("SELECT current_user::text", &[])
        .expect("query")
        .get(0);
    assert_ne!(user, pool_user);
    assert!(role_exists(&replica, &user));
}

#[test]
fn verify_full_checks_each_host_of_a_multi_host_string() {
    let primary = TestPostgres::builder()
        .tls(true)
        .start()
        .expect("start primary");
    let replica = TestPostgres::replica_of(&primary).expect("start replica");
    let ca = primary.ca_cert().expect("CA").display().to_string();
    let connection = multi_host(&primary, &replica, &replica).replace(
        "sslmode=disable",
        &format!("sslmode=verify-full sslrootcert={ca}"),
    );
    let broker = Broker::builder()
        .connection(connection)
        .build()
        .expect("build over TLS, the replica first");
    broker.write_role("app", Role::new()).expect("write role");
    let pool = broker.pool("app").expect("pool over TLS");
    let mut client = pool.get().expect("pool connection");
    let tls: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .expect("query")
        .get(0);
    assert!(tls);
}

/// What failover detection rests on: a promoted replica keeps the primary's system identifier, and the name of its
/// current WAL file shows the new timeline as soon as `pg_ctl promote` returns (the checkpoint's timeline may lag).
#[test]
fn a_promoted_replica_keeps_the_system_identifier_and_shows_its_new_timeline_at_once() {
    let primary = TestPostgres::start().expect("start primary");
    let replica = TestPostgres::replica_of(&primary).expect("start replica");
    let identity =
        "SELECT system_identifier, substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8), \
                    (SELECT timeline_id FROM pg_control_checkpoint()) FROM pg_control_system()";
    let before = primary
        .admin_client()
        .expect("admin")
        .query_one(identity, &[])
        .expect("identity of the primary");
    replica.promote().expect("promote");
    let after = replica
        .admin_client()
        .expect("admin")
        .query_one(identity, &[])
        .expect("identity of the promoted replica");
    assert_eq!(before.get::<_, i64>(0), after.get::<_, i64>(0));
    assert_eq!(before.get::<_, String>(1), "00000001");
    assert_eq!(after.get::<_, String>(1), "00000002");
    eprintln!(
        "pg_control_checkpoint().timeline_id right after promotion: {}",
        after.get::<_, i32>(2)
    );
}
