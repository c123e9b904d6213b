//! The broker against baselines that do the same work without it, side by side in one run on one throwaway
//! server, reported as ratios (the machines are shared and noisy; absolute figures move, ratios much less).
//!
//! | measurement | baseline |
//! |---|---|
//! | `creds()` at 1, 2, 4, 8 threads, SCRAM 4096 and 1 | the identical SQL (creation, marker, comment, one round trip) on a `postgres::Client` per thread |
//! | `AsyncBroker::creds()` (feature `tokio`), 1 and 4 tasks on a 2-worker runtime | `Broker::creds()` from as many plain threads, same broker |
//! | `Broker::creds()` from 1 and 4 tasks on a 2-worker runtime (the blocking API's detour through a thread of its own) | `Broker::creds()` from as many plain threads |
//! | `renew()` at 1, 2, 4, 8 threads | bare `ALTER ROLE … VALID UNTIL` per thread |
//! | `revoke()`, one thread | bare `DROP ROLE`, one per transaction |
//! | `pool.get()` + `SELECT 1` + return at 1, 2, 4 threads, 1 h lease (no rotation) | a bare `r2d2` pool of `r2d2_postgres` connections, same size, logged in with a credential of the same role; it pings (`simple_query("")`) at every checkout, ours only after 500 ms idle |
//! | the same loop at 4 threads while the pool rotates (lease 2 s, max 4 s: every 2 s), errors counted | the same pool with a 1 h lease (no rotation) |
//! | `sqlx_pool` acquire + `SELECT 1` + release at 4 tasks, without rotation, then rotating every 3 s (feature `sqlx`) | a plain sqlx `PgPool`, same size and options, logged in with a credential of the same role |
//! | the sweeper draining 10,000 expired leases | one `DROP ROLE` per transaction |
//! | a fleet of 40 brokers on one server (`max_connections = 60`): admin connections at rest and at peak, `creds()` at 40 threads (one per broker), expiry of 10,000 leases spread over the fleet, recovery after a restart | `creds()` of one broker, one thread |
//! | the lease table alone at 10k, 100k, 1M leases | — (targets: ≥ 1M insert+remove/s, ≤ 256 bytes per lease) |
//! | the sweeper's lateness with 100k live leases | — (target: p99 ≤ 50 ms) |
//! | `stats()` with 100k live leases | — (target: p99 ≤ 1 ms, to poll it every second) |
//!
//! `cargo bench --all-features` runs it all (a few minutes; without the features `tokio` and `sqlx`, the async
//! API's and sqlx's rows are left out); `CREDBROKER_BENCH_QUICK=1` runs smaller sizes,
//! `CREDBROKER_BENCH_TABLE_ONLY=1` only the lease table (no database, for profiling),
//! `CREDBROKER_BENCH_FLEET_ONLY=1` the lease table and the fleet rows,
//! `CREDBROKER_BENCH_CREDS_ONLY=1` only the `creds()` rows (blocking and async), and
//! `CREDBROKER_BENCH_POOL_ONLY=1` only the pool rows.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use credbroker::__bench::LeaseTableBench;
use credbroker::testing::{scram_verifier, TestPostgres};
use credbroker::{Broker, PoolOptions, Role, RolePool, ShutdownMode, DEFAULT_MARKER_ROLE};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Counts live heap bytes, so that bytes per lease are measured, not estimated.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One line of the result table.
struct Row {
    what: String,
    ours: String,
    baseline: String,
    ratio: Option<f64>,
    target: String,
    met: Option<bool>,
}

impl Row {
    fn new(what: impl Into<String>, ours: impl Into<String>) -> Row {
        Row {
            what: what.into(),
            ours: ours.into(),
            baseline: String::new(),
            ratio: None,
            target: String::new(),
            met: None,
        }
    }

    fn against(mut self, baseline: impl Into<String>, ratio: f64) -> Row {
        self.baseline = baseline.into();
        self.ratio = Some(ratio);
        self
    }

    fn target(mut self, target: impl Into<String>, met: bool) -> Row {
        self.target = target.into();
        self.met = Some(met);
        self
    }
}

/// Throughput and latency percentiles of a run.
struct Run {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    /// The slowest operation: where a stall that throughput and p99 average away shows (a rotation's logins).
    max: Duration,
    /// CPU time of this process (the client side) per operation.
    cpu: Duration,
    /// How long the run took.
    elapsed: Duration,
}

impl Run {
    /// The figures of a run that started at `start`, with the process's CPU time at `cpu_before`.
    fn of(mut all: Vec<Duration>, start: Instant, cpu_before: Duration) -> Run {
        let elapsed = start.elapsed();
        let cpu = process_cpu().saturating_sub(cpu_before);
        all.sort();
        Run {
            per_sec: all.len() as f64 / elapsed.as_secs_f64(),
            p50: percentile(&all, 0.5),
            p99: percentile(&all, 0.99),
            max: all.last().copied().unwrap_or_default(),
            cpu: cpu / all.len().max(1) as u32,
            elapsed,
        }
    }

    fn show(&self) -> String {
        format!(
            "{:.0}/s p50 {} p99 {} cpu {:.2} ms",
            self.per_sec,
            latency(self.p50),
            latency(self.p99),
            ms(self.cpu)
        )
    }
}

/// Milliseconds to one decimal, or two below 0.1 ms (a pooled `SELECT 1` takes a few hundredths).
fn latency(d: Duration) -> String {
    if d < Duration::from_micros(100) {
        format!("{:.2}", ms(d))
    } else {
        format!("{:.1}", ms(d))
    }
}

/// An error and its causes on one line (`postgres::Error` alone says only "db error").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// User plus system CPU time of this process so far (Linux, from `/proc/self/stat`, in clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let ticks = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the parenthesised command name; utime and stime are the 14th and 15th fields.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// How much work a run does: this many operations in all, or as many as fit in this long.
#[derive(Clone, Copy)]
enum Work {
    Ops(usize),
    For(Duration),
}

