//! A small async service on a throwaway PostgreSQL server: request handlers query through a sqlx pool whose
//! credential the broker rotates every 3 seconds. It prints `current_user` each time it changes (a new credential), and stops by
//! itself after 20 seconds.
//!
//! `cargo run --example sqlx_service --features testing,sqlx`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use credbroker::testing::TestPostgres;
use credbroker::{Broker, PoolOptions, Role, SqlxPool};

/// One "request": what a handler in axum or tonic would do with the pool it was given.
async fn handle(pool: &SqlxPool, id: usize) -> Result<String, sqlx::Error> {
    let (user, greeting): (String, String) =
        sqlx::query_as("SELECT current_user::text, 'request ' || $1::int || ' served'")
            .bind(i32::try_from(id % 1_000_000).unwrap_or(0))
            .fetch_one(&**pool)
            .await?;
    debug_assert!(greeting.starts_with("request"));
    Ok(user)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pg = TestPostgres::start()?;
    // 2-second leases, renewed every second; at most 9 s, and the pool rotates 6 s before that: every 3 s.
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .lease(Duration::from_secs(2), Duration::from_secs(9))
        .build()?;
    broker.write_role("web", Role::new())?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (served, failed) = runtime.block_on(async {
        let options = PoolOptions::new()
            .max_size(8)
            .rotate_before(Duration::from_secs(6))
            .connection_timeout(Duration::from_secs(3));
        let pool = broker.sqlx_pool("web", options).await?;
        println!("serving as {} (lease {})", pool.username(), pool.lease_id());

        let served = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut seen = std::collections::HashSet::new();
        let mut id = 0;
        // Eight requests at a time, every 25 ms, for 20 seconds.
        while start.elapsed() < Duration::from_secs(20) {
            let mut batch = tokio::task::JoinSet::new();
            for _ in 0..8 {
                id += 1;
                let (pool, served, failed) = (pool.clone(), served.clone(), failed.clone());
                batch.spawn(async move {
                    match handle(&pool, id).await {
                        Ok(user) => {
                            served.fetch_add(1, Ordering::Relaxed);
                            Some(user)
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("request {id} failed: {e}");
                            None
                        }
                    }
                });
            }
            while let Some(done) = batch.join_next().await {
                if let Ok(Some(user)) = done {
                    if seen.insert(user.clone()) {
                        println!(
                            "{:>5.1} s  current_user = {user}",
                            start.elapsed().as_secs_f64()
                        );
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        pool.close().await;
        Ok::<_, Box<dyn std::error::Error>>((served, failed))
    })?;
    println!(
        "served {} requests, {} failed; the broker issued {} credentials and revoked {}",
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        broker.stats().issued,
        broker.stats().revoked
    );
    drop(runtime);
    drop(broker);
    Ok(())
}
