//! A small service on `broker.pool("readonly")`: four worker threads query through one pool while its
//! credential rotates every few seconds, and none of them notices.
//!
//! `cargo run --example pool` starts a throwaway PostgreSQL server, gives the role a 2-second lease with a
//! 6-second max (so the pool renews every second and rotates every 4 seconds or so), runs the workers for
//! 20 seconds and prints `current_user` each time it changes, with the events the broker reports and what an
//! operator sees in `pg_stat_activity`. Pass a number of seconds as the first argument to run longer or shorter.

use std::collections::BTreeSet;
use std::error::Error;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use credbroker::testing::TestPostgres;
use credbroker::{
    Broker, ExpiredEvent, HandleEvent, IssuedEvent, PoolOptions, RevokedEvent, Role, RotatedEvent,
};

/// Prints the events an audit log would record (lease id and username; the broker never passes a password).
#[derive(Debug)]
struct AuditLog {
    start: Instant,
}

impl AuditLog {
    fn print(&self, what: &str, lease: &credbroker::Lease) {
        println!(
            "{:6.2}s  event: {what:<8} {}  user {}",
            self.start.elapsed().as_secs_f64(),
            lease.id(),
            lease.username()
        );
    }
}

impl HandleEvent for AuditLog {
    fn handle_issued(&self, e: IssuedEvent) {
        self.print("issued", &e.lease);
    }
    fn handle_rotated(&self, e: RotatedEvent) {
        self.print("rotated", &e.old);
    }
    fn handle_revoked(&self, e: RevokedEvent) {
        self.print(&format!("revoked ({})", e.cause), &e.lease);
    }
    fn handle_expired(&self, e: ExpiredEvent) {
        self.print("expired", &e.lease);
    }
}

fn main() -> Result<(), Box<dyn Error>> {
    let seconds: u64 = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 20,
    };
    let pg = TestPostgres::start()?;
    println!(
        "Started a throwaway PostgreSQL server on 127.0.0.1:{}\n",
        pg.port()
    );
    let start = Instant::now();
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .event_handler(AuditLog { start })
        .build()?;
    pg.admin_client()?.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric);
         INSERT INTO orders SELECT i, i * 1.5 FROM generate_series(1, 1000) i;",
    )?;
    broker.write_role(
        "readonly",
        Role::new()
            .creation_sql(
                r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
                   GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{name}}";"#,
            )
            .lease(Duration::from_secs(2), Duration::from_secs(6)),
    )?;
    let pool = broker.pool_with(
        "readonly",
        PoolOptions::new()
            .max_size(4)
            .rotate_before(Duration::from_secs(2)),
    )?;

    let stop = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let workers: Vec<_> = (0..4)
        .map(|n| {
            let (pool, stop, queries, seen) =
                (pool.clone(), stop.clone(), queries.clone(), seen.clone());
            std::thread::spawn(move || -> Result<(), String> {
                while !stop.load(Ordering::Relaxed) {
                    let mut client = pool.get().map_err(|e| format!("worker {n}: {e}"))?;
                    let row = client
                        .query_one(
                            "SELECT current_user::text, sum(total)::text FROM orders",
                            &[],
                        )
                        .map_err(|e| format!("worker {n}: query failed: {e}"))?;
                    let user: String = row.get(0);
                    if seen
                        .lock()
                        .map(|mut s| s.insert(user.clone()))
                        .unwrap_or(false)
                    {
                        println!(
                            "{:6.2}s  worker {n}: current_user is now {user}",
                            start.elapsed().as_secs_f64()
                        );
                    }
                    queries.fetch_add(1, Ordering::Relaxed);
                    drop(client);
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            })
        })
        .collect();

    // What an operator sees: one session per pooled connection, named after its lease.
    std::thread::sleep(Duration::from_secs(seconds / 2));
    println!("\n$ psql -c 'SELECT usename, application_name, state FROM pg_stat_activity WHERE usename LIKE ...'");
    for row in pg.admin_client()?.query(
        "SELECT usename::text, application_name, state FROM pg_stat_activity \
         WHERE usename LIKE 'readonly-%' ORDER BY 1",
        &[],
    )? {
        let (user, app, state): (String, String, Option<String>) =
            (row.get(0), row.get(1), row.get(2));
        println!("{user}  {app}  {}", state.unwrap_or_default());
    }
    println!();
    std::thread::sleep(Duration::from_secs(seconds - seconds / 2));

    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for worker in workers {
        if let Err(e) = worker.join().map_err(|_| "a worker panicked")? {
            println!("worker error: {e}");
            errors += 1;
        }
    }
    let stats = broker.stats();
    println!(
        "\n{} queries in {seconds} s, {errors} errors, {} credentials used; broker stats: issued {}, renewed {}, \
         rotated {}, revoked {}, expired {}, live now {:?}",
        queries.load(Ordering::Relaxed),
        seen.lock().map(|s| s.len()).unwrap_or(0),
        stats.issued,
        stats.renewed,
        stats.rotated,
        stats.revoked,
        stats.expired,
        stats.live
    );
    if errors > 0 {
        return Err("a worker saw an error".into());
    }
    Ok(())
}