/// Runs `work` split over `threads` threads; `op(thread, i)` gets its thread's state from `setup`.
fn run<S: Send>(
    threads: usize,
    work: Work,
    setup: impl Fn(usize) -> Result<S> + Sync,
    op: impl Fn(&mut S, usize) -> Result<()> + Sync,
) -> Result<Run> {
    let states: Vec<S> = (0..threads).map(&setup).collect::<Result<_>>()?;
    let cpu_before = process_cpu();
    let start = Instant::now();
    // A timed run gives each thread a range of indices no other thread reaches.
    let (per_thread, until) = match work {
        Work::Ops(ops) => (ops / threads, None),
        Work::For(time) => (usize::MAX / threads, Some(start + time)),
    };
    let latencies: Vec<Vec<Duration>> = std::thread::scope(|scope| {
        let handles: Vec<_> = states
            .into_iter()
            .enumerate()
            .map(|(t, mut state)| {
                let op = &op;
                scope.spawn(move || -> std::result::Result<Vec<Duration>, String> {
                    let mut latencies = Vec::with_capacity(per_thread.min(1 << 16));
                    for i in 0..per_thread {
                        let began = Instant::now();
                        if until.is_some_and(|until| began >= until) {
                            break;
                        }
                        op(&mut state, t * per_thread + i).map_err(|e| chain(&*e))?;
                        latencies.push(began.elapsed());
                    }
                    Ok(latencies)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a bench thread panicked".to_string())?
            })
            .collect::<std::result::Result<_, String>>()
    })?;
    Ok(Run::of(
        latencies.into_iter().flatten().collect(),
        start,
        cpu_before,
    ))
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("benchmark failed: {}", chain(&*e));
        std::process::exit(1);
    }
}

/// Runs the baseline and ours `ROUNDS` times each, alternating which goes first (B O O B B O …), and keeps the
/// median run of each: a single pair is at the mercy of a checkpoint or a neighbour on the machine.
fn compare(
    mut base: impl FnMut() -> Result<Run>,
    mut ours: impl FnMut() -> Result<Run>,
) -> Result<(Run, Run)> {
    const ROUNDS: usize = 5;
    let (mut bases, mut ourses) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            bases.push(base()?);
            ourses.push(ours()?);
        } else {
            ourses.push(ours()?);
            bases.push(base()?);
        }
    }
    let median = |mut runs: Vec<Run>| {
        runs.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
        runs.swap_remove(ROUNDS / 2)
    };
    Ok((median(bases), median(ourses)))
}

fn bench() -> Result<()> {
    let quick = std::env::var_os("CREDBROKER_BENCH_QUICK").is_some();
    let pool_only = std::env::var_os("CREDBROKER_BENCH_POOL_ONLY").is_some();
    let mut rows = Vec::new();
    if !pool_only {
        lease_table(
            &mut rows,
            if quick {
                &[10_000, 100_000]
            } else {
                &[10_000, 100_000, 1_000_000]
            },
        );
    }

    if std::env::var_os("CREDBROKER_BENCH_TABLE_ONLY").is_some() {
        return print(rows);
    }
    if !pool_only {
        fleet(&mut rows, quick)?;
    }
    if std::env::var_os("CREDBROKER_BENCH_FLEET_ONLY").is_some() {
        return print(rows);
    }
    let pg = TestPostgres::start()?;
    let mut admin = pg.admin_client()?;
    admin.batch_execute(&format!("CREATE ROLE {DEFAULT_MARKER_ROLE} NOLOGIN"))?;
    if std::env::var_os("CREDBROKER_BENCH_CREDS_ONLY").is_some() {
        let ops = if quick { 200 } else { 800 };
        creds(&pg, &mut rows, ops)?;
        creds_in_runtime(&pg, &mut rows, ops)?;
        return print(rows);
    }
    if !pool_only {
        let ops = if quick { 200 } else { 800 };
        creds(&pg, &mut rows, ops)?;
        creds_in_runtime(&pg, &mut rows, ops)?;
        renew(&pg, &mut rows, if quick { 400 } else { 4000 })?;
        revoke(&pg, &mut rows, if quick { 200 } else { 1000 })?;
    }
    // Before the sweeper rows, which leave 100k roles in the catalog: the pool rows then see the same server
    // whether they run alone or not.
    pool(
        &pg,
        &mut rows,
        if quick { 5_000 } else { 50_000 },
        Duration::from_secs(if quick { 3 } else { 10 }),
    )?;
    #[cfg(feature = "sqlx")]
    sqlx_pools::bench(
        &pg,
        &mut rows,
        if quick { 5_000 } else { 40_000 },
        Duration::from_secs(if quick { 4 } else { 10 }),
    )?;
    if !pool_only {
        sweep(&pg, &mut rows, if quick { 2_000 } else { 10_000 })?;
        lateness(&pg, &mut rows, if quick { 10_000 } else { 100_000 })?;
    }

    print(rows)
}

/// Prints the result table (Markdown, so it can go into the README as it is).
fn print(rows: Vec<Row>) -> Result<()> {
    println!("\ncredbroker benchmark: PostgreSQL on 127.0.0.1, one server, one run");
    println!(
        "| {:<44} | {:<34} | {:<38} | {:>6} | {:<22} | {:<4} |",
        "measurement", "credbroker", "baseline", "ratio", "target", "met"
    );
    println!("|{}|", ["-"; 6].join("|"));
    for row in rows {
        println!(
            "| {:<44} | {:<34} | {:<38} | {:>6} | {:<22} | {:<4} |",
            row.what,
            row.ours,
            row.baseline,
            row.ratio.map_or(String::new(), |r| format!("{r:.2}")),
            row.target,
            row.met.map_or("", |m| if m { "yes" } else { "NO" })
        );
    }
    Ok(())
}

