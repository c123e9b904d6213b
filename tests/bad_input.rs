//! Bad input everywhere, one test per row of the "Bad input" table in docs/reference.md: each is refused with the right
//! `ErrorKind`, a message naming the cause and the fix and holding no password, and leaves the lease table and
//! the catalog as they were.

mod common;

use std::time::Duration;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, Error, ErrorKind, Lease, PoolOptions, Role};

/// What bad input must not change: the broker's leases and every role in the catalog.
#[derive(Debug, PartialEq)]
struct Snapshot {
    leases: Vec<Lease>,
    roles: Vec<String>,
}

fn catalog_roles(pg: &TestPostgres) -> Vec<String> {
    common::roles_with_prefix(pg, "")
}

fn snapshot(env: &common::Env) -> Snapshot {
    Snapshot {
        leases: env.broker.leases(),
        roles: catalog_roles(&env.pg),
    }
}

/// Asserts the error's kind, that its message names `cause` and `fix`, and that it holds none of `secrets`.
fn assert_refused(err: &Error, kind: ErrorKind, cause: &str, fix: &str, secrets: &[&str]) {
    let text = err.to_string();
    assert_eq!(err.kind(), kind, "{text}");
    assert!(text.contains(cause), "cause {cause:?} not in: {text}");
    assert!(text.contains(fix), "fix {fix:?} not in: {text}");
    let debug = format!("{err:?}");
    for secret in secrets {
        assert!(
            !text.contains(secret) && !debug.contains(secret),
            "a secret in: {text}"
        );
    }
}

/// A broker with one live credential, so that "as they were" is not trivially empty.
fn env_with_a_credential() -> (common::Env, credbroker::Credential) {
    let env = common::start();
    env.broker.write_role("app", Role::new()).unwrap();
    let creds = env.broker.creds("app").unwrap();
    (env, creds)
}

/// `build()` with `connection` against a server: the error, after checking that the catalog did not change.
fn build_error(pg: &TestPostgres, builder: credbroker::BrokerBuilder) -> Error {
    let before = catalog_roles(pg);
    let err = builder.build().expect_err("bad input is refused");
    assert_eq!(catalog_roles(pg), before);
    err
}

#[test]
fn empty_connection_string() {
    let pg = TestPostgres::start().unwrap();
    for empty in ["", "   \n"] {
        let err = build_error(&pg, Broker::builder().connection(empty));
        assert_refused(
            &err,
            ErrorKind::InvalidConfig,
            "the connection string is empty",
            "host=localhost user=username password=password",
            &[],
        );
    }
}

#[test]
fn malformed_connection_string() {
    let pg = TestPostgres::start().unwrap();
    let password = pg.admin_password();
    // A password with a space, not quoted: its second half is a word without "=".
    let string = format!(
        "host=127.0.0.1 port={} user=admin password={password} tail{password} sslmode=disable",
        pg.port()
    );
    let err = build_error(&pg, Broker::builder().connection(string));
    assert_refused(
        &err,
        ErrorKind::InvalidConfig,
        "is not followed by \"=\"",
        "quoting values with spaces as 'like this'",
        &[password],
    );
    let url = format!(
        "postgres://admin:{password}@127.0.0.1:[{}/postgres",
        pg.port()
    );
    let err = build_error(&pg, Broker::builder().connection(url));
    assert_refused(
        &err,
        ErrorKind::InvalidConfig,
        "invalid value for option `port`",
        "postgres:// URL",
        &[password],
    );
}

#[test]
fn unknown_key_in_connection_string() {
    let pg = TestPostgres::start().unwrap();
    let string = format!("{} sslmod=disable", pg.connection_string());
    let err = build_error(&pg, Broker::builder().connection(string));
    assert_refused(
        &err,
        ErrorKind::InvalidConfig,
        "unknown option `sslmod`",
        "the keys understood are host, hostaddr, port, user, password, dbname, sslmode",
        &[pg.admin_password()],
    );
}

#[test]
fn unreachable_host() {
    let closed = common::closed_port();
    let err = Broker::builder()
        .connection(format!(
            "host=127.0.0.1 port={closed} user=admin password=unreachable-pw-1 sslmode=disable"
        ))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap_err();
    assert_refused(
        &err,
        ErrorKind::Connection,
        &format!("could not connect to PostgreSQL at 127.0.0.1:{closed}"),
        "check that the server is running and that host and port are right",
        &["unreachable-pw-1"],
    );
}

