//! Hostile names through every path where the broker builds SQL: the marker role, the owner for `REASSIGN
//! OWNED`, database names found in the catalog, group roles in templates, the admin user itself, instance and
//! role names. Each reaches PostgreSQL as exactly the name given (quoted with `postgres_protocol::escape`), or is
//! refused with a clear error before any SQL; afterwards the catalog shows nothing but what was intended.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, ErrorKind, Role};
use postgres_protocol::escape::{escape_identifier as ident, escape_literal as literal};

/// Names that break SQL pasted together unquoted, or quoted by hand: quotes, statement separators, comments,
/// dollar quotes, backslashes, spaces, upper case, non-ASCII.
const HOSTILE: [&str; 7] = [
    r#"dq"; DROP ROLE admin; --"#,
    "sq'; DROP ROLE admin; --",
    "$$; DROP ROLE admin; $$",
    r"back\slash\'; --",
    "Mixed Case Name",
    "ünï-cødé ☃ Ω",
    "semi;colon--dash",
];

/// A hostile name of exactly `len` bytes whose last character takes two bytes, so that PostgreSQL's truncation
/// at 63 bytes would cut it.
fn edge(len: usize) -> String {
    let mut name = String::from("edge\"'; $$\\ -- ");
    while name.len() < len - 2 {
        name.push('x');
    }
    name.push('é');
    assert_eq!(name.len(), len);
    name
}

/// Every role in the catalog.
fn all_roles(pg: &TestPostgres) -> BTreeSet<String> {
    common::roles_with_prefix(pg, "").into_iter().collect()
}

/// `roles` with `added` and without `removed`.
fn changed(roles: &BTreeSet<String>, added: &[&str], removed: &[&str]) -> BTreeSet<String> {
    let mut roles = roles.clone();
    roles.extend(added.iter().map(|s| s.to_string()));
    for name in removed {
        assert!(roles.remove(*name), "{name:?} was not there");
    }
    roles
}

/// Whether `role` may log in.
fn can_login(pg: &TestPostgres, role: &str) -> bool {
    pg.admin_client()
        .unwrap()
        .query_one(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = $1",
            &[&role],
        )
        .unwrap()
        .get(0)
}