/// The in-memory lease table with no database: insert, lookup, renew, expire and insert+remove at `sizes`, and
/// the heap bytes per lease.
fn lease_table(rows: &mut Vec<Row>, sizes: &[usize]) {
    let base = SystemTime::now() + Duration::from_secs(3600);
    for &n in sizes {
        let mut table = LeaseTableBench::new();
        let keys: Vec<u128> = (0..n).map(|_| rand::random()).collect();
        let lease = |i: usize| {
            let expires = base + Duration::from_millis(i as u64 % 1_000_000);
            // Lease ids are random: so are the table's keys.
            table.lease(keys[i], expires)
        };
        let ids: Vec<String> = (0..n).map(|i| lease(i).id().to_owned()).collect();
        // Bytes the table holds once the leases handed to it (and freed by it) are gone: the table alone.
        let before = LIVE.load(Ordering::Relaxed);
        let leases: Vec<_> = (0..n).map(lease).collect();
        let start = Instant::now();
        for lease in leases {
            table.insert(lease);
        }
        let insert = start.elapsed();
        let bytes = (LIVE.load(Ordering::Relaxed) - before) as f64 / n as f64;

        let start = Instant::now();
        let found = ids
            .iter()
            .step_by(7)
            .filter(|id| table.contains(id))
            .count();
        let lookup = start.elapsed() / found.max(1) as u32;

        let start = Instant::now();
        let renewed = ids
            .iter()
            .step_by(7)
            .filter(|id| table.renew(id, base + Duration::from_secs(60)))
            .count();
        let renew = start.elapsed() / renewed.max(1) as u32;

        // At n live leases: insert a new one and remove an old one, as a steady issue-and-revoke load does.
        // Random keys, as real lease ids have (the table's hasher relies on it). `creds` inserts a lease it has
        // just built, so the new leases are built (untimed) in chunks of 256 just before they go in, not all
        // beforehand, where at 1M their strings would have left the cache by the time they were inserted.
        let churn = n.min(200_000);
        let mut elapsed = Duration::ZERO;
        for olds in ids[..churn].chunks(256) {
            let fresh: Vec<_> = olds
                .iter()
                .map(|_| table.lease(rand::random(), base + Duration::from_secs(7200)))
                .collect();
            let start = Instant::now();
            for (lease, old) in fresh.into_iter().zip(olds) {
                table.insert(lease);
                table.remove(old);
            }
            elapsed += start.elapsed();
        }
        let pairs_per_sec = churn as f64 / elapsed.as_secs_f64();

        let start = Instant::now();
        let mut expired = 0;
        while !table.is_empty() {
            expired += table.expire(base + Duration::from_secs(100_000), 256);
        }
        let expire = start.elapsed() / expired.max(1) as u32;

        let label = |what: &str| format!("lease table, {n} leases: {what}");
        rows.push(Row::new(
            label("insert / lookup / renew / expire"),
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0} ns",
                insert.as_nanos() as f64 / n as f64,
                lookup.as_nanos(),
                renew.as_nanos(),
                expire.as_nanos()
            ),
        ));
        rows.push(
            Row::new(
                label("insert+remove"),
                format!("{:.2} M pairs/s", pairs_per_sec / 1e6),
            )
            .target("≥ 1 M/s", pairs_per_sec >= 1e6),
        );
        rows.push(
            Row::new(label("heap bytes per lease"), format!("{bytes:.0} B"))
                .target("≤ 256 B", bytes <= 256.0),
        );
    }
}

/// The identical creation SQL `creds()` sends, run on a bare client: fresh password, its verifier, creation,
/// marker, admin group and comment, in one round trip.
fn raw_create(client: &mut postgres::Client, iterations: u32) -> Result<()> {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH)?.as_secs();
    let name = format!("raw-{secs}-{n:016}");
    let password = format!("{:032x}", rand::random::<u128>());
    let verifier = scram_verifier(&password, iterations)?;
    let at = |d: u64| humantime::format_rfc3339_seconds(now + Duration::from_secs(d)).to_string();
    let comment = format!(
        "credbroker lease=postgresql/creds/raw/{:032x} role=raw instance=bench issued={} max={}",
        rand::random::<u128>(),
        at(0),
        at(86_400)
    );
    client.batch_execute(&format!(
        "BEGIN;\nCREATE ROLE \"{name}\" WITH LOGIN PASSWORD '{verifier}' VALID UNTIL '{}';\n;\n\
         GRANT {DEFAULT_MARKER_ROLE} TO \"{name}\"; GRANT \"{name}\" TO {DEFAULT_MARKER_ROLE}_admin WITH ADMIN OPTION; \
         COMMENT ON ROLE \"{name}\" IS '{comment}';\n;\nCOMMIT;",
        at(3600)
    ))?;
    Ok(())
}

fn broker(pg: &TestPostgres, pool: u32, iterations: u32) -> Result<Broker> {
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .instance_name("bench")
        .pool_size(pool)
        .scram_iterations(iterations)
        .build()?;
    broker.write_role("bench", Role::new())?;
    Ok(broker)
}

/// Shuts `broker` down revoking every lease it holds, so the next measurement starts from a clean catalog.
fn revoke_all(broker: Broker) -> Result<()> {
    let mode = credbroker::ShutdownMode::Revoke {
        timeout: Duration::from_secs(120),
    };
    Ok(broker.shutdown(mode)?)
}

fn creds(pg: &TestPostgres, rows: &mut Vec<Row>, ops: usize) -> Result<()> {
    let mut default_rates = Vec::new();
    for iterations in [4096, 1] {
        for (k, threads) in [1, 2, 4, 8].into_iter().enumerate() {
            let broker = broker(pg, threads as u32 + 1, iterations)?;
            let _ = broker.creds("bench")?;
            let (base, ours) = compare(
                || {
                    run(
                        threads,
                        Work::Ops(ops),
                        |_| Ok(pg.admin_client()?),
                        |c, _| raw_create(c, iterations),
                    )
                },
                || {
                    run(
                        threads,
                        Work::Ops(ops),
                        |_| Ok(()),
                        |_, _| Ok(broker.creds("bench").map(drop)?),
                    )
                },
            )?;
            let ratio = ours.per_sec / base.per_sec;
            rows.push(
                Row::new(
                    format!("creds(), SCRAM {iterations}, {threads} threads"),
                    ours.show(),
                )
                .against(base.show(), ratio)
                .target("≥ 0.95× baseline", ratio >= 0.95),
            );
            if iterations == 4096 {
                default_rates.push(ours.per_sec);
            } else if let Some(default) = default_rates.get(k) {
                let speedup = ours.per_sec / default;
                let row = Row::new(
                    format!("creds() SCRAM 1 / SCRAM 4096, {threads} threads"),
                    format!("{speedup:.1}×"),
                );
                rows.push(if threads >= 4 {
                    row.target("≥ 4× at 4+ threads", speedup >= 4.0)
                } else {
                    row
                });
            }
            revoke_all(broker)?;
        }
    }
    // In bounded transactions: dropping tens of thousands of roles in one runs out of lock table.
    let mut admin = pg.admin_client()?;
    loop {
        let dropped = admin.query_one(
            "WITH gone AS (SELECT rolname FROM pg_roles WHERE rolname LIKE 'raw-%' LIMIT 1000) \
             SELECT count(*) FROM gone",
            &[],
        )?;
        if dropped.get::<_, i64>(0) == 0 {
            return Ok(());
        }
        admin.batch_execute(
            "DO $$ DECLARE r text; BEGIN \
             FOR r IN SELECT rolname FROM pg_roles WHERE rolname LIKE 'raw-%' LIMIT 1000 LOOP \
             EXECUTE format('DROP ROLE %I', r); END LOOP; END $$",
        )?;
    }
}