#[test]
fn wrong_admin_password() {
    let pg = TestPostgres::start().unwrap();
    let string = pg
        .connection_string()
        .replace(pg.admin_password(), "wrong-admin-pw-1");
    let err = build_error(&pg, Broker::builder().connection(string));
    assert_refused(
        &err,
        ErrorKind::Connection,
        "password authentication failed for admin user \"admin\"",
        "check the user and password in the connection string",
        &["wrong-admin-pw-1", pg.admin_password()],
    );
    assert_eq!(err.db_code(), Some("28P01"));
}

#[test]
fn zero_or_huge_broker_lease() {
    let pg = TestPostgres::start().unwrap();
    let hour = Duration::from_secs(3600);
    let builder = || Broker::builder().connection(pg.connection_string());
    let err = build_error(&pg, builder().lease(Duration::ZERO, hour));
    assert_refused(
        &err,
        ErrorKind::InvalidConfig,
        "default lease 0ns is shorter than one second",
        "give at least 1s",
        &[pg.admin_password()],
    );
    let two_centuries = Duration::from_secs(200 * 365 * 24 * 3600);
    for (default, max) in [
        (hour, Duration::MAX),
        (Duration::MAX, Duration::MAX),
        (hour, two_centuries),
    ] {
        let err = build_error(&pg, builder().lease(default, max));
        assert_refused(
            &err,
            ErrorKind::InvalidConfig,
            "is longer than 100 years",
            "give a realistic duration",
            &[pg.admin_password()],
        );
    }
}

#[test]
fn zero_or_huge_role_lease() {
    let (env, creds) = env_with_a_credential();
    let before = snapshot(&env);
    let secrets = [env.pg.admin_password(), creds.password()];
    let err = env
        .broker
        .write_role(
            "bad",
            Role::new().lease(Duration::ZERO, Duration::from_secs(60)),
        )
        .unwrap_err();
    assert_refused(
        &err,
        ErrorKind::InvalidConfig,
        "shorter than one second",
        "give at least 1s",
        &secrets,
    );
    let err = env
        .broker
        .write_role("bad", Role::new().lease(Duration::MAX, Duration::MAX))
        .unwrap_err();
    assert_refused(
        &err,
        ErrorKind::InvalidConfig,
        "is longer than 100 years",
        "give a realistic duration",
        &secrets,
    );
    // Within 100 years but beyond the broker's max (24 h by default).
    let year = Duration::from_secs(365 * 24 * 3600);
    let err = env
        .broker
        .write_role("bad", Role::new().lease(Duration::from_secs(60), year))
        .unwrap_err();
    assert_refused(
        &err,
        ErrorKind::InvalidConfig,
        "exceeds the broker's max lease",
        "lower the role's max or raise the broker's with BrokerBuilder::lease",
        &secrets,
    );
    assert_eq!(env.broker.roles(), ["app"]);
    assert_eq!(snapshot(&env), before);
}

#[test]
fn renew_with_zero_increment() {
    let (env, creds) = env_with_a_credential();
    let before = snapshot(&env);
    let valid_until = env.valid_until(creds.username());
    let err = env
        .broker
        .renew(creds.lease_id(), Some(Duration::ZERO))
        .unwrap_err();
    assert_refused(
        &err,
        ErrorKind::InvalidConfig,
        "renew increment 0ns is shorter than one second",
        "give at least 1s, or None for the role's default lease",
        &[env.pg.admin_password(), creds.password()],
    );
    assert_eq!(snapshot(&env), before);
    assert_eq!(env.valid_until(creds.username()), valid_until);
}

/// Not an error, as in Vault: a renewal past the max lease is capped at it, in the table and the catalog.
#[test]
fn renew_with_huge_increment_is_capped() {
    let (env, creds) = env_with_a_credential();
    let issued = env.broker.lease(creds.lease_id()).unwrap();
    let roles = catalog_roles(&env.pg);
    for huge in [Duration::MAX, Duration::from_secs(200 * 365 * 24 * 3600)] {
        let lease = env.broker.renew(creds.lease_id(), Some(huge)).unwrap();
        assert_eq!(lease.expires_at(), issued.max_expires_at());
        assert_eq!(
            env.valid_until(creds.username()),
            Some(issued.max_expires_at())
        );
    }
    assert_eq!(catalog_roles(&env.pg), roles);
}