/// The roles holding privileges on table `table` in `database`.
fn grantees(pg: &TestPostgres, database: &str, table: &str) -> BTreeSet<String> {
    common::admin_in(pg, database)
        .query(
            "SELECT DISTINCT pg_get_userbyid(a.grantee)::text \
             FROM pg_class c, aclexplode(c.relacl) a WHERE c.relname = $1",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A libpq `key=value` value, quoted.
fn conn_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[test]
fn hostile_marker_roles_are_created_used_and_taken_away_exactly() {
    let pg = TestPostgres::start().unwrap();
    let markers: Vec<String> = HOSTILE
        .iter()
        .map(|s| s.to_string())
        .chain([edge(63)])
        .collect();
    for (i, marker) in markers.iter().enumerate() {
        let instance = format!("host-{i}.example:5432/app@x_y");
        let builder = || {
            Broker::builder()
                .connection(pg.connection_string())
                .marker_role(marker.as_str())
                .instance_name(&instance)
        };
        let before = all_roles(&pg);
        let broker = builder().build().unwrap();
        // The first build also creates the default owner role.
        let owner = credbroker::DEFAULT_OWNER_ROLE;
        let group = credbroker::admin_group(marker);
        let added: Vec<&str> = if before.contains(owner) {
            vec![marker, &group]
        } else {
            vec![marker, &group, owner]
        };
        assert_eq!(all_roles(&pg), changed(&before, &added, &[]), "{marker}");
        assert!(!can_login(&pg, marker));

        pg.admin_client()
            .unwrap()
            .batch_execute("CREATE TABLE audit (username text)")
            .unwrap();
        broker.write_role("app", Role::new()).unwrap();
        let audited = Role::new()
            .revocation_sql(r#"INSERT INTO audit VALUES ('{{name}}'); DROP ROLE "{{name}}";"#);
        broker.write_role("audited", audited).unwrap();
        let kept = broker.creds("app").unwrap();
        let gone = broker.creds("app").unwrap();
        let stuck = broker.creds("audited").unwrap();
        let mut issued = vec![kept.username(), gone.username(), stuck.username()];
        issued.sort();
        assert_eq!(common::members_of(&pg, marker), issued, "{marker}");
        broker.renew(kept.lease_id(), None).unwrap();

        broker.revoke(gone.lease_id()).unwrap();
        // revoke_force takes the marker away from a role whose revocation SQL fails.
        pg.admin_client()
            .unwrap()
            .batch_execute("DROP TABLE audit")
            .unwrap();
        broker.revoke_force(stuck.lease_id()).unwrap();
        assert_eq!(common::members_of(&pg, marker), [kept.username()]);

        // Recovery finds the live role through the marker.
        drop(broker);
        let broker = builder().build().unwrap();
        let adopted: Vec<String> = broker.leases().iter().map(|l| l.id().to_owned()).collect();
        assert_eq!(adopted, [kept.lease_id()], "{marker}");
        broker.revoke(kept.lease_id()).unwrap();
        assert!(common::members_of(&pg, marker).is_empty());
        assert_eq!(
            all_roles(&pg),
            changed(
                &before,
                &[added.as_slice(), &[stuck.username()]].concat(),
                &[]
            ),
            "only the marker, its admin group (and the owner role) and the role given up on remain"
        );
        assert!(!can_login(&pg, stuck.username()));
    }
}

#[test]
fn long_names_and_instance_names_outside_the_allowed_set_are_refused_before_any_sql() {
    // Nothing listens on this port: a builder that got as far as connecting would fail with Connection.
    let nowhere = format!(
        "host=127.0.0.1 port={} user=admin password=secret-pw-1 sslmode=disable connect_timeout=2",
        common::closed_port()
    );
    let builder = || Broker::builder().connection(&nowhere);
    let (long, fits) = (edge(64), edge(63));

    for (setting, refused) in [
        ("marker_role", builder().marker_role(long.as_str())),
        ("marker_role", builder().marker_role("")),
        (
            "reassign_owned_to",
            builder().reassign_owned_to(long.as_str()),
        ),
        ("reassign_owned_to", builder().reassign_owned_to("")),
    ] {
        let err = refused.build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        let message = err.to_string();
        assert!(message.contains(setting), "{message}");
        assert!(message.contains("must be 1–63 bytes long"), "{message}");
    }

    let too_long = "a".repeat(64);
    for instance in [
        "",
        "a b",
        "x'y",
        "x\"y",
        "a;b",
        "$$",
        "back\\slash",
        "é",
        "a=b",
        "line\nbreak",
        too_long.as_str(),
    ] {
        let err = builder().instance_name(instance).build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{instance:?}: {err}");
        assert!(
            err.to_string().contains("instance name"),
            "{instance:?}: {err}"
        );
    }

    // What fits goes on to connect.
    let longest_instance = format!("{}_.:@/-", "A".repeat(56));
    for fine in [
        builder().marker_role(fits.as_str()),
        builder().reassign_owned_to(fits.as_str()),
        builder().instance_name(longest_instance.as_str()),
    ] {
        assert_eq!(fine.build().unwrap_err().kind(), ErrorKind::Connection);
    }
}

#[test]
fn hostile_owner_and_database_names_in_multi_database_cleanup() {
    let pg = TestPostgres::start().unwrap();
    let owner = r#"Own"er's $$ \group; --"#;
    let fits = edge(63);
    let databases = [
        HOSTILE[0], HOSTILE[1], HOSTILE[2], HOSTILE[3], HOSTILE[5], &fits,
    ];
    let mut admin = pg.admin_client().unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {0} NOLOGIN; GRANT {0} TO CURRENT_USER",
            ident(owner)
        ))
        .unwrap();
    for db in databases {
        // CREATE DATABASE cannot share an implicit transaction with other statements.
        admin
            .batch_execute(&format!("CREATE DATABASE {}", ident(db)))
            .unwrap();
    }
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .reassign_owned_to(owner)
        .build()
        .unwrap();
    broker.write_role("app", Role::new()).unwrap();
    let creds = broker.creds("app").unwrap();
    let user = ident(creds.username());

    // In every database, the credential owns a table and holds a privilege on one it does not own.
    let everywhere: Vec<&str> = databases.iter().copied().chain(["postgres"]).collect();
    for db in &everywhere {
        common::admin_in(&pg, db)
            .batch_execute(&format!(
                "GRANT CREATE ON SCHEMA public TO {user};
                 CREATE TABLE granted (x int); GRANT SELECT ON granted TO {user};"
            ))
            .unwrap();
        pg.login_to(db, creds.username(), creds.password())
            .unwrap()
            .batch_execute("CREATE TABLE owned (x int)")
            .unwrap();
    }
    let before = all_roles(&pg);

    broker.revoke(creds.lease_id()).unwrap();

    assert_eq!(all_roles(&pg), changed(&before, &[], &[creds.username()]));
    for db in &everywhere {
        assert_eq!(common::table_owner(&pg, db, "owned"), owner, "in {db:?}");
        assert_eq!(grantees(&pg, db, "granted"), ["admin".to_owned()].into());
    }
    let found: BTreeSet<String> = admin
        .query("SELECT datname::text FROM pg_database", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for db in everywhere {
        assert!(found.contains(db), "{db:?} is still there: {found:?}");
    }
}

#[test]
fn a_least_privilege_admin_with_a_hostile_name() {
    let pg = TestPostgres::start().unwrap();
    let name = r#"Adm"in's; DROP ROLE admin; -- \ ü"#;
    let password = r#"pw 'q' "d" \b $$ ;"#;
    let owner = r#"Own"er's $$ group"#;
    let group = r#"Grp"; DROP ROLE admin; --"#;
    let locked = r#"Lock'd "db"; --"#;
    let mut superuser = pg.admin_client().unwrap();
    superuser
        .batch_execute(&format!(
            "CREATE ROLE {admin} LOGIN CREATEROLE PASSWORD {password};
             CREATE ROLE {owner} NOLOGIN; CREATE ROLE {group} NOLOGIN;
             GRANT CREATE ON SCHEMA public TO {admin} WITH GRANT OPTION;",
            admin = ident(name),
            password = literal(password),
            owner = ident(owner),
            group = ident(group),
        ))
        .unwrap();
    superuser
        .batch_execute(&format!("CREATE DATABASE {}", ident(locked)))
        .unwrap();
    superuser
        .batch_execute(&format!(
            "REVOKE CONNECT ON DATABASE {} FROM PUBLIC",
            ident(locked)
        ))
        .unwrap();
    common::admin_in(&pg, locked)
        .batch_execute(&format!("GRANT CREATE ON SCHEMA public TO {}", ident(name)))
        .unwrap();
    let connection = format!(
        "host=127.0.0.1 port={} user={} password={} dbname=postgres sslmode=disable",
        pg.port(),
        conn_value(name),
        conn_value(password)
    );
    let builder = |instance: &str| {
        Broker::builder()
            .connection(&connection)
            .instance_name(instance)
    };

    // Pre-flight names each missing right with a statement that, run as given, grants it.
    let before = all_roles(&pg);
    let err = builder("hostile-admin")
        .reassign_owned_to(owner)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permission, "{err}");
    let message = err.to_string();
    let fixes: Vec<&str> = message
        .lines()
        .skip(1)
        .map(|line| line.split('`').nth(1).expect("a statement in backticks"))
        .collect();
    assert_eq!(fixes.len(), 3, "{message}");
    assert_eq!(all_roles(&pg), before, "a refused build creates nothing");
    for fix in fixes {
        superuser.batch_execute(fix).unwrap();
    }
    if pg.major_version().unwrap() >= 16 {
        // A non-superuser may grant a group (as the template below does) only with ADMIN OPTION on it since 16;
        // CREATEROLE alone was enough before.
        superuser
            .batch_execute(&format!(
                "GRANT {} TO {} WITH ADMIN OPTION",
                ident(group),
                ident(name)
            ))
            .unwrap();
    }

    let broker = builder("hostile-admin")
        .reassign_owned_to(owner)
        .build()
        .unwrap();
    let role = Role::new().creation_sql(format!(
        r#"CREATE ROLE "{{{{name}}}}" WITH LOGIN PASSWORD '{{{{password}}}}' VALID UNTIL '{{{{expiration}}}}';
           GRANT CREATE ON SCHEMA public TO "{{{{name}}}}";
           GRANT {} TO "{{{{name}}}}";"#,
        ident(group)
    ));
    broker.write_role("app", role).unwrap();
    let revoked = broker.creds("app").unwrap();
    let kept = broker.creds("app").unwrap();
    let mut issued = vec![revoked.username(), kept.username()];
    issued.sort();
    // On 16+ the admin is a member too, by the grant of ADMIN OPTION above.
    let mut members = common::members_of(&pg, group);
    members.retain(|m| m != name);
    assert_eq!(members, issued);
    for creds in [&revoked, &kept] {
        let table = format!("owned_by_{}", creds.username().replace('-', "_"));
        pg.login(creds.username(), creds.password())
            .unwrap()
            .batch_execute(&format!("CREATE TABLE {} (x int)", ident(&table)))
            .unwrap();
        // Granted by the admin itself: DROP OWNED run by a CREATEROLE admin cannot remove another's grants.
        pg.login_to(locked, name, password)
            .unwrap()
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS granted (x int); GRANT SELECT ON granted TO {}",
                ident(creds.username())
            ))
            .unwrap();
    }
    let with_both = all_roles(&pg);

    broker.revoke(revoked.lease_id()).unwrap();
    let revoked_table = format!("owned_by_{}", revoked.username().replace('-', "_"));
    assert_eq!(common::table_owner(&pg, "postgres", &revoked_table), owner);
    assert_eq!(
        grantees(&pg, locked, "granted"),
        [name.to_owned(), kept.username().to_owned()].into()
    );
    let mut members = common::members_of(&pg, group);
    members.retain(|m| m != name);
    assert_eq!(members, [kept.username()]);

    // A restart without reassign_owned_to: the adopted lease's objects go to the default owner role, which
    // build() creates and makes this admin a member of.
    drop(broker);
    let broker = builder("hostile-admin").build().unwrap();
    assert_eq!(broker.leases()[0].id(), kept.lease_id());
    broker.revoke(kept.lease_id()).unwrap();
    let kept_table = format!("owned_by_{}", kept.username().replace('-', "_"));
    assert_eq!(
        common::table_owner(&pg, "postgres", &kept_table),
        credbroker::DEFAULT_OWNER_ROLE
    );
    assert_eq!(grantees(&pg, locked, "granted"), [name.to_owned()].into());
    assert!(common::members_of(&pg, group).iter().all(|m| m == name));
    assert_eq!(
        all_roles(&pg),
        changed(
            &with_both,
            &[credbroker::DEFAULT_OWNER_ROLE],
            &[revoked.username(), kept.username()]
        )
    );
}

