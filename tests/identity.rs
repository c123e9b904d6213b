//! Identity: credentials that act as a stable group role, username templates, password policies.

mod common;

use std::time::Duration;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, ErrorKind, Role, DEFAULT_MARKER_ROLE, DEFAULT_OWNER_ROLE};

/// `(current_user, session_user)` of a session.
fn who(client: &mut postgres::Client) -> (String, String) {
    let row = client
        .query_one("SELECT current_user::text, session_user::text", &[])
        .unwrap();
    (row.get(0), row.get(1))
}

#[test]
fn a_groups_tables_outlive_the_credential_that_made_them() {
    let env = common::start();
    env.broker
        .write_role("orders", Role::new().group("orders"))
        .unwrap();
    let group: (bool, bool) = {
        let row = env
            .admin()
            .query_one(
                "SELECT rolcanlogin, rolsuper FROM pg_roles WHERE rolname = 'orders'",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(group, (false, false), "the group is created NOLOGIN");
    env.admin()
        .batch_execute("GRANT USAGE, CREATE ON SCHEMA public TO orders")
        .unwrap();

    // The first credential runs the migration: its session is the group from the first statement.
    let first = env.broker.creds("orders").unwrap();
    let mut session = env.pg.login(first.username(), first.password()).unwrap();
    assert_eq!(
        who(&mut session),
        ("orders".to_owned(), first.username().to_owned())
    );
    session
        .batch_execute(
            "CREATE TABLE orders_table (id int PRIMARY KEY, item text);
             INSERT INTO orders_table VALUES (1, 'first');",
        )
        .unwrap();
    // A session may still step out of the group (`SET ROLE NONE`; `RESET ROLE` goes back to the group) and
    // create something of its own: revocation then hands it to the owner role, as for any credential.
    session
        .batch_execute("SET ROLE NONE; CREATE TABLE stray (x int); RESET ROLE;")
        .unwrap();
    assert_eq!(who(&mut session).0, "orders", "RESET ROLE is the group");
    drop(session);
    assert_eq!(
        common::table_owner(&env.pg, "postgres", "orders_table"),
        "orders"
    );
    env.broker.revoke(first.lease_id()).unwrap();
    assert!(!env.role_exists(first.username()));
    assert_eq!(
        common::table_owner(&env.pg, "postgres", "orders_table"),
        "orders",
        "the group's table is untouched by revocation"
    );
    assert_eq!(
        common::table_owner(&env.pg, "postgres", "stray"),
        DEFAULT_OWNER_ROLE
    );

    // The next credential reads and writes the table, and creates more of the group's objects.
    let second = env.broker.creds("orders").unwrap();
    let mut session = env.pg.login(second.username(), second.password()).unwrap();
    session
        .batch_execute(
            "INSERT INTO orders_table VALUES (2, 'second'); UPDATE orders_table SET item = 'FIRST' WHERE id = 1;",
        )
        .unwrap();
    let items: Vec<String> = session
        .query("SELECT item FROM orders_table ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(items, ["FIRST", "second"]);
    // Even after DISCARD ALL (what poolers send between clients) the session is the group again.
    session.batch_execute("DISCARD ALL").unwrap();
    assert_eq!(who(&mut session).0, "orders");
    drop(session);
    env.broker.revoke(second.lease_id()).unwrap();
    let rows: i64 = env
        .admin()
        .query_one("SELECT count(*) FROM orders_table", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 2, "the table and its rows survive every revocation");
    assert_eq!(common::members_of(&env.pg, "orders"), Vec::<String>::new());
}

#[test]
fn row_level_security_on_the_group_applies_to_every_credential() {
    let env = common::start();
    env.admin()
        .batch_execute(
            "CREATE ROLE orders NOLOGIN;
             CREATE TABLE documents (team text, body text);
             INSERT INTO documents VALUES ('orders', 'ours'), ('billing', 'theirs');
             ALTER TABLE documents ENABLE ROW LEVEL SECURITY;
             GRANT SELECT ON documents TO orders;
             CREATE POLICY team_rows ON documents FOR SELECT TO orders USING (team = current_user);",
        )
        .unwrap();
    env.broker
        .write_role("orders", Role::new().group("orders"))
        .unwrap();
    for _ in 0..2 {
        let creds = env.broker.creds("orders").unwrap();
        let mut session = env.pg.login(creds.username(), creds.password()).unwrap();
        let bodies: Vec<String> = session
            .query("SELECT body FROM documents", &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(bodies, ["ours"], "only the group's rows");
        drop(session);
        env.broker.revoke(creds.lease_id()).unwrap();
    }
    // Without the group, a credential sees nothing: the rows came through the group's policy and grant.
    env.broker.write_role("plain", Role::new()).unwrap();
    let creds = env.broker.creds("plain").unwrap();
    let err = env
        .pg
        .login(creds.username(), creds.password())
        .unwrap()
        .query("SELECT body FROM documents", &[])
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
}

/// Each `(group, why)`: `write_role` with that group is refused as bad configuration, saying `why`, and
/// writes nothing.
fn refused_groups(env: &common::Env, cases: &[(&str, &str)]) {
    for &(group, why) in cases {
        let err = env
            .broker
            .write_role("app", Role::new().group(group))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{group}: {err}");
        assert!(err.to_string().contains(why), "{group}: {err}");
        assert!(env.broker.role("app").is_none());
    }
}

#[test]
fn groups_that_log_in_or_are_superusers_or_the_brokers_own_are_refused() {
    let env = common::start();
    env.admin()
        .batch_execute(
            "CREATE ROLE static_app LOGIN PASSWORD 'static-pw-1'; CREATE ROLE mighty SUPERUSER NOLOGIN;",
        )
        .unwrap();
    let cases = [
        ("static_app", "it can log in"),
        ("mighty", "it is a superuser"),
        (DEFAULT_MARKER_ROLE, "the broker's own roles"),
        ("credbroker_lease_admin", "the broker's own roles"),
        (DEFAULT_OWNER_ROLE, "reassign_owned_to"),
        (env.pg.admin_user(), "it is a superuser"),
    ];
    refused_groups(&env, &cases);
    let err = env
        .broker
        .write_role("app", Role::new().group("x".repeat(64)))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(env.broker.role("app").is_none());
    assert!(common::members_of(&env.pg, "static_app").is_empty());

    // A template that fails leaves no group behind: the group is created only for a role that is written.
    let err = env
        .broker
        .write_role(
            "app",
            Role::new()
                .group("never_made")
                .creation_sql(r#"CREATE ROLE "{{name}}" LOGIN; GRANT nope TO "{{name}}";"#),
        )
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TemplateRejected, "{err}");
    assert!(!env.role_exists("never_made"));
}

#[test]
fn groups_with_rights_every_credential_would_hold_are_refused() {
    let env = common::start();
    let admin = env.pg.admin_user().to_owned();
    env.admin()
        .batch_execute(&format!(
            "CREATE ROLE maker NOLOGIN CREATEROLE; CREATE ROLE bypasser NOLOGIN BYPASSRLS;
             CREATE ROLE replicator NOLOGIN REPLICATION;
             CREATE ROLE in_admin NOLOGIN; GRANT \"{admin}\" TO in_admin;
             CREATE ROLE in_marker NOLOGIN; GRANT {DEFAULT_MARKER_ROLE} TO in_marker;
             CREATE ROLE in_owner NOLOGIN; GRANT {DEFAULT_OWNER_ROLE} TO in_owner;
             CREATE ROLE runs_programs NOLOGIN; GRANT pg_execute_server_program TO runs_programs;
             CREATE ROLE reads_files NOLOGIN; GRANT pg_read_server_files TO reads_files;
             CREATE ROLE middle NOLOGIN; GRANT pg_write_server_files TO middle;
             CREATE ROLE writes_files NOLOGIN; GRANT middle TO writes_files;
             CREATE ROLE boss NOLOGIN CREATEROLE; CREATE ROLE under_boss NOLOGIN; GRANT boss TO under_boss;
             CREATE ROLE plain NOLOGIN;"
        ))
        .unwrap();
    let cases = [
        ("maker", "CREATEROLE"),
        ("bypasser", "BYPASSRLS"),
        ("replicator", "REPLICATION"),
        ("in_admin", "the broker's admin"),
        ("in_marker", DEFAULT_MARKER_ROLE),
        ("in_owner", DEFAULT_OWNER_ROLE),
        ("runs_programs", "pg_execute_server_program"),
        ("reads_files", "pg_read_server_files"),
        ("writes_files", "pg_write_server_files"),
        ("under_boss", "\"boss\", a role with SUPERUSER, CREATEROLE"),
        ("pg_read_all_data", "predefined roles"),
    ];
    refused_groups(&env, &cases);
    // A plain NOLOGIN group passes, and its credentials log in.
    env.broker
        .write_role("app", Role::new().group("plain"))
        .unwrap();
    let creds = env.broker.creds("app").unwrap();
    let (current, _) = who(&mut env.pg.login(creds.username(), creds.password()).unwrap());
    assert_eq!(current, "plain");
}

#[test]
fn a_non_superuser_admin_needs_the_right_to_grant_an_existing_group() {
    let pg = TestPostgres::start().unwrap();
    pg.admin_client()
        .unwrap()
        .batch_execute(
            "CREATE ROLE broker_admin LOGIN CREATEROLE PASSWORD 'pw-broker_admin-1';
             GRANT pg_signal_backend TO broker_admin;
             CREATE ROLE existing_group NOLOGIN;",
        )
        .unwrap();
    let broker = Broker::builder()
        .connection(common::connection_as(
            &pg,
            "broker_admin",
            "pw-broker_admin-1",
        ))
        .build()
        .unwrap();
    // A group the admin creates itself it may always grant.
    broker
        .write_role("fresh", Role::new().group("fresh_group"))
        .unwrap();
    let creds = broker.creds("fresh").unwrap();
    let mut session = pg.login(creds.username(), creds.password()).unwrap();
    assert_eq!(who(&mut session).0, "fresh_group");
    drop(session);
    broker.revoke(creds.lease_id()).unwrap();

    let existing = Role::new().group("existing_group");
    if pg.major_version().unwrap() >= 16 {
        let err = broker.write_role("old", existing.clone()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Permission, "{err}");
        assert!(
            err.to_string().contains(
                r#"`GRANT "existing_group" TO "broker_admin" WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;`"#
            ),
            "{err}"
        );
        pg.admin_client()
            .unwrap()
            .batch_execute(
                "GRANT existing_group TO broker_admin WITH ADMIN OPTION, INHERIT FALSE, SET FALSE",
            )
            .unwrap();
    }
    broker.write_role("old", existing).unwrap();
    let creds = broker.creds("old").unwrap();
    let mut session = pg.login(creds.username(), creds.password()).unwrap();
    assert_eq!(
        who(&mut session),
        ("existing_group".to_owned(), creds.username().to_owned())
    );
    drop(session);
    broker.revoke(creds.lease_id()).unwrap();
    assert!(common::roles_with_prefix(&pg, "old-").is_empty());
}

#[test]
fn a_username_template_making_names_over_63_bytes_is_refused_at_write_role() {
    let instance = "a-rather-long-host-name.example.com/orders-service";
    let env = common::start_with(|b| b.instance_name(instance));
    let template = "{{instance}}-{{role}}-{{random 13}}";
    let err = env
        .broker
        .write_role("orders", Role::new().username_template(template))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTemplate, "{err}");
    assert!(err.to_string().contains("makes names of 71 bytes"), "{err}");
    assert!(env.broker.role("orders").is_none());
    // A replace on the time could lengthen names only for some digits: refused whatever the time now is.
    let long = "x".repeat(30);
    let template = format!(r#"{{{{unix_time | replace "4" "{long}"}}}}-{{{{random 13}}}}"#);
    let err = env
        .broker
        .write_role("orders", Role::new().username_template(template))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidTemplate, "{err}");
    assert!(env.broker.role("orders").is_none());
    // The same template with the instance cut down fits, and its names work end to end.
    let template = r#"{{instance | replace "/" "." | truncate 40}}-{{role}}-{{random 13}}"#;
    env.broker
        .write_role("orders", Role::new().username_template(template))
        .unwrap();
    let creds = env.broker.creds("orders").unwrap();
    let expected = format!("{}-orders-", &instance.replace('/', ".")[..40]);
    assert!(
        creds.username().starts_with(&expected) && creds.username().len() == 40 + 8 + 13,
        "{}",
        creds.username()
    );
    assert_eq!(
        who(&mut env.pg.login(creds.username(), creds.password()).unwrap()).1,
        creds.username()
    );
    assert_eq!(
        env.broker.lease(creds.lease_id()).unwrap().username(),
        creds.username()
    );
    env.broker.revoke(creds.lease_id()).unwrap();
    assert!(!env.role_exists(creds.username()));
}

#[test]
fn templated_credentials_are_recovered_by_marker_not_by_name() {
    let pg = TestPostgres::start().unwrap();
    let build = || {
        Broker::builder()
            .connection(pg.connection_string())
            .instance_name("web-1")
            .build()
            .unwrap()
    };
    let template = Role::new().username_template("z{{random 13}}");
    let broker = build();
    broker.write_role("app", template.clone()).unwrap();
    let creds = broker.creds("app").unwrap();
    assert!(creds.username().starts_with('z') && creds.username().len() == 14);
    broker.shutdown(credbroker::ShutdownMode::Keep).unwrap();

    let broker = build();
    let adopted = broker.lease(creds.lease_id()).expect("adopted at start");
    assert_eq!(adopted.username(), creds.username());
    broker.write_role("app", template).unwrap();
    broker.revoke(creds.lease_id()).unwrap();
    assert!(common::roles_with_prefix(&pg, creds.username()).is_empty());
}

#[test]
fn a_weak_password_policy_is_refused() {
    let env = common::start();
    let weak = credbroker::PasswordPolicy::new(20).charset("0123456789abcdef", 0);
    let err = env
        .broker
        .write_role("app", Role::new().password_policy(weak))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("80 bits"), "{err}");
    assert!(env.broker.role("app").is_none());
    // Minimums whose sum overflows: refused as impossible, not a panic nor a wrapped sum.
    let impossible = credbroker::PasswordPolicy::new(40)
        .charset("abcdefghijklmnopqrstuvwxyz", usize::MAX)
        .charset("0123456789", 1);
    let err = env
        .broker
        .write_role("app", Role::new().password_policy(impossible))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("lower the minimums"), "{err}");
    assert!(env.broker.role("app").is_none());
}

#[test]
fn a_policy_password_satisfies_the_policy_and_logs_in() {
    let env = common::start();
    // Quotes, backslashes and the like too: the password never reaches SQL, only its verifier does.
    let symbols = r##"!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~"##;
    let policy = credbroker::PasswordPolicy::new(30)
        .charset("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 2)
        .charset("0123456789", 2)
        .charset(symbols, 3);
    env.broker
        .write_role("app", Role::new().password_policy(policy))
        .unwrap();
    for _ in 0..3 {
        let creds = env.broker.creds("app").unwrap();
        let p = creds.password();
        let count = |set: &str| p.chars().filter(|c| set.contains(*c)).count();
        assert_eq!(p.len(), 30);
        assert!(count("ABCDEFGHIJKLMNOPQRSTUVWXYZ") >= 2, "{p}");
        assert!(count("0123456789") >= 2 && count(symbols) >= 3, "{p}");
        assert_eq!(
            count("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + count(symbols),
            30
        );
        let mut session = env.pg.login(creds.username(), p).unwrap();
        assert_eq!(who(&mut session).1, creds.username());
        drop(session);
        env.broker.revoke(creds.lease_id()).unwrap();
    }
}

#[test]
fn a_pg_hba_line_for_the_group_matches_every_credential() {
    let env = common::start();
    let mut admin = env.admin();
    for database in ["orders_only", "elsewhere"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {database}"))
            .unwrap();
    }
    let hba: String = admin.query_one("SHOW hba_file", &[]).unwrap().get(0);
    let rules = std::fs::read_to_string(&hba).unwrap();
    // Members of `orders` may reach `orders_only` and nothing else; everyone else keeps the old rules.
    std::fs::write(
        &hba,
        format!(
            "host orders_only +orders 127.0.0.1/32 scram-sha-256\nhost all +orders 127.0.0.1/32 reject\n{rules}"
        ),
    )
    .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    env.broker
        .write_role("orders", Role::new().group("orders"))
        .unwrap();
    env.broker.write_role("plain", Role::new()).unwrap();
    let orders = env.broker.creds("orders").unwrap();
    let plain = env.broker.creds("plain").unwrap();
    // The reload is asynchronous: wait until the group's rule is in force.
    assert!(common::eventually(Duration::from_secs(20), || {
        env.pg
            .login_to("elsewhere", orders.username(), orders.password())
            .is_err()
    }));
    env.pg
        .login_to("orders_only", orders.username(), orders.password())
        .unwrap();
    env.pg
        .login_to("elsewhere", plain.username(), plain.password())
        .unwrap();
}

/// `write_role` with a group that another session is creating at that moment, uncommitted: the broker's own
/// `CREATE ROLE` waits on that row and, once the other session commits, fails with a unique violation (23505).
/// The group that won must then be checked as an existing one: written if fit, refused if not.
fn write_role_while_another_session_creates(
    env: &common::Env,
    group: &str,
    attributes: &str,
) -> Result<(), credbroker::Error> {
    let mut other = env.admin();
    let mut tx = other.transaction().unwrap();
    tx.batch_execute(&format!("CREATE ROLE {group} {attributes}"))
        .unwrap();
    std::thread::scope(|scope| {
        let writing = scope.spawn(|| env.broker.write_role("app", Role::new().group(group)));
        let mut watcher = env.admin();
        let waiting = common::eventually(Duration::from_secs(60), || {
            watcher
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                     AND query LIKE 'CREATE ROLE%'",
                    &[],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 1
        });
        assert!(
            waiting,
            "the broker's CREATE ROLE never waited on the other session's"
        );
        tx.commit().unwrap();
        writing.join().unwrap()
    })
}

#[test]
fn a_group_another_session_creates_at_the_same_moment_is_checked_as_existing() {
    let env = common::start();
    write_role_while_another_session_creates(&env, "raced", "NOLOGIN").unwrap();
    let creds = env.broker.creds("app").unwrap();
    let (current, _) = who(&mut env.pg.login(creds.username(), creds.password()).unwrap());
    assert_eq!(current, "raced");
    env.broker.revoke(creds.lease_id()).unwrap();

    let err = write_role_while_another_session_creates(&env, "raced_login", "LOGIN").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("it can log in"), "{err}");
}

#[test]
fn five_hundred_concurrent_credentials_from_a_template_of_only_random_text_are_unique_and_log_in() {
    let env = common::start();
    env.broker
        .write_role("app", Role::new().username_template("{{random 13}}"))
        .unwrap();
    let names: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    (0..63)
                        .map(|_| {
                            let creds = env.broker.creds("app").unwrap();
                            let (_, session_user) =
                                who(&mut env.pg.login(creds.username(), creds.password()).unwrap());
                            assert_eq!(session_user, creds.username());
                            session_user
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let unique: std::collections::HashSet<&String> = names.iter().collect();
    assert_eq!(unique.len(), 504);
    assert!(names.iter().all(|n| n.len() == 13));
    assert_eq!(common::lease_usernames(&env.broker).len(), 504);
}