/// `ops` operations split over `tasks` tasks on `runtime`, each awaiting `op` one call after another.
fn run_tasks<F>(
    runtime: &tokio::runtime::Runtime,
    tasks: usize,
    ops: usize,
    op: impl Fn() -> F + Send + Sync + Clone + 'static,
) -> Result<Run>
where
    F: std::future::Future<Output = Result<()>> + Send,
{
    let cpu_before = process_cpu();
    let start = Instant::now();
    let latencies = runtime.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let op = op.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(ops / tasks);
                    for _ in 0..ops / tasks {
                        let began = Instant::now();
                        op().await.map_err(|e| chain(&*e))?;
                        latencies.push(began.elapsed());
                    }
                    Ok::<_, String>(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for handle in handles {
            all.extend(handle.await.map_err(|e| e.to_string())??);
        }
        Ok::<_, String>(all)
    })?;
    Ok(Run::of(latencies, start, cpu_before))
}

/// `creds()` called from async code: through the async API, and through the blocking API from a task (which
/// takes a detour through a thread of its own), each against the blocking API from plain threads, on the same
/// broker.
fn creds_in_runtime(pg: &TestPostgres, rows: &mut Vec<Row>, ops: usize) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    for threads in [1, 4] {
        let broker = std::sync::Arc::new(broker(pg, threads as u32 + 1, 4096)?);
        let _ = broker.creds("bench")?;
        let plain = || {
            run(
                threads,
                Work::Ops(ops),
                |_| Ok(()),
                |_, _| Ok(broker.creds("bench").map(drop)?),
            )
        };
        #[cfg(feature = "tokio")]
        {
            let handle = credbroker::AsyncBroker::from(broker.clone());
            let (base, ours) = compare(plain, || {
                let handle = handle.clone();
                run_tasks(&runtime, threads, ops, move || {
                    let handle = handle.clone();
                    async move { Ok(handle.creds("bench").await.map(drop)?) }
                })
            })?;
            let ratio = ours.per_sec / base.per_sec;
            rows.push(
                Row::new(
                    format!("AsyncBroker::creds() / sync, {threads} tasks / threads"),
                    ours.show(),
                )
                .against(base.show(), ratio)
                .target("≥ 0.95× sync", ratio >= 0.95),
            );
        }
        let (base, ours) = compare(plain, || {
            let broker = broker.clone();
            run_tasks(&runtime, threads, ops, move || {
                let broker = broker.clone();
                async move { Ok(broker.creds("bench").map(drop)?) }
            })
        })?;
        let ratio = ours.per_sec / base.per_sec;
        rows.push(
            Row::new(
                format!("creds() in tasks / plain threads, {threads}"),
                ours.show(),
            )
            .against(base.show(), ratio),
        );
        match std::sync::Arc::try_unwrap(broker) {
            Ok(broker) => revoke_all(broker)?,
            Err(_) => return Err("the bench's broker is still shared".into()),
        }
    }
    Ok(())
}

fn renew(pg: &TestPostgres, rows: &mut Vec<Row>, ops: usize) -> Result<()> {
    let broker = broker(pg, 9, 1)?;
    // A lease per operation: PostgreSQL refuses two concurrent ALTER ROLE of one role ("tuple concurrently
    // updated"), so no two threads renew the same one.
    let leases: Vec<(String, String)> = (0..ops)
        .map(|_| {
            broker
                .creds("bench")
                .map(|c| (c.lease_id().to_owned(), c.username().to_owned()))
        })
        .collect::<std::result::Result<_, _>>()?;
    for threads in [1, 2, 4, 8] {
        let (base, ours) = compare(
            || {
                run(
                    threads,
                    Work::Ops(ops),
                    |_| Ok(pg.admin_client()?),
                    |c, i| {
                        let until = humantime::format_rfc3339_seconds(
                            SystemTime::now() + Duration::from_secs(1800),
                        );
                        let user = &leases[i % leases.len()].1;
                        c.batch_execute(&format!("ALTER ROLE \"{user}\" VALID UNTIL '{until}'"))?;
                        Ok(())
                    },
                )
            },
            || {
                run(
                    threads,
                    Work::Ops(ops),
                    |_| Ok(()),
                    |_, i| {
                        let id = &leases[i % leases.len()].0;
                        broker.renew(id, Some(Duration::from_secs(1800)))?;
                        Ok(())
                    },
                )
            },
        )?;
        let ratio = ours.per_sec / base.per_sec;
        rows.push(
            Row::new(format!("renew(), {threads} threads"), ours.show())
                .against(base.show(), ratio)
                .target("≥ 0.95× baseline", ratio >= 0.95),
        );
    }
    revoke_all(broker)?;
    Ok(())
}

fn revoke(pg: &TestPostgres, rows: &mut Vec<Row>, n: usize) -> Result<()> {
    let broker = broker(pg, 2, 1)?;
    let ids: Vec<String> = (0..n)
        .map(|_| broker.creds("bench").map(|c| c.lease_id().to_owned()))
        .collect::<std::result::Result<_, _>>()?;
    let mut admin = pg.admin_client()?;
    admin.batch_execute(&format!(
        "DO $$ BEGIN FOR i IN 1..{n} LOOP EXECUTE format('CREATE ROLE %I LOGIN', 'plain-' || i); END LOOP; END $$"
    ))?;
    let base = run(
        1,
        Work::Ops(n),
        |_| Ok(pg.admin_client()?),
        |c, i| {
            c.batch_execute(&format!("DROP ROLE \"plain-{}\"", i + 1))?;
            Ok(())
        },
    )?;
    let ours = run(
        1,
        Work::Ops(n),
        |_| Ok(()),
        |_, i| Ok(broker.revoke(&ids[i])?),
    )?;
    rows.push(Row::new("revoke(), one thread", ours.show()).against(
        format!("DROP ROLE: {}", base.show()),
        ours.per_sec / base.per_sec,
    ));
    Ok(())
}