#[test]
fn renew_after_expiry() {
    let env = common::start();
    env.broker
        .write_role(
            "brief",
            Role::new().lease(Duration::from_secs(2), Duration::from_secs(60)),
        )
        .unwrap();
    let creds = env.broker.creds("brief").unwrap();
    let secrets = [env.pg.admin_password(), creds.password()];
    // Hold the role's catalog row so the sweeper's revocation (its ALTER ROLE ... NOLOGIN) waits: the lease
    // stays in the table, past its end, while it is being revoked. (Leases start at a whole second, so a 2 s
    // lease has at least 1 s left here: time to take the row before the sweeper does, even on a loaded machine.)
    let mut blocker = env.admin();
    let mut hold = blocker.transaction().unwrap();
    hold.batch_execute(&format!(
        "ALTER ROLE \"{}\" VALID UNTIL 'infinity'",
        creds.username()
    ))
    .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let before = env
        .broker
        .lease(creds.lease_id())
        .expect("still in the table");
    let err = env.broker.renew(creds.lease_id(), None).unwrap_err();
    assert_refused(
        &err,
        ErrorKind::LeaseExpired,
        &format!("lease {} is being revoked", creds.lease_id()),
        "request new credentials",
        &secrets,
    );
    assert_eq!(env.broker.lease(creds.lease_id()), Some(before));
    hold.rollback().unwrap();

    // Once revoked, the lease is gone from the table.
    assert!(common::eventually(Duration::from_secs(10), || env
        .broker
        .lease(creds.lease_id())
        .is_none()));
    let err = env.broker.renew(creds.lease_id(), None).unwrap_err();
    assert_refused(
        &err,
        ErrorKind::UnknownLease,
        &format!("no lease {}", creds.lease_id()),
        "already revoked",
        &secrets,
    );
    assert!(!env.role_exists(creds.username()));
}

#[test]
fn revoke_of_an_unknown_lease() {
    let (env, creds) = env_with_a_credential();
    let before = snapshot(&env);
    for id in [
        "postgresql/creds/app/00000000-0000-0000-0000-000000000000",
        "",
        "'; DROP ROLE admin; --",
    ] {
        let err = env.broker.revoke(id).unwrap_err();
        assert_refused(
            &err,
            ErrorKind::UnknownLease,
            &format!("no lease {id} in the lease table"),
            "never issued by this broker",
            &[env.pg.admin_password(), creds.password()],
        );
    }
    assert_eq!(snapshot(&env), before);
}

#[test]
fn creds_for_an_unknown_role() {
    let (env, creds) = env_with_a_credential();
    let before = snapshot(&env);
    let err = env.broker.creds("nope").unwrap_err();
    assert_refused(
        &err,
        ErrorKind::UnknownRole,
        "no role named \"nope\" is defined",
        "define it with Broker::write_role",
        &[env.pg.admin_password(), creds.password()],
    );
    assert_eq!(snapshot(&env), before);
}

#[test]
fn creds_for_a_deleted_role() {
    let (env, creds) = env_with_a_credential();
    env.broker.delete_role("app").unwrap();
    let before = snapshot(&env);
    let err = env.broker.creds("app").unwrap_err();
    assert_refused(
        &err,
        ErrorKind::UnknownRole,
        "no role named \"app\" is defined",
        "define it with Broker::write_role",
        &[env.pg.admin_password(), creds.password()],
    );
    assert_eq!(snapshot(&env), before);
    // The lease issued before the deletion still works.
    env.broker.revoke(creds.lease_id()).unwrap();
}

#[test]
fn creation_sql_that_creates_another_role() {
    let (env, creds) = env_with_a_credential();
    let before = snapshot(&env);
    for sql in [
        r#"CREATE ROLE "other_{{name}}" WITH LOGIN PASSWORD '{{password}}'"#,
        r#"SELECT '{{name}}'"#,
    ] {
        let err = env
            .broker
            .write_role("elsewhere", Role::new().creation_sql(sql))
            .unwrap_err();
        assert_refused(
            &err,
            ErrorKind::TemplateRejected,
            "creation SQL did not create a role named {{name}}",
            "create exactly that role",
            &[env.pg.admin_password(), creds.password(), "SCRAM-SHA-256$"],
        );
    }
    assert_eq!(env.broker.roles(), ["app"]);
    assert_eq!(snapshot(&env), before);
}

