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
    assert_eq!(
        owner,
        credbroker::DEFAULT_OWNER_ROLE,
        "objects are handed to the owner role"
    );
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

#[test]
fn revoke_cleans_up_every_database_where_the_role_owns_or_holds_something() {
    let env = common::start();
    let mut admin = env.admin();
    // CREATE DATABASE cannot share an implicit transaction with other statements.
    admin.batch_execute("CREATE DATABASE second").unwrap();
    admin.batch_execute("CREATE DATABASE third").unwrap();
    admin
        .batch_execute(
            "CREATE ROLE app_group NOLOGIN;
             CREATE TABLE group_data (x int); GRANT SELECT ON group_data TO app_group;",
        )
        .unwrap();
    let role = Role::new().creation_sql(
        r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
           GRANT app_group TO "{{name}}";"#,
    );
    env.broker.write_role("app", role).unwrap();
    let creds = env.broker.creds("app").unwrap();
    let user = format!("\"{}\"", creds.username());
    let admin_in = |db: &str| {
        env.pg
            .login_to(db, "admin", env.pg.admin_password())
            .unwrap()
    };

    // It owns a table in a second database, holds a grant in a third, and has a session that did SET ROLE.
    admin_in("second")
        .batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {user}"))
        .unwrap();
    env.pg
        .login_to("second", creds.username(), creds.password())
        .unwrap()
        .batch_execute("CREATE TABLE owned_elsewhere (x int)")
        .unwrap();
    admin_in("third")
        .batch_execute(&format!(
            "CREATE TABLE shared (x int); GRANT SELECT ON shared TO {user}"
        ))
        .unwrap();
    let mut grouped = env.pg.login(creds.username(), creds.password()).unwrap();
    grouped.batch_execute("SET ROLE app_group").unwrap();

    env.broker.revoke(creds.lease_id()).unwrap();

    assert!(!env.role_exists(creds.username()));
    assert!(
        grouped.simple_query("SELECT * FROM group_data").is_err(),
        "the SET ROLE session was ended"
    );
    let owner: String = admin_in("second")
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'owned_elsewhere'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        owner,
        credbroker::DEFAULT_OWNER_ROLE,
        "the object in the second database went to the owner"
    );
    let acl: String = admin_in("third")
        .query_one(
            "SELECT coalesce(relacl::text, '') FROM pg_class WHERE relname = 'shared'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!acl.contains(creds.username()), "{acl}");
}

#[test]
fn a_failing_revocation_is_retried_with_backoff_until_the_cause_is_fixed() {
    // A least-privilege admin: CREATEROLE, pg_signal_backend, and membership in the owner it hands objects to.
    let pg = credbroker::testing::TestPostgres::start().unwrap();
    pg.admin_client()
        .unwrap()
        .batch_execute(
            "CREATE ROLE manager LOGIN CREATEROLE PASSWORD 'manager-password-1';
             GRANT pg_signal_backend TO manager;
             CREATE ROLE app_owner NOLOGIN; GRANT app_owner TO manager;
             GRANT CREATE ON SCHEMA public TO manager WITH GRANT OPTION;",
        )
        .unwrap();
    let broker = credbroker::Broker::builder()
        .connection(common::connection_as(&pg, "manager", "manager-password-1"))
        .reassign_owned_to("app_owner")
        .build()
        .unwrap();
    let role = Role::new().creation_sql(common::CREATES_TABLES);
    broker.write_role("app", role).unwrap();
    let creds = broker.creds("app").unwrap();
    common::create_table_as(&pg, &creds, "made_by_app");

    // The admin loses the right to hand objects to app_owner: REASSIGN OWNED fails.
    pg.admin_client()
        .unwrap()
        .batch_execute("REVOKE app_owner FROM manager")
        .unwrap();
    let err = broker.revoke(creds.lease_id()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Revocation);
    assert!(err.to_string().contains("permission denied"), "{err}");

    // The lease stays, the role is fenced, and retries back off: each gap longer than the one before.
    let mut seen = vec![(1, std::time::Instant::now())];
    while seen.len() < 3 {
        let lease = broker.lease(creds.lease_id()).expect("the lease stays");
        let attempts = lease.revocation_attempts();
        if attempts > seen.last().unwrap().0 {
            seen.push((attempts, std::time::Instant::now()));
        }
        assert!(attempts < 6, "retries too fast: {seen:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].1 - w[0].1).collect();
    assert!(gaps[1] > gaps[0], "backoff grows: {gaps:?}");
    assert_eq!(broker.failed_leases().len(), 1);
    let can_login: bool = pg
        .admin_client()
        .unwrap()
        .query_one(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
            &[&creds.username()],
        )
        .unwrap()
        .get(0);
    assert!(!can_login, "NOLOGIN while revocation is retried");

    // Fixed: the next retry drops the role, and its table belongs to app_owner.
    pg.admin_client()
        .unwrap()
        .batch_execute("GRANT app_owner TO manager")
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(30), || broker
            .lease(creds.lease_id())
            .is_none()),
        "the role is dropped once the cause is fixed"
    );
    assert!(common::roles_with_prefix(&pg, creds.username()).is_empty());
    let owner: String = pg
        .admin_client()
        .unwrap()
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'made_by_app'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(owner, "app_owner");
}

#[test]
fn revoke_force_forgets_a_lease_whose_role_cannot_be_dropped() {
    let env = common::start();
    env.admin()
        .batch_execute("CREATE TABLE revoked (username text)")
        .unwrap();
    let role = Role::new().revocation_sql(
        r#"INSERT INTO revoked VALUES ('{{name}}'); DROP ROLE IF EXISTS "{{name}}";"#,
    );
    env.broker.write_role("audited", role).unwrap();
    let creds = env.broker.creds("audited").unwrap();
    env.admin().batch_execute("DROP TABLE revoked").unwrap();

    env.broker.revoke_force(creds.lease_id()).unwrap();
    assert!(env.broker.lease(creds.lease_id()).is_none());
    assert!(
        env.role_exists(creds.username()),
        "the role could not be dropped"
    );
    assert!(
        common::marked_roles(&env.pg).is_empty(),
        "it lost the marker, so no sweep touches it again"
    );
    let err = env.broker.revoke_force(creds.lease_id()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownLease);
}