/// The application-side pool: `get()`, `SELECT 1` and return, against a bare r2d2 pool, then while rotating.
///
/// `SELECT 1` goes as a simple query (one round trip), so that the pool's own work per checkout shows rather
/// than hides behind the query's. The baseline is r2d2 with `r2d2_postgres`'s manager, whose `is_valid` pings
/// with `simple_query("")` at every checkout (`test_on_check_out`, r2d2's default): one more round trip per
/// `get()`. Ours pings only a connection idle for more than 500 ms, which a busy loop never has, so the first
/// rows measure mostly that round trip saved, and say so.
fn pool(pg: &TestPostgres, rows: &mut Vec<Row>, ops: usize, rotating_for: Duration) -> Result<()> {
    const HOUR: Duration = Duration::from_secs(3600);
    // The default SCRAM iterations: a rotation issues a credential and logs in with it, at the default's cost.
    let broker = broker(pg, 2, credbroker::DEFAULT_SCRAM_ITERATIONS)?;
    // A lease far longer than any measurement: no renewal (due at 30 min) and no rotation (at 2 h) while it runs.
    broker.write_role("steady", Role::new().lease(HOUR, 3 * HOUR))?;
    // Rotation `max / 3` (1.33 s) before the 4 s max, and lease times are whole seconds (rounded down): a new
    // credential every 2 s once the first (1.7–2.7 s after the pool opens) is made, with renewals between.
    broker.write_role(
        "rotating",
        Role::new().lease(Duration::from_secs(2), Duration::from_secs(4)),
    )?;
    let select = |client: &mut postgres::Client| -> Result<()> {
        client.simple_query("SELECT 1")?;
        Ok(())
    };
    // Revoked as the pool closes, between runs: left to expire, the sweeper would drop them during the next run.
    let options = |size: u32| {
        PoolOptions::new()
            .max_size(size)
            .min_idle(size)
            .on_drop(ShutdownMode::Revoke {
                timeout: Duration::from_secs(10),
            })
    };
    // Every connection open before the clock starts, as r2d2's `build()` makes them for the baseline.
    let open = |role: &str, size: u32| -> Result<RolePool> {
        let pool = broker.pool_with(role, options(size))?;
        let held = (0..size)
            .map(|_| pool.get())
            .collect::<std::result::Result<Vec<_>, _>>()?;
        drop(held);
        Ok(pool)
    };

    for threads in [1, 2, 4] {
        let size = threads as u32;
        let ours = open("steady", size)?;
        // The baseline's credential: the same role, so the same lease (1 h) and privileges.
        let credential = broker.creds("steady")?;
        let mut config = postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(pg.port())
            .user(credential.username())
            .password(credential.password())
            .dbname("postgres");
        let theirs = r2d2::Pool::builder()
            .max_size(size)
            .min_idle(Some(size))
            .test_on_check_out(true)
            .build(r2d2_postgres::PostgresConnectionManager::new(
                config,
                postgres::NoTls,
            ))?;
        let (base, mine) = compare(
            || {
                run(
                    threads,
                    Work::Ops(ops),
                    |_| Ok(()),
                    |_, _| select(&mut *theirs.get()?),
                )
            },
            || {
                run(
                    threads,
                    Work::Ops(ops),
                    |_| Ok(()),
                    |_, _| select(&mut *ours.get()?),
                )
            },
        )?;
        rows.push(
            Row::new(
                format!("pool.get() + SELECT 1 + return, {threads} threads"),
                mine.show(),
            )
            .against(
                format!("r2d2_postgres, pings: {}", base.show()),
                mine.per_sec / base.per_sec,
            ),
        );
    }

    // A fresh pool per run, so that each run holds its own rotations and no pool works in the background of
    // the other's run; errors are counted rather than ending the run, to see how many a rotation causes.
    let errors = std::sync::atomic::AtomicUsize::new(0);
    let first_error = std::sync::Mutex::new(None::<String>);
    let measure = |role: &str| -> Result<(Run, u64)> {
        let pool = open(role, 4)?;
        let rotated = broker.stats().rotated;
        let timed = run(
            4,
            Work::For(rotating_for),
            |_| Ok(()),
            |_, _| {
                if let Err(e) = pool
                    .get()
                    .map_err(Into::into)
                    .and_then(|mut c| select(&mut c))
                {
                    errors.fetch_add(1, Ordering::Relaxed);
                    let mut first = first_error.lock().map_err(|_| "poisoned")?;
                    first.get_or_insert_with(|| chain(&*e));
                }
                Ok(())
            },
        )?;
        Ok((timed, broker.stats().rotated - rotated))
    };
    let (mut rotations, mut steady_rotations, mut runs) = (0, 0, 0);
    let (base, mine) = compare(
        || {
            let (run, rotated) = measure("steady")?;
            steady_rotations += rotated;
            Ok(run)
        },
        || {
            let (run, rotated) = measure("rotating")?;
            rotations += rotated;
            runs += 1;
            Ok(run)
        },
    )?;
    let errors = errors.into_inner();
    if errors > 0 {
        let first = first_error.into_inner().map_err(|_| "poisoned")?;
        // The counters say whether a lease ran out (`expired`) instead of being renewed or revoked by its pool:
        // the sweeper then ended that lease's sessions, connections in use included.
        return Err(format!(
            "{errors} pool errors in the runs with and without rotation (there must be none); the first: {}; \
             broker counters: {:?}",
            first.unwrap_or_default(),
            broker.stats()
        )
        .into());
    }
    if rotations == 0 || steady_rotations > 0 {
        return Err(format!(
            "{rotations} rotations of the 2 s lease and {steady_rotations} of the 1 h lease in {runs} runs of \
             {rotating_for:?} each: the row would not compare rotating with not rotating"
        )
        .into());
    }
    let seconds = rotating_for.as_secs() * runs;
    rows.push(
        Row::new(
            format!("pool, 4 threads, {rotations} rotations in {seconds} s"),
            format!(
                "{} max {:.1} ms, {errors} errors",
                mine.show(),
                ms(mine.max)
            ),
        )
        .against(
            format!(
                "1 h lease, no rotation: {} max {:.1} ms",
                base.show(),
                ms(base.max)
            ),
            mine.per_sec / base.per_sec,
        ),
    );
    revoke_all(broker)
}

