//! Pre-flight: `build()` names every right the admin lacks, each with the GRANT that fixes it.

mod common;

use std::time::Duration;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, ErrorKind, Role};

fn as_user(pg: &TestPostgres, user: &str) -> String {
    common::connection_as(pg, user, &format!("pw-{user}-1"))
}

#[test]
fn build_lists_every_missing_capability_with_its_fix() {
    let pg = TestPostgres::start().unwrap();
    let mut admin = pg.admin_client().unwrap();
    admin.batch_execute("CREATE DATABASE locked").unwrap();
    admin
        .batch_execute(
            "REVOKE CONNECT ON DATABASE locked FROM PUBLIC;
             CREATE ROLE weak LOGIN PASSWORD 'pw-weak-1';
             CREATE ROLE app_owner NOLOGIN;",
        )
        .unwrap();

    let err = Broker::builder()
        .connection(as_user(&pg, "weak"))
        .reassign_owned_to("app_owner")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permission);
    let message = err.to_string();
    let missing: Vec<&str> = message.lines().skip(1).collect();
    // REASSIGN OWNED needs the owner's privileges: on 16+ a membership must say INHERIT.
    let owner_grant = if pg.major_version().unwrap() >= 16 {
        r#"`GRANT "app_owner" TO "weak" WITH INHERIT TRUE;`"#
    } else {
        r#"`GRANT "app_owner" TO "weak";`"#
    };
    let fixes = [
        r#"`ALTER ROLE "weak" CREATEROLE;`"#,
        r#"`GRANT pg_signal_backend TO "weak";`"#,
        owner_grant,
        r#"`GRANT CONNECT ON DATABASE "locked" TO "weak";`"#,
    ];
    assert_eq!(missing.len(), fixes.len(), "{message}");
    for (line, fix) in missing.iter().zip(fixes) {
        assert!(line.contains(fix), "{line:?} should contain {fix}");
    }
    assert!(
        common::marked_roles(&pg).is_empty(),
        "a refused build creates nothing"
    );

    let err = Broker::builder()
        .connection(as_user(&pg, "weak"))
        .reassign_owned_to("nobody")
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains(r#""nobody", does not exist"#),
        "{err}"
    );

    // Everything but pg_signal_backend granted: the degraded mode must be asked for explicitly.
    admin
        .batch_execute(
            "ALTER ROLE weak CREATEROLE; GRANT app_owner TO weak; GRANT CONNECT ON DATABASE locked TO weak;",
        )
        .unwrap();
    let err = Broker::builder()
        .connection(as_user(&pg, "weak"))
        .reassign_owned_to("app_owner")
        .build()
        .unwrap_err();
    assert_eq!(err.to_string().lines().count(), 2, "{err}");
    let broker = Broker::builder()
        .connection(as_user(&pg, "weak"))
        .reassign_owned_to("app_owner")
        .terminate_sessions(false)
        .build()
        .unwrap();
    broker.write_role("app", Role::new()).unwrap();
    let creds = broker.creds("app").unwrap();
    let mut session = pg.login(creds.username(), creds.password()).unwrap();
    broker.revoke(creds.lease_id()).unwrap();
    assert!(common::roles_with_prefix(&pg, creds.username()).is_empty());
    // What the degraded mode gives up: the open session outlives its role.
    assert!(session.simple_query("SELECT 1").is_ok());
    drop(session);
    // On PostgreSQL 16+ a non-superuser that creates a role becomes a member of it with ADMIN OPTION: the admin
    // is listed among the marker role's members, without being a credential.
    let admin_as_member: Vec<String> = if pg.major_version().unwrap() >= 16 {
        vec!["weak".into()]
    } else {
        vec![]
    };
    assert!(common::eventually(Duration::from_secs(5), || {
        common::marked_roles(&pg) == admin_as_member
    }));
}
