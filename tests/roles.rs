//! Defining roles: name checks, template checks against the server, and role bookkeeping.

mod common;

use std::time::Duration;

use credbroker::{ErrorKind, Role};

#[test]
fn bad_role_names_are_refused_and_nothing_is_stored() {
    let env = common::start();
    for bad in [
        "",
        "has space",
        "x;DROP ROLE admin",
        "quote\"d",
        "ünï",
        &"a".repeat(33),
    ] {
        let err = env.broker.write_role(bad, Role::new()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidRoleName, "{bad:?}");
        assert!(err.to_string().contains("1 to 32 characters"), "{err}");
    }
    assert!(env.broker.roles().is_empty());
}

#[test]
fn roles_are_listed_sorted_replaced_and_deleted() {
    let env = common::start();
    for name in ["zeta", "Alpha", "mid-1"] {
        env.broker.write_role(name, Role::new()).unwrap();
    }
    assert_eq!(env.broker.roles(), ["Alpha", "mid-1", "zeta"]);
    assert_eq!(env.broker.role("zeta"), Some(Role::new()));
    assert_eq!(env.broker.role("nope"), None);

    let replaced = Role::new().lease(Duration::from_secs(60), Duration::from_secs(120));
    env.broker.write_role("zeta", replaced.clone()).unwrap();
    assert_eq!(env.broker.role("zeta"), Some(replaced));
    env.broker.delete_role("Alpha").unwrap();
    assert_eq!(env.broker.roles(), ["mid-1", "zeta"]);
}

#[test]
fn sql_errors_are_reported_at_write_role_and_leave_nothing() {
    let env = common::start();
    let cases = [
        (
            r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; GRANT SELEC ON ALL TABLES IN SCHEMA public TO "{{name}}";"#,
            r#"unrecognized privilege type "selec""#,
        ),
        (
            // PostgreSQL quotes the token near a syntax error: here the verifier, which must be redacted.
            r#"CREATE ROLE "{{name}}" WITH LOGIN '{{password}}';"#,
            "syntax error at or near \"'<redacted>'\"",
        ),
        (
            r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; GRANT no_such_group TO "{{name}}";"#,
            r#"role "no_such_group" does not exist"#,
        ),
    ];
    for (sql, expected) in cases {
        let err = env
            .broker
            .write_role("broken", Role::new().creation_sql(sql))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::TemplateRejected, "{err}");
        assert!(err.to_string().contains(expected), "{err}");
        assert!(
            !err.to_string().contains("SCRAM-SHA-256"),
            "no verifier in errors: {err}"
        );
    }
    assert!(env.broker.role("broken").is_none());
    assert!(env.roles_with_prefix("broken-").is_empty());
}

#[test]
fn unknown_placeholders_are_refused_before_any_sql() {
    let env = common::start();
    let err = env
        .broker
        .write_role(
            "r",
            Role::new().creation_sql(r#"CREATE ROLE "{{name}}" PASSWORD '{{pasword}}'"#),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
    assert!(err.to_string().contains("{{pasword}}"), "{err}");
    let err = env
        .broker
        .write_role("r", Role::new().revocation_sql("DROP ROLE fixed_name"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
}

#[test]
fn do_blocks_and_semicolons_in_literals_work() {
    let env = common::start();
    env.admin()
        .batch_execute("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('a;b')")
        .unwrap();
    let role = Role::new().creation_sql(
        r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
           DO $$
           BEGIN
               IF (SELECT body FROM notes) = 'a;b' THEN
                   EXECUTE format('GRANT SELECT ON notes TO %I', '{{name}}');
               END IF;
           END
           $$;"#,
    );
    env.broker.write_role("reader", role).unwrap();
    let creds = env.broker.creds("reader").unwrap();
    let mut client = env.pg.login(creds.username(), creds.password()).unwrap();
    let body: String = client
        .query_one("SELECT body FROM notes", &[])
        .unwrap()
        .get(0);
    assert_eq!(body, "a;b");
}

#[test]
fn templates_that_commit_or_create_another_role_are_refused() {
    let env = common::start();
    let committing = Role::new().creation_sql(
        r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}'; COMMIT;"#,
    );
    let err = env.broker.write_role("committer", committing).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TemplateRejected);
    assert!(err.to_string().contains("ends the transaction"), "{err}");
    assert!(
        env.roles_with_prefix("committer-").is_empty(),
        "the sample role was cleaned up"
    );

    let elsewhere = Role::new().creation_sql(r#"CREATE ROLE "other_{{name}}" WITH LOGIN"#);
    let err = env.broker.write_role("elsewhere", elsewhere).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TemplateRejected);
    assert!(
        err.to_string()
            .contains("did not create a role named {{name}}"),
        "{err}"
    );
    assert!(env.roles_with_prefix("other_").is_empty());

    let keeps = Role::new().revocation_sql(r#"ALTER ROLE "{{name}}" NOLOGIN"#);
    let err = env.broker.write_role("keeps", keeps).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TemplateRejected);
    assert!(err.to_string().contains("does not drop the role"), "{err}");
    assert!(env.broker.roles().is_empty());
}

#[test]
fn role_lease_must_fit_the_brokers() {
    let env = common::start_with(|b| b.lease(Duration::from_secs(60), Duration::from_secs(600)));
    let err = env
        .broker
        .write_role(
            "long",
            Role::new().lease(Duration::from_secs(60), Duration::from_secs(601)),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    let err = env
        .broker
        .write_role(
            "zero",
            Role::new().lease(Duration::ZERO, Duration::from_secs(60)),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(env.broker.roles().is_empty());
}