/// The sqlx pool against a plain sqlx `PgPool`.
#[cfg(feature = "sqlx")]
mod sqlx_pools {
    use super::*;

    use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

    /// Like [`run`], on `tasks` tokio tasks: `op` is one acquire + query + release.
    async fn run_tasks<F>(
        tasks: usize,
        work: Work,
        op: impl Fn() -> F + Clone + Send + 'static,
    ) -> Result<Run>
    where
        F: std::future::Future<Output = std::result::Result<(), String>> + Send,
    {
        let cpu_before = process_cpu();
        let start = Instant::now();
        let (per_task, until) = match work {
            Work::Ops(ops) => (ops / tasks, None),
            Work::For(time) => (usize::MAX, Some(start + time)),
        };
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let op = op.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(per_task.min(1 << 16));
                    for _ in 0..per_task {
                        let began = Instant::now();
                        if until.is_some_and(|until| began >= until) {
                            break;
                        }
                        op().await?;
                        latencies.push(began.elapsed());
                    }
                    Ok::<_, String>(latencies)
                })
            })
            .collect();
        let mut all = Vec::new();
        for handle in handles {
            all.extend(handle.await.map_err(|e| e.to_string())??);
        }
        Ok(Run::of(all, start, cpu_before))
    }

    /// `tasks` tasks doing acquire + `SELECT 1` + release on `pool`.
    async fn select(pool: PgPool, tasks: usize, work: Work) -> Result<Run> {
        run_tasks(tasks, work, move || {
            let pool = pool.clone();
            async move {
                let mut conn = pool.acquire().await.map_err(|e| e.to_string())?;
                sqlx::query("SELECT 1")
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            }
        })
        .await
    }

    pub(super) fn bench(
        pg: &TestPostgres,
        rows: &mut Vec<Row>,
        ops: usize,
        rotating_for: Duration,
    ) -> Result<()> {
        const TASKS: usize = 4;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let broker = broker(pg, 2, credbroker::DEFAULT_SCRAM_ITERATIONS)?;
        // 2-second leases renewed every second, up to an hour: the pool rotates when `rotate_before` says.
        let max = Duration::from_secs(3600);
        broker.write_role("web", Role::new().lease(Duration::from_secs(2), max))?;
        let options = |rotate_before: Duration| {
            PoolOptions::new()
                .max_size(TASKS as u32)
                .min_idle(TASKS as u32)
                .rotate_before(rotate_before)
                .connection_timeout(Duration::from_secs(2))
                .on_drop(ShutdownMode::Revoke {
                    timeout: Duration::from_secs(10),
                })
        };
        // The baseline: a credential of the same role, renewed to its max once (a plain pool does not renew).
        let credential = broker.creds("web")?;
        broker.renew(credential.lease_id(), Some(max))?;
        let plain = PgConnectOptions::new_without_pgpass()
            .host("127.0.0.1")
            .port(pg.port())
            .username(credential.username())
            .password(credential.password())
            .database("postgres")
            .ssl_mode(sqlx::postgres::PgSslMode::Disable);
        let theirs = runtime.block_on(async {
            let pool = PgPoolOptions::new()
                .max_connections(TASKS as u32)
                .min_connections(TASKS as u32)
                .connect_with(plain)
                .await?;
            // Every connection open before the clock starts, for both.
            let held = futures_open(&pool, TASKS).await?;
            drop(held);
            Ok::<_, sqlx::Error>(pool)
        })?;
        let open = |rotate_before: Duration| -> Result<credbroker::SqlxPool> {
            runtime.block_on(async {
                let pool = broker.sqlx_pool("web", options(rotate_before)).await?;
                drop(futures_open(&pool, TASKS).await?);
                Ok(pool)
            })
        };

        // No rotation (the first is due an hour after the pool opens); renewals every second.
        let ours = open(Duration::from_secs(1))?;
        let (base, mine) = compare(
            || runtime.block_on(select(theirs.clone(), TASKS, Work::Ops(ops))),
            || runtime.block_on(select((*ours).clone(), TASKS, Work::Ops(ops))),
        )?;
        drop(ours);
        rows.push(
            Row::new(
                format!("sqlx_pool acquire + SELECT 1, {TASKS} tasks, no rotation"),
                mine.show(),
            )
            .against(
                format!("plain sqlx PgPool: {}", base.show()),
                mine.per_sec / base.per_sec,
            )
            .target("≥ 0.95× baseline", mine.per_sec / base.per_sec >= 0.95),
        );

        // A rotation every 3 s: 3 s after the pool opens, and every 3 s after (rotate_before is the max less 3 s).
        let rotated_before = broker.stats().rotated;
        let (base, mine) = compare(
            || runtime.block_on(select(theirs.clone(), TASKS, Work::For(rotating_for))),
            || {
                let ours = open(max - Duration::from_secs(3))?;
                let run = runtime.block_on(select((*ours).clone(), TASKS, Work::For(rotating_for)));
                drop(ours);
                run
            },
        )?;
        let rotations = broker.stats().rotated - rotated_before;
        if rotations == 0 {
            return Err("no rotation in the sqlx pool's rotating runs".into());
        }
        rows.push(
            Row::new(
                format!(
                    "sqlx_pool, {TASKS} tasks, {rotations} rotations in 5 runs of {} s",
                    rotating_for.as_secs()
                ),
                format!("{} max {:.1} ms", mine.show(), ms(mine.max)),
            )
            .against(
                format!(
                    "plain sqlx PgPool: {} max {:.1} ms",
                    base.show(),
                    ms(base.max)
                ),
                mine.per_sec / base.per_sec,
            )
            .target("≥ 0.95× baseline", mine.per_sec / base.per_sec >= 0.95),
        );
        runtime.block_on(theirs.close());
        drop(runtime);
        revoke_all(broker)
    }

    /// Checks out `n` connections at once, so that all are open.
    async fn futures_open(
        pool: &PgPool,
        n: usize,
    ) -> std::result::Result<Vec<sqlx::pool::PoolConnection<sqlx::Postgres>>, sqlx::Error> {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(pool.acquire().await?);
        }
        Ok(held)
    }
}

