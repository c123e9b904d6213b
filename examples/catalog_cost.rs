//! Measures what marked roles cost the catalog and the orphan sweep, for "A fleet on one server" in docs/operations.md:
//! bytes per credential role in `pg_authid`, `pg_auth_members` and `pg_shdescription` (with their indexes), and
//! the orphan sweep's query at 100,000 marked roles (time and `EXPLAIN ANALYZE`), with none or all of them
//! expired. The roles are made in bulk with SQL as `creds` would make them (login, password, VALID UNTIL,
//! marker membership, lease comment).
//!
//! `cargo run --release --example catalog_cost` (about a minute); `CATALOG_COST_ROLES=10000` for fewer.

use std::time::Instant;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, Role};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The catalogs a credential's role adds rows to, with their indexes (and TOAST).
const CATALOG_BYTES: &str = "SELECT sum(pg_total_relation_size(c))::int8 FROM unnest(ARRAY[
    'pg_authid', 'pg_auth_members', 'pg_shdescription']::regclass[]) c";

fn main() -> Result<()> {
    let roles: usize = std::env::var("CATALOG_COST_ROLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let pg = TestPostgres::start()?;
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .build()?;
    broker.write_role("app", Role::new())?;
    // One real credential, so its comment has the broker's format; the bulk ones copy it. Their verifiers have 1
    // iteration (same size as 4096's): PostgreSQL 15 would spend 3 ms of CPU on each of 4096 iterations.
    let sample = broker.creds("app")?;
    let mut admin = pg.admin_client()?;
    let comment: String = admin
        .query_one(
            "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = $1",
            &[&sample.username()],
        )?
        .get(0);
    let verifier = credbroker::testing::scram_verifier("x", 1)?;
    admin.batch_execute("VACUUM FULL pg_authid, pg_auth_members, pg_shdescription")?;
    let before: i64 = admin.query_one(CATALOG_BYTES, &[])?.get(0);

    let start = Instant::now();
    let chunk = 5_000;
    for first in (0..roles).step_by(chunk) {
        let last = (first + chunk).min(roles);
        let body = format!(
            "DO $bulk$ DECLARE n int; BEGIN
               FOR n IN {first}..{last} - 1 LOOP
                 EXECUTE format('CREATE ROLE %I LOGIN PASSWORD %L VALID UNTIL %L', 'bulk_' || n, {verifier},
                                (now() + interval '1 hour')::text);
                 EXECUTE format('GRANT credbroker_lease TO %I', 'bulk_' || n);
                 EXECUTE format('COMMENT ON ROLE %I IS %L', 'bulk_' || n, {comment});
               END LOOP; END $bulk$",
            verifier = postgres_protocol::escape::escape_literal(&verifier),
            comment = postgres_protocol::escape::escape_literal(&comment),
        );
        admin.batch_execute(&body)?;
    }
    println!("created {roles} marked roles in {:.1?}", start.elapsed());
    admin.batch_execute("VACUUM FULL pg_authid, pg_auth_members, pg_shdescription")?;
    admin.batch_execute("ANALYZE")?;
    let after: i64 = admin.query_one(CATALOG_BYTES, &[])?.get(0);
    println!(
        "catalog (pg_authid + pg_auth_members + pg_shdescription, with indexes): {} kB -> {} kB, {} bytes per role",
        before / 1024,
        after / 1024,
        (after - before) / roles as i64
    );

    for (case, valid_until) in [
        ("none expired", "now() + interval '1 hour'"),
        ("all expired", "now() - interval '1 hour'"),
    ] {
        admin.batch_execute(&format!(
            "UPDATE pg_authid SET rolvaliduntil = {valid_until} WHERE rolname LIKE 'bulk\\_%'"
        ))?;
        for (name, query) in [
            (
                "every marked role (recovery)",
                credbroker::__bench::MARKED_ROLES_QUERY,
            ),
            (
                "orphan sweep (expired only)",
                credbroker::__bench::ORPHAN_CANDIDATES_QUERY,
            ),
        ] {
            let mut best = f64::MAX;
            let mut rows = 0;
            let marker = "credbroker_lease";
            let age = 60.0f64;
            let params: Vec<&(dyn postgres::types::ToSql + Sync)> = if name.starts_with("orphan") {
                vec![&marker, &age]
            } else {
                vec![&marker]
            };
            for _ in 0..3 {
                let start = Instant::now();
                rows = admin.query(query, &params)?.len();
                best = best.min(start.elapsed().as_secs_f64());
            }
            println!(
                "{case}: {name}: {rows} rows in {:.1} ms (best of 3)",
                best * 1e3
            );
            if case == "all expired" || name.starts_with("orphan") {
                let plan =
                    admin.query(&format!("EXPLAIN (ANALYZE, COSTS OFF) {query}"), &params)?;
                for row in plan {
                    println!("    {}", row.get::<_, String>(0));
                }
            }
        }
    }
    drop(broker);
    Ok(())
}