#[test]
fn role_names_outside_the_allowed_set_never_reach_the_server() {
    let env = common::start_logging_everything();
    let (broker, pg) = (&env.broker, &env.pg);
    broker.write_role("app", Role::new()).unwrap();
    let creds = broker.creds("app").unwrap();
    let before = all_roles(pg);
    let long = format!("{}hostile", "a".repeat(26));
    let names: Vec<&str> = HOSTILE.iter().copied().chain([long.as_str()]).collect();
    for name in &names {
        for err in [
            broker.write_role(name, Role::new()).unwrap_err(),
            broker.creds(name).unwrap_err(),
            broker.delete_role(name).unwrap_err(),
        ] {
            assert_eq!(err.kind(), ErrorKind::InvalidRoleName, "{name:?}: {err}");
        }
        let id = format!("postgresql/creds/{name}/0");
        assert_eq!(
            broker.renew(&id, None).unwrap_err().kind(),
            ErrorKind::UnknownLease
        );
        assert_eq!(
            broker.revoke(&id).unwrap_err().kind(),
            ErrorKind::UnknownLease
        );
        assert_eq!(
            broker.revoke_force(&id).unwrap_err().kind(),
            ErrorKind::UnknownLease
        );
    }
    assert_eq!(all_roles(pg), before);
    assert!(broker.lease(creds.lease_id()).is_some());
    assert_eq!(broker.roles(), ["app"]);

    let log = pg.log_contents().unwrap();
    assert!(log.contains(creds.username()), "statements are logged");
    for name in names {
        assert!(!log.contains(name), "{name:?} reached the server:\n{log}");
    }
}

#[test]
fn a_marker_role_naming_an_existing_group_never_drops_members_the_broker_did_not_issue() {
    let pg = TestPostgres::start().unwrap();
    pg.admin_client()
        .unwrap()
        .batch_execute(
            "CREATE ROLE staff NOLOGIN;
             CREATE ROLE alice LOGIN VALID UNTIL '2000-01-01'; GRANT staff TO alice;
             CREATE ROLE bob LOGIN VALID UNTIL '2000-01-01'; GRANT staff TO bob;
             COMMENT ON ROLE bob IS 'credbroker lease=made-up';",
        )
        .unwrap();
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .marker_role("staff")
        .orphan_sweep_interval(Duration::from_secs(1))
        .lease(Duration::from_secs(1), Duration::from_secs(60))
        .build()
        .unwrap();
    broker.write_role("app", Role::new()).unwrap();
    let creds = broker.creds("app").unwrap();
    assert!(common::eventually(Duration::from_secs(15), || {
        common::roles_with_prefix(&pg, creds.username()).is_empty()
    }));
    // Long enough for the orphan sweeps at build and after an interval to have run.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(common::members_of(&pg, "staff"), ["alice", "bob"]);
    assert!(common::roles_with_prefix(&pg, creds.username()).is_empty());
}
