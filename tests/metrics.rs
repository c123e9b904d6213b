//! Metrics (feature `metrics`): what the broker records through the `metrics` facade, read back with
//! metrics-util's DebuggingRecorder.
#![cfg(feature = "metrics")]

mod common;

use std::time::Duration;

use common::eventually;
use credbroker::testing::TestPostgres;
use credbroker::{Broker, BrokerBuilder, ErrorKind, PoolOptions, Role};
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::MetricKind;

/// A recorded value: kind, name, sorted labels, value.
type Recorded = (MetricKind, String, Vec<(String, String)>, DebugValue);

/// Every value recorded since the last snapshot.
fn snapshot(snapshotter: &Snapshotter) -> Vec<Recorded> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (kind, key) = key.into_parts();
            let mut labels: Vec<(String, String)> = key
                .labels()
                .map(|l| (l.key().to_owned(), l.value().to_owned()))
                .collect();
            labels.sort();
            (kind, key.name().to_owned(), labels, value)
        })
        .collect()
}

#[test]
fn counters_gauges_and_histograms_are_recorded() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test binary");

    let pg = TestPostgres::start().expect("start PostgreSQL");
    let builder = || -> BrokerBuilder {
        Broker::builder()
            .connection(pg.connection_string())
            .instance_name("metrics-test")
    };
    let broker = builder().build().expect("build");
    let mut admin = pg.admin_client().unwrap();
    admin
        .batch_execute("CREATE TABLE audit (username text)")
        .unwrap();
    broker.write_role("app", Role::new()).unwrap();
    broker
        .write_role(
            "short",
            Role::new().lease(Duration::from_secs(1), Duration::from_secs(10)),
        )
        .unwrap();
    broker
        .write_role(
            "audited",
            Role::new().revocation_sql(
                r#"INSERT INTO audit VALUES ('{{name}}'); DROP ROLE IF EXISTS "{{name}}";"#,
            ),
        )
        .unwrap();
    broker
        .write_role(
            "rotating",
            Role::new().lease(Duration::from_secs(2), Duration::from_secs(3)),
        )
        .unwrap();

    let kept = broker.creds("app").unwrap();
    let revoked = broker.creds("app").unwrap();
    broker.renew(kept.lease_id(), None).unwrap();
    assert_eq!(
        broker
            .renew("postgresql/creds/app/nope", None)
            .unwrap_err()
            .kind(),
        ErrorKind::UnknownLease
    );
    broker.revoke(revoked.lease_id()).unwrap();
    let short = broker.creds("short").unwrap();
    // A revocation that fails (its audit table is gone), then is forced.
    let audited = broker.creds("audited").unwrap();
    admin.batch_execute("DROP TABLE audit").unwrap();
    assert_eq!(
        broker.revoke(audited.lease_id()).unwrap_err().kind(),
        ErrorKind::Revocation
    );
    broker.revoke_force(audited.lease_id()).unwrap();
    let pool = broker
        .pool_with(
            "rotating",
            PoolOptions::new()
                .rotate_before(Duration::from_secs(2))
                .min_idle(0),
        )
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || broker.stats().rotated >= 1
            && broker.lease(short.lease_id()).is_none()),
        "no rotation, or the short lease never expired"
    );
    drop(pool);
    drop(broker);
    // Restarted, the instance adopts the kept lease (and the pool's, kept too).
    let broker = builder().build().expect("restart");
    assert!(broker.lease(kept.lease_id()).is_some());

    let values = snapshot(&snapshotter);
    let find = |kind: MetricKind, name: &str, labels: &[(&str, &str)]| -> Option<&DebugValue> {
        values
            .iter()
            .find(|(k, n, l, _)| {
                *k == kind
                    && n == name
                    && l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(lk, lv)| l.iter().any(|(k, v)| k == lk && v == lv))
            })
            .map(|(_, _, _, v)| v)
    };
    let counter =
        |name: &str, labels: &[(&str, &str)]| match find(MetricKind::Counter, name, labels) {
            Some(DebugValue::Counter(n)) => *n,
            other => panic!("counter {name} {labels:?}: {other:?} in {values:#?}"),
        };
    let histogram =
        |name: &str, labels: &[(&str, &str)]| match find(MetricKind::Histogram, name, labels) {
            Some(DebugValue::Histogram(v)) => v.len(),
            other => panic!("histogram {name} {labels:?}: {other:?} in {values:#?}"),
        };
    let gauge = |name: &str, labels: &[(&str, &str)]| match find(MetricKind::Gauge, name, labels) {
        Some(DebugValue::Gauge(v)) => v.into_inner(),
        other => panic!("gauge {name} {labels:?}: {other:?} in {values:#?}"),
    };

    assert_eq!(counter("credbroker_issued_total", &[("role", "app")]), 2);
    assert_eq!(counter("credbroker_issued_total", &[("role", "short")]), 1);
    assert_eq!(counter("credbroker_renewed_total", &[("role", "app")]), 1);
    assert_eq!(
        counter(
            "credbroker_revoked_total",
            &[("role", "app"), ("cause", "requested")]
        ),
        1
    );
    assert_eq!(
        counter(
            "credbroker_revoked_total",
            &[("role", "audited"), ("cause", "forced")]
        ),
        1
    );
    assert_eq!(counter("credbroker_expired_total", &[("role", "short")]), 1);
    assert!(
        counter(
            "credbroker_revocation_failures_total",
            &[("role", "audited")]
        ) >= 1
    );
    assert!(counter("credbroker_rotated_total", &[("role", "rotating")]) >= 1);
    assert_eq!(counter("credbroker_adopted_total", &[("role", "app")]), 1);

    assert_eq!(gauge("credbroker_leases", &[("role", "app")]), 1.0);
    assert!(gauge("credbroker_sweeper_lag_seconds", &[]) >= 0.0);

    // Two issued for app, plus the restart's none: two timed creds calls that succeeded.
    assert_eq!(
        histogram(
            "credbroker_creds_duration_seconds",
            &[("role", "app"), ("outcome", "ok")]
        ),
        2
    );
    assert!(histogram("credbroker_renew_duration_seconds", &[("outcome", "ok")]) >= 1);
    assert_eq!(
        histogram("credbroker_renew_duration_seconds", &[("outcome", "error")]),
        1
    );
    assert!(histogram("credbroker_revoke_duration_seconds", &[("outcome", "ok")]) >= 1);
    assert_eq!(
        histogram(
            "credbroker_revoke_duration_seconds",
            &[("outcome", "error")]
        ),
        1
    );
}
