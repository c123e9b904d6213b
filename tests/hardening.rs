//! Production hardening: nothing stalls, deadlocks or panics. A revocation stuck on a lock holds back no other
//! lease, handlers may call back into the broker, concurrent revocations of one lease join, and every
//! `Duration` setting is validated.

mod common;

use std::sync::{mpsc, Arc, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use common::{eventually, Recorder, CREATES_TABLES};
use credbroker::{
    Broker, ErrorKind, HandleEvent, PoolOptions, RenewedEvent, RevocationFailedEvent, RevokedEvent,
    Role, ShutdownMode, DEFAULT_CREATION_SQL,
};

/// Runs `f` on a thread of its own and fails the test if it has not returned within `limit` (a deadlock).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not return within {limit:?}: deadlock or unbounded wait"))
}

/// A credential of role `owner` (3 s lease: under load, 1 s ran out before its login) that owns table `held`, and an admin session holding that table
/// locked: dropping the role blocks on `REASSIGN OWNED` until the session lets go.
fn blocked_revocation(env: &common::Env) -> (credbroker::Credential, postgres::Client) {
    env.broker
        .write_role(
            "owner",
            Role::new()
                .creation_sql(CREATES_TABLES)
                .lease(Duration::from_secs(3), Duration::from_secs(60)),
        )
        .unwrap();
    let stuck = env.broker.creds("owner").unwrap();
    common::create_table_as(&env.pg, &stuck, "held");
    let mut locker = env.admin();
    locker
        .batch_execute("BEGIN; LOCK TABLE held IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    (stuck, locker)
}

#[test]
fn a_lease_expiring_while_another_revocation_waits_on_a_lock_is_dropped_on_time() {
    // The lock timeout is longer than the whole test: only workers running side by side keep the second lease
    // on time.
    let env = common::start_with(|b| {
        b.lock_timeout(Duration::from_secs(60))
            .statement_timeout(Duration::from_secs(120))
    });
    let (stuck, mut locker) = blocked_revocation(&env);
    env.broker
        .write_role(
            "plain",
            // Ends well after the stuck lease, so that the two are never due in one batch.
            Role::new().lease(Duration::from_secs(6), Duration::from_secs(60)),
        )
        .unwrap();
    let plain = env.broker.creds("plain").unwrap();
    let end = env.broker.lease(plain.lease_id()).unwrap().expires_at();
    // The stuck lease has expired and its revocation is waiting on the lock.
    assert!(eventually(Duration::from_secs(10), || env
        .broker
        .lease(stuck.lease_id())
        .is_some_and(
            |_| env.broker.stats().sweeper_lag > Duration::ZERO
        )));
    assert!(
        eventually(Duration::from_secs(15), || !env
            .role_exists(plain.username())),
        "the plain lease was held back by the stuck revocation"
    );
    let late = SystemTime::now().duration_since(end).unwrap_or_default();
    assert!(
        late < Duration::from_secs(5),
        "dropped {late:?} after its end"
    );
    assert!(
        env.role_exists(stuck.username()),
        "the stuck role is still blocked"
    );
    locker.batch_execute("ROLLBACK").unwrap();
    assert!(eventually(Duration::from_secs(20), || !env
        .role_exists(stuck.username())));
}

#[test]
fn a_revocation_that_times_out_on_a_lock_is_a_failed_attempt_retried_later() {
    let env = common::start_with(|b| b.lock_timeout(Duration::from_millis(300)));
    let (stuck, mut locker) = blocked_revocation(&env);
    assert!(eventually(Duration::from_secs(10), || !env
        .broker
        .failed_leases()
        .is_empty()));
    let failed = env.broker.failed_leases();
    assert_eq!(failed[0].id(), stuck.lease_id());
    assert!(
        failed[0]
            .last_error()
            .is_some_and(|e| e.contains("lock timeout")),
        "{:?}",
        failed[0].last_error()
    );
    // Fenced meanwhile: the role cannot log in.
    assert!(env.pg.login(stuck.username(), stuck.password()).is_err());
    locker.batch_execute("ROLLBACK").unwrap();
    assert!(eventually(Duration::from_secs(20), || !env
        .role_exists(stuck.username())));
    assert!(env.broker.leases().is_empty());
}

#[test]
fn a_lease_renewed_to_an_earlier_end_is_dropped_at_that_end() {
    let env = common::start();
    env.broker.write_role("app", Role::new()).unwrap();
    let creds = env.broker.creds("app").unwrap();
    // Let the sweeper go to sleep until the hour-long lease's end.
    std::thread::sleep(Duration::from_millis(300));
    let lease = env
        .broker
        .renew(creds.lease_id(), Some(Duration::from_secs(2)))
        .unwrap();
    assert!(lease.expires_at() < SystemTime::now() + Duration::from_secs(3));
    assert!(
        eventually(Duration::from_secs(8), || !env
            .role_exists(creds.username())),
        "the role outlived its new, earlier end"
    );
}

#[test]
fn a_templates_set_does_not_stay_on_the_admin_connections() {
    // One admin connection, so the session that ran the templates is the one looked at.
    let env = common::start_with(|b| b.pool_size(1));
    env.broker
        .write_role(
            "app",
            Role::new()
                .creation_sql(format!(
                    "{DEFAULT_CREATION_SQL}; SET application_name = 'leaked-by-creation'"
                ))
                .renew_sql(
                    r#"ALTER ROLE "{{name}}" VALID UNTIL '{{expiration}}'; SET application_name = 'leaked-by-renewal'"#,
                ),
        )
        .unwrap();
    let broker_sessions = |env: &common::Env| -> Vec<String> {
        env.admin()
            .query(
                "SELECT application_name FROM pg_stat_activity WHERE usename = current_user \
                 AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let creds = env.broker.creds("app").unwrap();
    assert_eq!(broker_sessions(&env), ["credbroker"]);
    env.broker.renew(creds.lease_id(), None).unwrap();
    assert_eq!(broker_sessions(&env), ["credbroker"]);
}

#[test]
fn dropping_the_broker_returns_within_its_bound_while_a_revocation_is_blocked() {
    for mode in [
        ShutdownMode::Keep,
        ShutdownMode::Revoke {
            timeout: Duration::from_secs(3),
        },
    ] {
        let env = common::start_with(|b| {
            b.lock_timeout(Duration::from_secs(60))
                .statement_timeout(Duration::from_secs(120))
                .shutdown_mode(mode)
        });
        let (stuck, mut locker) = blocked_revocation(&env);
        // A live lease too, for Revoke to work on.
        env.broker.write_role("plain", Role::new()).unwrap();
        let live = env.broker.creds("plain").unwrap();
        assert!(eventually(Duration::from_secs(10), || env
            .broker
            .stats()
            .sweeper_lag
            > Duration::ZERO));
        let common::Env { broker, pg } = env;
        let started = Instant::now();
        let result = within(Duration::from_secs(30), move || broker.shutdown(mode));
        let took = started.elapsed();
        // Keep waits 2 s for revocations in flight; Revoke its timeout of 3 s. Slack for a loaded machine.
        assert!(took < Duration::from_secs(8), "{mode:?} took {took:?}");
        match mode {
            ShutdownMode::Keep => {
                result.unwrap();
                assert!(
                    common::roles_with_prefix(&pg, "plain-").contains(&live.username().to_owned())
                );
            }
            _ => {
                let err = result.unwrap_err();
                assert_eq!(err.kind(), ErrorKind::Revocation, "{err}");
                // The live lease was revoked while the stuck one waited.
                assert!(common::roles_with_prefix(&pg, "plain-").is_empty());
            }
        }
        locker.batch_execute("ROLLBACK").unwrap();
        drop(stuck);
    }
}

/// A handler that calls back into the broker from inside its events, on other leases and on the lease it is
/// told about.
#[derive(Debug, Default)]
struct CallsBack {
    broker: OnceLock<Weak<Broker>>,
    /// Lease ids: A is revoked when renewed and renews B; when A is revoked, C is revoked.
    a: OnceLock<String>,
    b: OnceLock<String>,
    c: OnceLock<String>,
    record: Recorder,
}

impl CallsBack {
    fn broker(&self) -> Arc<Broker> {
        self.broker.get().and_then(Weak::upgrade).expect("broker")
    }
}

impl HandleEvent for CallsBack {
    fn handle_renewed(&self, e: RenewedEvent) {
        self.record.handle_renewed(e.clone());
        if Some(e.lease.id()) == self.a.get().map(String::as_str) {
            let broker = self.broker();
            broker.renew(self.b.get().unwrap(), None).unwrap();
            broker.revoke(e.lease.id()).unwrap();
            let _ = broker.stats();
        }
    }

    fn handle_revoked(&self, e: RevokedEvent) {
        self.record.handle_revoked(e.clone());
        if Some(e.lease.id()) == self.a.get().map(String::as_str) {
            self.broker().revoke(self.c.get().unwrap()).unwrap();
        }
    }

    fn handle_revocation_failed(&self, e: RevocationFailedEvent) {
        self.record.handle_revocation_failed(e.clone());
        // Give up at once; a second failure event of the same lease finds it forgotten.
        match self.broker().revoke_force(e.lease.id()) {
            Ok(()) => {}
            Err(err) => assert_eq!(err.kind(), ErrorKind::UnknownLease, "{err}"),
        }
    }
}

#[test]
fn event_handlers_may_call_any_broker_method_on_any_lease() {
    let pg = credbroker::testing::TestPostgres::start().unwrap();
    let handler = Arc::new(CallsBack::default());
    #[derive(Debug)]
    struct Shared(Arc<CallsBack>);
    impl HandleEvent for Shared {
        fn handle_renewed(&self, e: RenewedEvent) {
            self.0.handle_renewed(e)
        }
        fn handle_revoked(&self, e: RevokedEvent) {
            self.0.handle_revoked(e)
        }
        fn handle_revocation_failed(&self, e: RevocationFailedEvent) {
            self.0.handle_revocation_failed(e)
        }
    }
    let broker = Arc::new(
        Broker::builder()
            .connection(pg.connection_string())
            .event_handler(Shared(handler.clone()))
            .build()
            .unwrap(),
    );
    handler.broker.set(Arc::downgrade(&broker)).unwrap();
    broker.write_role("app", Role::new()).unwrap();
    // Its revocation fails once the table it writes to is gone.
    pg.admin_client()
        .unwrap()
        .batch_execute("CREATE TABLE revoked (username text)")
        .unwrap();
    broker
        .write_role(
            "stuck",
            Role::new().revocation_sql(
                r#"INSERT INTO revoked VALUES ('{{name}}'); DROP ROLE IF EXISTS "{{name}}";"#,
            ),
        )
        .unwrap();
    let [a, b, c] = [(); 3].map(|_| broker.creds("app").unwrap());
    let d = broker.creds("stuck").unwrap();
    handler.a.set(a.lease_id().to_owned()).unwrap();
    handler.b.set(b.lease_id().to_owned()).unwrap();
    handler.c.set(c.lease_id().to_owned()).unwrap();
    pg.admin_client()
        .unwrap()
        .batch_execute("DROP TABLE revoked")
        .unwrap();

    let (calls, ids) = (
        broker.clone(),
        [a.lease_id(), d.lease_id()].map(str::to_owned),
    );
    let failed = within(Duration::from_secs(60), move || {
        calls.renew(&ids[0], None).unwrap();
        calls.revoke(&ids[1]).unwrap_err()
    });
    assert_eq!(failed.kind(), ErrorKind::Revocation, "{failed}");
    let record = &handler.record;
    assert_eq!(record.of(a.lease_id()), ["renewed", "revoked"]);
    assert_eq!(record.of(b.lease_id()), ["renewed"]);
    assert_eq!(record.of(c.lease_id()), ["revoked"]);
    assert_eq!(
        record.of(d.lease_id()),
        ["revocation failed", "revoked (forced)"]
    );
    let left: Vec<_> = broker.leases().iter().map(|l| l.id().to_owned()).collect();
    assert_eq!(left, [b.lease_id().to_owned()]);
}

#[test]
fn eight_threads_revoking_one_lease_get_no_error_but_unknown_lease() {
    let events = Recorder::default();
    let env = common::start_with(|b| b.pool_size(8).event_handler(events.clone()));
    env.broker
        .write_role("app", Role::new().creation_sql(CREATES_TABLES))
        .unwrap();
    for round in 0..10 {
        let creds = env.broker.creds("app").unwrap();
        // Half the rounds with a table to hand over, so the revocation takes a few round trips more.
        if round % 2 == 0 {
            common::create_table_as(&env.pg, &creds, &format!("t{round}"));
        }
        let barrier = std::sync::Barrier::new(8);
        let outcomes: Vec<_> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        env.broker.revoke(creds.lease_id())
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let ok = outcomes.iter().filter(|o| o.is_ok()).count();
        for outcome in &outcomes {
            if let Err(e) = outcome {
                assert_eq!(e.kind(), ErrorKind::UnknownLease, "round {round}: {e}");
            }
        }
        assert!(ok >= 1, "round {round}: nobody revoked");
        assert!(!env.role_exists(creds.username()));
        assert_eq!(events.of(creds.lease_id()), ["issued", "revoked"]);
    }
}

#[test]
fn duration_max_in_every_setting_is_refused_or_works() {
    let pg = credbroker::testing::TestPostgres::start().unwrap();
    let max = Duration::MAX;
    let builder = || Broker::builder().connection(pg.connection_string());
    let refused = [
        ("connect_timeout", builder().connect_timeout(max)),
        ("statement_timeout", builder().statement_timeout(max)),
        ("lock_timeout", builder().lock_timeout(max)),
        (
            "orphan_sweep_interval",
            builder().orphan_sweep_interval(max),
        ),
        ("lease", builder().lease(max, max)),
        ("lock_timeout", builder().lock_timeout(Duration::ZERO)),
        ("failover_window", builder().failover_window(max)),
        (
            "failover_window",
            builder().failover_window(Duration::from_millis(10)),
        ),
    ];
    for (setting, b) in refused {
        let err = b.build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{setting}: {err}");
        assert!(err.to_string().contains(setting), "{err}");
    }

    // Accepted: a shutdown timeout of any length (saturated), a renewal increment (capped at the max lease).
    let broker = builder()
        .shutdown_mode(ShutdownMode::Revoke { timeout: max })
        .build()
        .unwrap();
    let err = broker
        .write_role("app", Role::new().lease(max, max))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    broker.write_role("app", Role::new()).unwrap();
    let creds = broker.creds("app").unwrap();
    let lease = broker.renew(creds.lease_id(), Some(max)).unwrap();
    assert_eq!(lease.expires_at(), lease.max_expires_at());
    for options in [
        PoolOptions::new().connection_timeout(max),
        PoolOptions::new().rotate_before(max),
    ] {
        let err = broker.pool_with("app", options).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    }
    let pool = broker
        .pool_with(
            "app",
            PoolOptions::new().on_drop(ShutdownMode::Revoke { timeout: max }),
        )
        .unwrap();
    drop(pool);
    // Drop with Revoke { timeout: Duration::MAX } revokes the lease and returns.
    within(Duration::from_secs(30), move || drop(broker));
    assert!(common::roles_with_prefix(&pg, "app-").is_empty());
}
