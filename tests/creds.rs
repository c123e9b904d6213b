//! Issuing credentials: login, catalog state, uniqueness under concurrency, and nothing left on failure.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use credbroker::{ErrorKind, Role};

#[test]
fn issued_credentials_log_in_and_match_the_catalog() {
    let env = common::start();
    env.broker.write_role("production", Role::new()).unwrap();
    let creds = env.broker.creds("production").unwrap();

    assert!(creds.lease_id().starts_with("postgresql/creds/production/"));
    assert_eq!(creds.lease_duration(), Duration::from_secs(3600));
    assert!(
        creds.username().starts_with("production-"),
        "{}",
        creds.username()
    );
    assert!(creds.password().len() >= 22);
    assert!(!format!("{creds:?}").contains(creds.password()));

    let mut client = env.pg.login(creds.username(), creds.password()).unwrap();
    let row = client.query_one("SELECT current_user::text", &[]).unwrap();
    assert_eq!(row.get::<_, String>(0), creds.username());

    let lease = env.broker.lease(creds.lease_id()).unwrap();
    assert_eq!(lease.username(), creds.username());
    assert_eq!(lease.role(), "production");
    assert_eq!(
        lease
            .expires_at()
            .duration_since(lease.issued_at())
            .unwrap(),
        Duration::from_secs(3600)
    );
    assert_eq!(env.valid_until(creds.username()), Some(lease.expires_at()));
    assert_eq!(env.broker.leases(), vec![lease.clone()]);

    // Only the verifier reached the server; it has no other privilege than LOGIN.
    let row = env
        .admin()
        .query_one(
            "SELECT rolpassword, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolinherit \
             FROM pg_authid WHERE rolname = $1",
            &[&creds.username()],
        )
        .unwrap();
    let stored: String = row.get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$4096:"), "{stored}");
    assert!(!stored.contains(creds.password()));
    assert!(row.get::<_, bool>(1));
    assert!(!row.get::<_, bool>(2) && !row.get::<_, bool>(3) && !row.get::<_, bool>(4));
    // Its one membership is the marker, a NOLOGIN role with no privileges; the comment records the lease.
    let memberships: Vec<String> = env
        .admin()
        .query(
            "SELECT g.rolname::text FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member \
             JOIN pg_roles g ON g.oid = m.roleid WHERE r.rolname = $1",
            &[&creds.username()],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(memberships, [credbroker::DEFAULT_MARKER_ROLE]);
    let comment: String = env
        .admin()
        .query_one(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1",
            &[&creds.username()],
        )
        .unwrap()
        .get(0);
    let issued = humantime::format_rfc3339_seconds(lease.issued_at());
    let max = humantime::format_rfc3339_seconds(lease.max_expires_at());
    assert!(
        comment.starts_with(&format!(
            "credbroker lease={} role=production instance=",
            lease.id()
        )) && comment.ends_with(&format!(" issued={issued} max={max}")),
        "{comment}"
    );
}

#[test]
fn role_lease_overrides_the_brokers() {
    let env = common::start();
    let role = Role::new().lease(Duration::from_secs(600), Duration::from_secs(3600));
    env.broker.write_role("short", role).unwrap();
    let creds = env.broker.creds("short").unwrap();
    assert_eq!(creds.lease_duration(), Duration::from_secs(600));
    let lease = env.broker.lease(creds.lease_id()).unwrap();
    assert_eq!(
        lease
            .expires_at()
            .duration_since(lease.issued_at())
            .unwrap(),
        Duration::from_secs(600)
    );
    assert_eq!(
        lease
            .max_expires_at()
            .duration_since(lease.issued_at())
            .unwrap(),
        Duration::from_secs(3600)
    );
    assert_eq!(env.valid_until(creds.username()), Some(lease.expires_at()));
}

#[test]
fn longest_role_name_gives_a_username_postgres_keeps_whole() {
    let env = common::start();
    let name = "ABCDEFGHIJKLMNOPQRSTUVWXYZ_-0123";
    assert_eq!(name.len(), 32);
    env.broker.write_role(name, Role::new()).unwrap();
    let creds = env.broker.creds(name).unwrap();
    assert!(creds.username().len() <= 63);
    assert!(creds.username().starts_with(&name.to_ascii_lowercase()));
    assert!(
        env.role_exists(creds.username()),
        "the catalog holds the full, untruncated name"
    );
    env.pg.login(creds.username(), creds.password()).unwrap();
}

#[test]
fn eight_threads_issue_500_credentials_each_without_collision() {
    let env = common::start_with(|b| b.pool_size(8));
    env.broker.write_role("fleet", Role::new()).unwrap();
    let broker = Arc::new(env.broker);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let broker = broker.clone();
            std::thread::spawn(move || {
                (0..500)
                    .map(|_| {
                        let c = broker.creds("fleet").expect("creds");
                        (c.username().to_owned(), c.lease_id().to_owned())
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let issued: Vec<(String, String)> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let usernames: HashSet<_> = issued.iter().map(|(u, _)| u.clone()).collect();
    let lease_ids: HashSet<_> = issued.iter().map(|(_, l)| l.clone()).collect();
    assert_eq!(
        (issued.len(), usernames.len(), lease_ids.len()),
        (4000, 4000, 4000)
    );
    assert_eq!(broker.leases().len(), 4000);
    let in_catalog: HashSet<String> = common::roles_with_prefix(&env.pg, "fleet-")
        .into_iter()
        .collect();
    assert_eq!(in_catalog, usernames);
}

#[test]
fn failed_creation_leaves_no_role_and_no_lease() {
    let env = common::start();
    env.admin()
        .batch_execute("CREATE ROLE app_group NOLOGIN")
        .unwrap();
    let role = Role::new().creation_sql(
        r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
           GRANT app_group TO "{{name}}";"#,
    );
    env.broker.write_role("grouped", role).unwrap();
    let _ = env.broker.creds("grouped").unwrap();
    // The group disappears after the role was checked: the GRANT, the second statement, now fails.
    env.broker.revoke_prefix("").unwrap();
    env.admin().batch_execute("DROP ROLE app_group").unwrap();

    let err = env.broker.creds("grouped").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Database);
    assert!(
        err.to_string()
            .contains(r#"role "app_group" does not exist"#),
        "{err}"
    );
    assert!(err.to_string().contains("nothing was created"), "{err}");
    assert_eq!(err.db_code(), Some("42704"));
    assert!(
        env.roles_with_prefix("grouped-").is_empty(),
        "the CREATE ROLE was rolled back"
    );
    assert!(env.broker.leases().is_empty());
}

#[test]
fn unknown_and_deleted_roles_issue_nothing() {
    let env = common::start();
    let err = env.broker.creds("nope").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownRole);
    assert!(err.to_string().contains("write_role"), "{err}");

    env.broker.write_role("temp", Role::new()).unwrap();
    let creds = env.broker.creds("temp").unwrap();
    env.broker.delete_role("temp").unwrap();
    assert_eq!(
        env.broker.creds("temp").unwrap_err().kind(),
        ErrorKind::UnknownRole
    );
    assert_eq!(
        env.broker.delete_role("temp").unwrap_err().kind(),
        ErrorKind::UnknownRole
    );

    // Leases issued before the delete stay valid, renewable and revocable.
    env.pg.login(creds.username(), creds.password()).unwrap();
    let lease = env
        .broker
        .renew(creds.lease_id(), Some(Duration::from_secs(60)))
        .unwrap();
    assert_eq!(env.valid_until(creds.username()), Some(lease.expires_at()));
    env.broker.revoke(creds.lease_id()).unwrap();
    assert!(!env.role_exists(creds.username()));
}

#[test]
fn the_scram_iteration_count_is_configurable_and_logins_work() {
    let env = common::start_with(|b| b.scram_iterations(1));
    env.broker.write_role("fast", Role::new()).unwrap();
    let creds = env.broker.creds("fast").unwrap();
    let stored: String = env
        .admin()
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&creds.username()],
        )
        .unwrap()
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$1:"), "{stored}");
    let mut session = env.pg.login(creds.username(), creds.password()).unwrap();
    session.simple_query("SELECT 1").unwrap();
    assert!(env.pg.login(creds.username(), "wrong-password").is_err());

    let err = credbroker::Broker::builder()
        .connection(env.pg.connection_string())
        .scram_iterations(0)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), credbroker::ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("at least 1"), "{err}");
}