/// Creates `n` marked roles of instance `instance` with lease comments, valid until `until`, in SQL (issuing them
/// one by one would take minutes of SCRAM work), as a crashed run of that instance would leave them.
fn marked_roles(
    pg: &TestPostgres,
    prefix: &str,
    instance: &str,
    n: usize,
    until: SystemTime,
) -> Result<()> {
    let at = humantime::format_rfc3339_seconds(until).to_string();
    let mut admin = pg.admin_client()?;
    for chunk in 0..n.div_ceil(1000) {
        let (first, last) = (chunk * 1000, ((chunk + 1) * 1000).min(n) - 1);
        admin.batch_execute(&format!(
            "DO $$ DECLARE u text; BEGIN
               FOR i IN {first}..{last} LOOP
                 u := '{prefix}-1764000000-' || lpad(i::text, 16, '0');
                 EXECUTE format('CREATE ROLE %I LOGIN VALID UNTIL %L', u, '{at}');
                 EXECUTE format('GRANT {DEFAULT_MARKER_ROLE} TO %I', u);
                 EXECUTE format('COMMENT ON ROLE %I IS %L', u, 'credbroker lease=postgresql/creds/{prefix}/' ||
                   '00000000-0000-0000-0000-' || lpad(to_hex(i), 12, '0') ||
                   ' role={prefix} instance={instance} issued=2025-11-24T16:00:00Z max={at}');
               END LOOP; END $$"
        ))?;
    }
    Ok(())
}

fn sweep(pg: &TestPostgres, rows: &mut Vec<Row>, n: usize) -> Result<()> {
    let mut admin = pg.admin_client()?;
    admin.batch_execute(&format!(
        "DO $$ BEGIN FOR i IN 1..{n} LOOP EXECUTE format('CREATE ROLE %I LOGIN', 'plain-' || i); END LOOP; END $$"
    ))?;
    let start = Instant::now();
    for i in 1..=n {
        admin.batch_execute(&format!("DROP ROLE \"plain-{i}\""))?;
    }
    let base = n as f64 / start.elapsed().as_secs_f64();

    // A whole second, as VALID UNTIL and lease expiries are.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let due = UNIX_EPOCH + Duration::from_secs(now + 3 + n as u64 / 2000);
    marked_roles(pg, "swept", "sweeper", n, due)?;
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .instance_name("sweeper")
        .build()?;
    let adopted = broker.leases().len();
    if adopted < n {
        let why =
            format!("only {adopted} of {n} leases adopted before they were due: machine too slow");
        return Err(why.into());
    }
    // The sweeper starts at `due`; the drain ends when the table is empty.
    while !broker.leases().is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let ours = adopted as f64 / SystemTime::now().duration_since(due)?.as_secs_f64();
    let ratio = ours / base;
    rows.push(
        Row::new(
            format!("sweeper draining {adopted} expired leases"),
            format!("{ours:.0} roles/s"),
        )
        .against(format!("DROP ROLE per transaction: {base:.0}/s"), ratio)
        .target("≥ 3× baseline", ratio >= 3.0),
    );
    Ok(())
}

