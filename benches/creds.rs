//! `creds()` and `renew()` against a baseline that runs the same SQL on a bare `postgres::Client`, side by side
//! in one run on one throwaway server, reported as ratios (the machines are shared and noisy).
//!
//! `cargo bench` runs it; `CREDBROKER_BENCH_N` sets the operations per measurement (default 300).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use credbroker::testing::TestPostgres;
use credbroker::{Broker, Role, DEFAULT_CREATION_SQL};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::var("CREDBROKER_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let pg = TestPostgres::start()?;
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .pool_size(1)
        .build()?;
    broker.write_role("bench", Role::new())?;
    let mut raw = pg.admin_client()?;

    // Warm both paths (pool connection, catalog caches) before measuring.
    broker.creds("bench")?;
    baseline_create(&mut raw, 0)?;

    let mut rows = Vec::new();
    for round in 0..2 {
        let base = time(n, |i| baseline_create(&mut raw, round * n + i + 1))?;
        let ours = time(n, |_| broker.creds("bench").map(drop))?;
        rows.push(("creds()", "CREATE ROLE in a transaction", ours, base));
    }
    let leases: Vec<_> = broker
        .leases()
        .into_iter()
        .map(|l| l.id().to_owned())
        .collect();
    let users: Vec<_> = broker
        .leases()
        .into_iter()
        .map(|l| l.username().to_owned())
        .collect();
    for _ in 0..2 {
        let base = time(n, |i| {
            let sql = format!(
                "ALTER ROLE \"{}\" VALID UNTIL '{}'",
                users[i % users.len()],
                humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(1800))
            );
            raw.batch_execute(&sql)
        })?;
        let ours = time(n, |i| {
            broker
                .renew(&leases[i % leases.len()], Some(Duration::from_secs(1800)))
                .map(drop)
        })?;
        rows.push(("renew()", "ALTER ROLE VALID UNTIL", ours, base));
    }

    println!("\n{n} operations each, one thread, PostgreSQL on 127.0.0.1, same server, same run");
    println!(
        "{:<10} {:>10} {:<30} {:>10} {:>7}",
        "operation", "ops/s", "baseline", "ops/s", "ratio"
    );
    for (op, baseline, ours, base) in rows {
        let (ours, base) = (n as f64 / ours.as_secs_f64(), n as f64 / base.as_secs_f64());
        println!(
            "{op:<10} {ours:>10.0} {baseline:<30} {base:>10.0} {:>7.2}",
            ours / base
        );
    }
    Ok(())
}

/// The broker's default creation SQL with the same work per credential: a fresh password and its SCRAM verifier.
fn baseline_create(client: &mut postgres::Client, i: usize) -> Result<(), postgres::Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = format!("baseline-{secs}-{i}");
    let password = format!("{:032x}", rand::random::<u128>());
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let expiration =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600))
            .to_string();
    let sql = DEFAULT_CREATION_SQL
        .replace("{{name}}", &name)
        .replace("{{password}}", &verifier)
        .replace("{{expiration}}", &expiration);
    let mut tx = client.transaction()?;
    tx.batch_execute(&sql)?;
    tx.commit()
}

fn time<E: std::error::Error + 'static>(
    n: usize,
    mut op: impl FnMut(usize) -> Result<(), E>,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let start = Instant::now();
    for i in 0..n {
        op(i)?;
    }
    Ok(start.elapsed())
}
