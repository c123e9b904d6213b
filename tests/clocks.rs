//! Server time, not client time: the orphan sweep compares `VALID UNTIL` with the server's clock.

mod common;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, DEFAULT_MARKER_ROLE};

/// Creates a marked role of instance `instance` whose `VALID UNTIL` is `valid_until` (a SQL expression), as
/// another instance would have left it; its recorded max is far ahead, so `VALID UNTIL` decides.
fn marked_role(admin: &mut postgres::Client, name: &str, instance: &str, valid_until: &str) {
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
               EXECUTE format('CREATE ROLE %I LOGIN VALID UNTIL %L', '{name}', ({valid_until})::text);
               EXECUTE format('COMMENT ON ROLE %I IS %L', '{name}',
                 'credbroker lease=postgresql/creds/app/{name} role=app instance={instance} \
                  issued=2020-01-01T00:00:00Z max=2099-01-01T00:00:00Z');
             END $$;
             GRANT {DEFAULT_MARKER_ROLE} TO \"{name}\";"
        ))
        .unwrap();
}

#[test]
fn the_orphan_sweep_reads_expiry_by_the_servers_clock_not_ours() {
    let pg = TestPostgres::start().unwrap();
    // This process's clock and the server's are the same here, so the server is made to *read* two hours
    // behind ours: a `now()` earlier on the admin's search_path than pg_catalog's. Seen from the broker, its
    // own clock is two hours ahead of the server's and of every other instance's, far more than a lease.
    let mut admin = pg.admin_client().unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {DEFAULT_MARKER_ROLE} NOLOGIN; CREATE SCHEMA skew;
             CREATE FUNCTION skew.now() RETURNS timestamptz LANGUAGE sql
               AS $$ SELECT pg_catalog.now() - interval '2 hours' $$;"
        ))
        .unwrap();
    // Live by the server's clock (ten minutes left), ended two hours ago by ours: another instance's.
    marked_role(
        &mut admin,
        "live_elsewhere",
        "other-1",
        "skew.now() + interval '10 minutes'",
    );
    // Ended five minutes ago by the server's clock, more than the sweep interval: an orphan.
    marked_role(
        &mut admin,
        "dead_elsewhere",
        "other-1",
        "skew.now() - interval '5 minutes'",
    );

    let skewed =
        pg.connection_string_with("sslmode=disable options='-c search_path=skew,pg_catalog'");
    let broker = Broker::builder()
        .connection(skewed)
        .instance_name("this-1")
        .build()
        .unwrap();
    // Recovery at start ran the orphan sweep.
    assert_eq!(
        common::roles_with_prefix(&pg, "dead_elsewhere"),
        Vec::<String>::new(),
        "an orphan by the server's clock is dropped"
    );
    assert_eq!(
        common::roles_with_prefix(&pg, "live_elsewhere"),
        ["live_elsewhere"],
        "a role live by the server's clock is left to its instance"
    );
    drop(broker);
}