#[test]
fn creation_sql_that_commits_or_rolls_back() {
    let (env, creds) = env_with_a_credential();
    let before = snapshot(&env);
    let create = r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"#;
    for end in [
        "COMMIT;",
        "ROLLBACK;",
        "END;",
        "COMMIT AND CHAIN;",
        "ROLLBACK AND CHAIN;",
    ] {
        for sql in [format!("{create} {end}"), format!("{end} {create}")] {
            let err = env
                .broker
                .write_role("ender", Role::new().creation_sql(&sql))
                .unwrap_err();
            assert_refused(
                &err,
                ErrorKind::TemplateRejected,
                "creation SQL ends the transaction (COMMIT, ROLLBACK or END)",
                "remove those statements",
                &[env.pg.admin_password(), creds.password(), "SCRAM-SHA-256$"],
            );
            // The sample role of a committing template was removed again.
            assert_eq!(snapshot(&env), before, "{sql}");
        }
    }
    assert_eq!(env.broker.roles(), ["app"]);
}

#[test]
fn role_names_outside_the_allowed_set() {
    let (env, creds) = env_with_a_credential();
    let before = snapshot(&env);
    let long = "a".repeat(33);
    for name in [
        "a b",
        "x;drop",
        "",
        long.as_str(),
        "rôle",
        "名前",
        "x\"y",
        "a\0b",
    ] {
        for err in [
            env.broker.write_role(name, Role::new()).unwrap_err(),
            env.broker.delete_role(name).unwrap_err(),
        ] {
            assert_refused(
                &err,
                ErrorKind::InvalidRoleName,
                &format!("invalid role name {name:?}"),
                "use 1 to 32 characters of A-Z, a-z, 0-9, '_' and '-'",
                &[env.pg.admin_password(), creds.password()],
            );
        }
    }
    assert_eq!(env.broker.roles(), ["app"]);
    assert_eq!(snapshot(&env), before);
}

#[test]
fn pool_options_out_of_range() {
    let (env, creds) = env_with_a_credential();
    let before = snapshot(&env);
    let secrets = [env.pg.admin_password(), creds.password()];
    let cases = [
        (
            PoolOptions::new().max_size(0),
            "max_size is 0",
            "at least 1",
        ),
        (
            PoolOptions::new().max_size(2).min_idle(3),
            "min_idle 3 is more than max_size 2",
            "lower min_idle or raise max_size",
        ),
        (
            PoolOptions::new().connection_timeout(Duration::ZERO),
            "connection_timeout 0ns is out of range",
            "Duration::from_secs(30)",
        ),
        (
            PoolOptions::new().connection_timeout(Duration::MAX),
            "connection_timeout",
            "1ms to 3600s",
        ),
        (
            PoolOptions::new().database(""),
            "database \"\"",
            "1–63 bytes",
        ),
        (
            PoolOptions::new().rotate_before(Duration::from_millis(500)),
            "rotate_before 500ms",
            "at least 1 second",
        ),
        (
            PoolOptions::new().rotate_before(Duration::from_secs(24 * 3600)),
            "less than role \"app\"'s max lease",
            "give a shorter time or a longer max lease",
        ),
    ];
    for (options, cause, fix) in cases {
        let err = env.broker.pool_with("app", options).unwrap_err();
        assert_refused(&err, ErrorKind::InvalidConfig, cause, fix, &secrets);
    }
    let err = env.broker.pool("nope").unwrap_err();
    assert_refused(
        &err,
        ErrorKind::UnknownRole,
        "no role named \"nope\" is defined",
        "define it with Broker::write_role",
        &secrets,
    );
    assert_eq!(snapshot(&env), before);
}

#[test]
fn pool_whose_credential_cannot_log_in() {
    let (env, creds) = env_with_a_credential();
    env.broker
        .write_role(
            "nologin",
            Role::new().creation_sql(
                r#"CREATE ROLE "{{name}}" NOLOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"#,
            ),
        )
        .unwrap();
    let before = snapshot(&env);
    let secrets = [env.pg.admin_password(), creds.password()];
    // Issued, refused at the login, and revoked again.
    let err = env.broker.pool("nologin").unwrap_err();
    assert_refused(
        &err,
        ErrorKind::Connection,
        "is not permitted to log in",
        "check that the role's creation SQL grants LOGIN",
        &secrets,
    );
    assert_eq!(snapshot(&env), before);
    let err = env
        .broker
        .pool_with("app", PoolOptions::new().database("nosuchdb"))
        .unwrap_err();
    assert_refused(
        &err,
        ErrorKind::Connection,
        "database \"nosuchdb\" does not exist",
        "pg_hba.conf lets it connect to this database",
        &secrets,
    );
    assert_eq!(snapshot(&env), before);
}
