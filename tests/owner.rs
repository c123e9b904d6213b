//! Objects never gain rights by revocation: what a revoked credential owned goes to a role with no rights of its
//! own, and ending sessions after a drop touches only the roles this broker dropped.

mod common;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, ErrorKind, Role, DEFAULT_OWNER_ROLE};

/// What `whoami()` reports when run by `client`: the user it runs as, whether that user is a superuser, and
/// whether it can read the table only the admin can read.
fn whoami(client: &mut postgres::Client) -> (String, bool, bool) {
    let row = client
        .query_one("SELECT * FROM public.whoami()", &[])
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[test]
fn a_security_definer_function_runs_with_no_more_rights_after_revocation() {
    let env = common::start();
    env.admin()
        .batch_execute(
            "CREATE TABLE admin_only (secret text); REVOKE ALL ON admin_only FROM PUBLIC;
             CREATE ROLE bystander LOGIN PASSWORD 'bystander-pw-1';",
        )
        .unwrap();
    env.broker
        .write_role("app", Role::new().creation_sql(common::CREATES_TABLES))
        .unwrap();
    let creds = env.broker.creds("app").unwrap();
    env.pg
        .login(creds.username(), creds.password())
        .unwrap()
        .batch_execute(
            "CREATE FUNCTION public.whoami(OUT who text, OUT super bool, OUT reads_secret bool)
             LANGUAGE sql SECURITY DEFINER AS $$
               SELECT current_user::text, (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),
                      has_table_privilege('public.admin_only', 'SELECT')
             $$;",
        )
        .unwrap();
    let mut bystander = env.pg.login("bystander", "bystander-pw-1").unwrap();
    assert_eq!(
        whoami(&mut bystander),
        (creds.username().to_owned(), false, false),
        "before revocation the function runs as the credential"
    );

    env.broker.revoke(creds.lease_id()).unwrap();
    assert!(!env.role_exists(creds.username()));

    // The function survived, PUBLIC still executes it, and it runs as the owner role: not a superuser, not the
    // admin, and no more able to read the admin's table than before.
    let mut bystander = env.pg.login("bystander", "bystander-pw-1").unwrap();
    let (who, superuser, reads_secret) = whoami(&mut bystander);
    assert_eq!(who, DEFAULT_OWNER_ROLE);
    assert_ne!(who, env.pg.admin_user());
    assert!(
        !superuser && !reads_secret,
        "{who} {superuser} {reads_secret}"
    );
    let (login, createrole): (bool, bool) = {
        let row = env
            .admin()
            .query_one(
                "SELECT rolcanlogin, rolcreaterole FROM pg_roles WHERE rolname = $1",
                &[&DEFAULT_OWNER_ROLE],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        !login && !createrole,
        "the owner role is a bare NOLOGIN role"
    );
}

#[test]
fn an_owner_with_rights_to_give_away_is_refused() {
    let pg = TestPostgres::start().unwrap();
    pg.admin_client()
        .unwrap()
        .batch_execute("CREATE ROLE other_super SUPERUSER NOLOGIN")
        .unwrap();
    let build = |owner: &str| {
        Broker::builder()
            .connection(pg.connection_string())
            .reassign_owned_to(owner)
            .build()
            .map(drop)
            .unwrap_err()
    };
    let err = build("other_super");
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("is a superuser"), "{err}");
    assert!(err.to_string().contains("SECURITY DEFINER"), "{err}");
    // The test server's admin is a superuser: the old default is refused when asked for by name.
    let err = build(pg.admin_user());
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(
        err.to_string().contains("is the admin user, a superuser"),
        "{err}"
    );
    let err = build(credbroker::DEFAULT_MARKER_ROLE);
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("marker role"), "{err}");
    assert!(
        common::roles_with_prefix(&pg, "credbroker").is_empty(),
        "a refused build creates nothing"
    );
}

/// Whether a session that is still open answers.
fn alive(client: &mut postgres::Client) -> bool {
    client.simple_query("SELECT 1").is_ok()
}

#[test]
fn sessions_of_roles_someone_else_dropped_are_left_alone() {
    let env = common::start();
    env.admin()
        .batch_execute(
            "CREATE ROLE foreign_a LOGIN PASSWORD 'foreign-pw-1';
             CREATE ROLE foreign_b LOGIN PASSWORD 'foreign-pw-1';",
        )
        .unwrap();
    let mut sessions: Vec<postgres::Client> = ["foreign_a", "foreign_b"]
        .iter()
        .map(|user| env.pg.login(user, "foreign-pw-1").unwrap())
        .collect();
    // Dropped by someone else, not by the broker: their sessions live on (PostgreSQL lets them).
    env.admin()
        .batch_execute("DROP ROLE foreign_a; DROP ROLE foreign_b")
        .unwrap();
    assert!(sessions.iter_mut().all(alive));

    env.broker.write_role("plain", Role::new()).unwrap();
    env.broker
        .write_role("app", Role::new().creation_sql(common::CREATES_TABLES))
        .unwrap();
    // A role that owns and holds nothing is dropped in a batch; one that owns a table, one at a time: both
    // paths end sessions after the drop.
    let plain = env.broker.creds("plain").unwrap();
    let owning = env.broker.creds("app").unwrap();
    common::create_table_as(&env.pg, &owning, "owned_by_app");
    let mut plain_session = env.pg.login(plain.username(), plain.password()).unwrap();
    env.broker.revoke(plain.lease_id()).unwrap();
    env.broker.revoke(owning.lease_id()).unwrap();

    assert!(
        !alive(&mut plain_session),
        "the broker's own role's session ended"
    );
    for (i, session) in sessions.iter_mut().enumerate() {
        assert!(alive(session), "foreign session {i} was ended");
    }
}
