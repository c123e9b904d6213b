//! Multi-host connection strings and failover, on a real primary and a streaming replica of it.

mod common;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, Role};

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
}
