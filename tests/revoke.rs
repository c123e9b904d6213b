//! Revoking leases: sessions end, owned objects and grants are handled, the role is gone.

mod common;

use std::time::Duration;

use credbroker::{ErrorKind, Role};

#[test]
fn revoke_ends_sessions_and_drops_a_role_that_owns_objects_and_holds_grants() {
    let env = common::start();
    env.admin()
        .batch_execute(
            "CREATE ROLE app_group NOLOGIN;
             CREATE TABLE group_data (x int); GRANT SELECT ON group_data TO app_group;
             CREATE TABLE shared (x int);",
        )
        .unwrap();
    let role = Role::new().creation_sql(
        r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
           GRANT CREATE ON SCHEMA public TO "{{name}}";
           GRANT app_group TO "{{name}}";"#,
    );
    env.broker.write_role("owner", role).unwrap();
    let creds = env.broker.creds("owner").unwrap();

    let mut session = env.pg.login(creds.username(), creds.password()).unwrap();
    session
        .batch_execute("CREATE TABLE mine (x int); INSERT INTO mine VALUES (1)")
        .unwrap();
    env.admin()
        .batch_execute(&format!(
            "GRANT SELECT ON shared TO \"{}\"",
            creds.username()
        ))
        .unwrap();
    // A session that switched to the group keeps the group's privileges after DROP ROLE, unless it is ended.
    let mut grouped = env.pg.login(creds.username(), creds.password()).unwrap();
    grouped.batch_execute("SET ROLE app_group").unwrap();
    grouped.batch_execute("SELECT * FROM group_data").unwrap();

    env.broker.revoke(creds.lease_id()).unwrap();

    assert!(!env.role_exists(creds.username()));
    assert!(env.broker.lease(creds.lease_id()).is_none());
    assert!(
        session.simple_query("SELECT 1").is_err(),
        "the open session was ended"
    );
    assert!(
        grouped.simple_query("SELECT * FROM group_data").is_err(),
        "the SET ROLE session was ended"
    );
    let owner: String = env
        .admin()
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'mine'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(owner, "admin", "objects are handed to the admin user");
    let active: i64 = env
        .admin()
        .query_one("SELECT count(*) FROM pg_stat_activity WHERE usename IS NULL AND backend_type = 'client backend'", &[])
        .unwrap()
        .get(0);
    assert_eq!(active, 0, "no session of a dropped role survives");
    assert!(env.pg.login(creds.username(), creds.password()).is_err());
}

#[test]
fn a_role_already_gone_counts_as_revoked() {
    let env = common::start();
    env.broker.write_role("app", Role::new()).unwrap();
    let creds = env.broker.creds("app").unwrap();
    env.admin()
        .batch_execute(&format!("DROP ROLE \"{}\"", creds.username()))
        .unwrap();
    env.broker.revoke(creds.lease_id()).unwrap();
    assert!(env.broker.leases().is_empty());

    let err = env.broker.revoke(creds.lease_id()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownLease);
    assert!(err.to_string().contains(creds.lease_id()), "{err}");
}

#[test]
fn revoke_prefix_revokes_only_matching_leases() {
    let env = common::start();
    env.broker.write_role("a", Role::new()).unwrap();
    env.broker.write_role("ab", Role::new()).unwrap();
    let a: Vec<_> = (0..3).map(|_| env.broker.creds("a").unwrap()).collect();
    let ab: Vec<_> = (0..2).map(|_| env.broker.creds("ab").unwrap()).collect();

    assert_eq!(env.broker.revoke_prefix("postgresql/creds/a/").unwrap(), 3);
    for c in &a {
        assert!(!env.role_exists(c.username()));
    }
    for c in &ab {
        assert!(env.role_exists(c.username()));
        assert!(env.broker.lease(c.lease_id()).is_some());
    }
    assert_eq!(env.broker.revoke_prefix("postgresql/creds/a/").unwrap(), 0);
    assert_eq!(env.broker.revoke_prefix("postgresql/creds/").unwrap(), 2);
    assert!(env.roles_with_prefix("a-").is_empty() && env.roles_with_prefix("ab-").is_empty());
}

#[test]
fn custom_revocation_sql_runs_and_failures_are_kept_and_retried() {
    let env = common::start();
    env.admin()
        .batch_execute("CREATE TABLE revoked (username text)")
        .unwrap();
    let role = Role::new().revocation_sql(
        r#"INSERT INTO revoked VALUES ('{{name}}'); DROP ROLE IF EXISTS "{{name}}";"#,
    );
    env.broker.write_role("audited", role).unwrap();

    let first = env.broker.creds("audited").unwrap();
    env.broker.revoke(first.lease_id()).unwrap();
    let logged: String = env
        .admin()
        .query_one("SELECT username FROM revoked", &[])
        .unwrap()
        .get(0);
    assert_eq!(logged, first.username());
    assert!(!env.role_exists(first.username()));

    // Break the revocation SQL: the lease stays, NOLOGIN, with its error; fixing the cause lets the retry succeed.
    let second = env.broker.creds("audited").unwrap();
    env.admin().batch_execute("DROP TABLE revoked").unwrap();
    let err = env.broker.revoke(second.lease_id()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Revocation);
    assert!(
        err.to_string()
            .contains(r#"relation "revoked" does not exist"#),
        "{err}"
    );
    let lease = env
        .broker
        .lease(second.lease_id())
        .expect("a failed revocation keeps the lease");
    assert_eq!(lease.revocation_attempts(), 1);
    assert!(lease.last_error().unwrap().contains("revoked"));
    assert_eq!(env.broker.failed_leases(), vec![lease]);
    let can_login: bool = env
        .admin()
        .query_one(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
            &[&second.username()],
        )
        .unwrap()
        .get(0);
    assert!(
        !can_login,
        "the role is fenced with NOLOGIN while revocation is retried"
    );
    let err = env.broker.renew(second.lease_id(), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LeaseExpired);

    env.admin()
        .batch_execute("CREATE TABLE revoked (username text)")
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(30), || env
            .broker
            .lease(second.lease_id())
            .is_none()),
        "the sweeper retries and succeeds once the cause is fixed"
    );
    assert!(!env.role_exists(second.username()));
    assert!(env.broker.failed_leases().is_empty());
}
