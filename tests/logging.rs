//! What the broker logs: every lifecycle event with lease id and username, never a password or verifier.

mod common;

use std::time::Duration;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, Role};

#[test]
fn logs_name_leases_and_users_but_no_secret() {
    common::logs::install();

    let pg = TestPostgres::builder()
        .setting("log_statement", "all")
        .start()
        .unwrap();
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .build()
        .unwrap();
    pg.admin_client()
        .unwrap()
        .batch_execute("CREATE TABLE revoked (u text)")
        .unwrap();
    broker
        .write_role(
            "app",
            Role::new()
                .lease(Duration::from_secs(1), Duration::from_secs(60))
                .revocation_sql(
                    r#"INSERT INTO revoked VALUES ('{{name}}'); DROP ROLE "{{name}}";"#,
                ),
        )
        .unwrap();
    let renewed = broker.creds("app").unwrap();
    broker
        .renew(renewed.lease_id(), Some(Duration::from_secs(30)))
        .unwrap();
    let revoked = broker.creds("app").unwrap();
    broker.revoke(revoked.lease_id()).unwrap();
    let expiring = broker.creds("app").unwrap();
    assert!(common::eventually(Duration::from_secs(15), || broker
        .lease(expiring.lease_id())
        .is_none()));
    pg.admin_client()
        .unwrap()
        .batch_execute("DROP TABLE revoked")
        .unwrap();
    let failing = broker.creds("app").unwrap();
    broker.revoke(failing.lease_id()).unwrap_err();
    drop(broker);

    let lines = common::logs::lines();
    let all = lines.join("\n");
    for creds in [&renewed, &revoked, &expiring, &failing] {
        assert!(
            !all.contains(creds.password()),
            "a password was logged:\n{all}"
        );
        assert!(
            all.contains(creds.lease_id()),
            "lease {} not logged:\n{all}",
            creds.lease_id()
        );
        assert!(
            all.contains(creds.username()),
            "user {} not logged:\n{all}",
            creds.username()
        );
    }
    assert!(
        !all.contains("SCRAM-SHA-256"),
        "a verifier was logged:\n{all}"
    );
    assert!(
        !all.contains(pg.admin_password()),
        "the admin password was logged:\n{all}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("INFO issued lease")),
        "{all}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("INFO renewed lease")),
        "{all}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("INFO revoked lease") && l.contains("requested")),
        "{all}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("INFO revoked lease") && l.contains("expired")),
        "{all}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("WARN revocation of lease")),
        "{all}"
    );

    // The plaintext never reaches the server, even with every statement logged.
    let server_log = pg.log_contents().unwrap();
    assert!(
        server_log.contains("CREATE ROLE"),
        "statement logging is on"
    );
    for creds in [&renewed, &revoked, &expiring, &failing] {
        assert!(!server_log.contains(creds.password()));
    }
    assert!(!server_log.contains(pg.admin_password()));
}