fn lateness(pg: &TestPostgres, rows: &mut Vec<Row>, live: usize) -> Result<()> {
    marked_roles(
        pg,
        "live",
        "lateness",
        live,
        SystemTime::now() + Duration::from_secs(3600),
    )?;
    let broker = Broker::builder()
        .connection(pg.connection_string())
        .instance_name("lateness")
        .build()?;
    broker.write_role(
        "probe",
        Role::new().lease(Duration::from_secs(1), Duration::from_secs(60)),
    )?;
    let held = broker.leases().len();
    let mut pending: Vec<(String, SystemTime)> = Vec::new();
    let mut late: Vec<Duration> = Vec::new();
    let until = Instant::now() + Duration::from_secs(8);
    let mut next_issue = Instant::now();
    while Instant::now() < until || !pending.is_empty() {
        if Instant::now() >= next_issue && Instant::now() < until {
            let creds = broker.creds("probe")?;
            let expires = broker
                .lease(creds.lease_id())
                .map(|l| l.expires_at())
                .ok_or("no lease")?;
            pending.push((creds.lease_id().to_owned(), expires));
            next_issue += Duration::from_millis(40);
        }
        pending.retain(|(id, expires)| {
            if broker.lease(id).is_some() {
                return true;
            }
            late.push(
                SystemTime::now()
                    .duration_since(*expires)
                    .unwrap_or_default(),
            );
            false
        });
        std::thread::sleep(Duration::from_millis(1));
    }
    late.sort();
    let (p50, p99) = (percentile(&late, 0.5), percentile(&late, 0.99));
    rows.push(
        Row::new(
            format!("sweeper lateness, {held} live leases"),
            format!(
                "p50 {:.1} ms p99 {:.1} ms ({} probes)",
                ms(p50),
                ms(p99),
                late.len()
            ),
        )
        .target("p99 ≤ 50 ms", p99 <= Duration::from_millis(50)),
    );

    // stats() is meant to be polled every second: its cost with this many leases live.
    let mut calls: Vec<Duration> = (0..1000)
        .map(|_| {
            let began = Instant::now();
            std::hint::black_box(broker.stats());
            began.elapsed()
        })
        .collect();
    calls.sort();
    let (p50, p99) = (percentile(&calls, 0.5), percentile(&calls, 0.99));
    rows.push(
        Row::new(
            format!("stats(), {held} live leases"),
            format!("p50 {:.1} µs p99 {:.1} µs", micros(p50), micros(p99)),
        )
        .target("p99 ≤ 1 ms", p99 <= Duration::from_millis(1)),
    );
    Ok(())
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// How many brokers make the fleet, on a server with `max_connections = 60`.
const FLEET: usize = 40;

/// A fleet of [`FLEET`] brokers with default pool settings on one server with `max_connections = 60`, as 40
/// instances of a service would run: admin connections held at rest and at peak, `creds()` over the whole fleet
/// (one thread per broker) against one broker's on one thread, the expiry of 10,000 leases spread over the fleet,
/// and how long after a server restart every broker issues again.
fn fleet(rows: &mut Vec<Row>, quick: bool) -> Result<()> {
    use std::sync::atomic::AtomicBool;
    let pg = TestPostgres::builder()
        .setting("max_connections", "60")
        .start()?;
    let app = "bench_fleet";
    let sessions = |client: &mut postgres::Client| -> i64 {
        client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .map(|row| row.get(0))
            .unwrap_or(-1)
    };
    // Samples the fleet's admin sessions every 20 ms until `stop` (reconnecting across a restart); the most seen
    // at once.
    let peak = |stop: &AtomicBool| -> i64 {
        let mut observer = None;
        let mut peak = 0;
        while !stop.load(Ordering::Relaxed) {
            if observer.is_none() {
                observer = pg.admin_client().ok();
            }
            if let Some(client) = observer.as_mut() {
                match sessions(client) {
                    -1 => observer = None,
                    n => peak = peak.max(n),
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    };
    let brokers: Vec<Broker> = (0..FLEET)
        .map(|i| -> Result<Broker> {
            let broker = Broker::builder()
                .connection(
                    pg.connection_string_with(&format!("sslmode=disable application_name={app}")),
                )
                .instance_name(format!("bench-fleet-{i}"))
                .scram_iterations(1)
                .build()?;
            broker.write_role("app", Role::new())?;
            Ok(broker)
        })
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_secs(1));
    let at_rest = sessions(&mut pg.admin_client()?);

    let ops = if quick { 400 } else { 2_000 };
    let one = run(
        1,
        Work::Ops(ops / 4),
        |_| Ok(&brokers[0]),
        |b, _| {
            let _ = b.creds("app")?;
            Ok(())
        },
    )?;
    let stop = AtomicBool::new(false);
    let (all, at_peak) = std::thread::scope(|scope| -> Result<(Run, i64)> {
        let watcher = scope.spawn(|| peak(&stop));
        let all = run(
            FLEET,
            Work::Ops(ops),
            |t| Ok(&brokers[t]),
            |b, _| {
                let _ = b.creds("app")?;
                Ok(())
            },
        );
        stop.store(true, Ordering::Relaxed);
        Ok((all?, watcher.join().map_err(|_| "the watcher panicked")?))
    })?;
    rows.push(
        Row::new(
            format!("fleet of {FLEET}: admin connections at rest / peak"),
            format!("{at_rest} / {at_peak} (max_connections 60)"),
        )
        .target(
            format!("≤ {FLEET} at rest"),
            (0..=FLEET as i64).contains(&at_rest),
        ),
    );
    rows.push(
        Row::new(
            format!("fleet of {FLEET}: creds(), 1 thread per broker"),
            all.show(),
        )
        .against(
            format!("one broker, 1 thread: {}", one.show()),
            all.per_sec / one.per_sec,
        ),
    );

    // Expiry: leases issued over the whole fleet with a lease long enough to issue them all first.
    let leases = if quick { 2_000 } else { 10_000 };
    let lease = Duration::from_secs_f64((leases as f64 / all.per_sec * 2.0).max(5.0));
    for broker in &brokers {
        broker.write_role("short", Role::new().lease(lease, lease))?;
    }
    let issued = run(
        FLEET,
        Work::Ops(leases),
        |t| Ok(&brokers[t]),
        |b, _| {
            let _ = b.creds("short")?;
            Ok(())
        },
    )?;
    let short = |b: &Broker| {
        b.leases()
            .into_iter()
            .filter(|l| l.role() == "short")
            .collect::<Vec<_>>()
    };
    let expires = |b: &Broker| short(b).iter().map(|l| l.expires_at()).collect::<Vec<_>>();
    let ends: Vec<SystemTime> = brokers.iter().flat_map(expires).collect();
    let first = ends.iter().min().copied().unwrap_or_else(SystemTime::now);
    let last = ends.iter().max().copied().unwrap_or_else(SystemTime::now);
    let deadline = Instant::now() + lease + Duration::from_secs(300);
    while brokers.iter().any(|b| !short(b).is_empty()) {
        if Instant::now() > deadline {
            return Err("the fleet did not drop its expired leases within 5 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let gone = SystemTime::now();
    let after_last = gone.duration_since(last).unwrap_or_default();
    let span = gone.duration_since(first).unwrap_or_default();
    rows.push(Row::new(
        format!(
            "fleet of {FLEET}: {} leases expiring",
            issued_count(&issued)
        ),
        format!(
            "all dropped {:.2} s after the last end ({:.0}/s over {:.1} s of ends)",
            after_last.as_secs_f64(),
            leases as f64 / span.as_secs_f64(),
            last.duration_since(first).unwrap_or_default().as_secs_f64()
        ),
    ));

    // Restart: every broker loops on creds() until one succeeds.
    let stop = AtomicBool::new(false);
    let (recovery, restart_peak, errors) = std::thread::scope(|scope| -> Result<_> {
        let watcher = scope.spawn(|| peak(&stop));
        pg.restart()?;
        let restarted = Instant::now();
        let workers: Vec<_> = brokers
            .iter()
            .map(|b| {
                scope.spawn(move || {
                    let mut errors = 0;
                    while b.creds("app").is_err() {
                        errors += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    (restarted.elapsed(), errors)
                })
            })
            .collect();
        let mut times = Vec::new();
        let mut errors = 0;
        for w in workers {
            let (time, e) = w.join().map_err(|_| "a fleet thread panicked")?;
            times.push(time);
            errors += e;
        }
        stop.store(true, Ordering::Relaxed);
        times.sort();
        Ok((
            times,
            watcher.join().map_err(|_| "the watcher panicked")?,
            errors,
        ))
    })?;
    rows.push(Row::new(
        format!("fleet of {FLEET}: recovery after a restart"),
        format!(
            "all issuing {:.2} s after (p50 {:.2} s), {errors} errors, peak {restart_peak} connections",
            recovery.last().copied().unwrap_or_default().as_secs_f64(),
            percentile(&recovery, 0.5).as_secs_f64()
        ),
    ));
    Ok(())
}

/// How many operations a run did.
fn issued_count(run: &Run) -> usize {
    (run.per_sec * run.elapsed.as_secs_f64()).round() as usize
}
