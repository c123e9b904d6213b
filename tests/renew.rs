//! Renewing leases: VALID UNTIL moves with the lease, capped at the max lease.

mod common;

use std::time::{Duration, SystemTime};

use credbroker::{ErrorKind, Role};

#[test]
fn renew_moves_valid_until_and_is_capped_at_the_max_lease() {
    let env = common::start_with(|b| b.lease(Duration::from_secs(60), Duration::from_secs(600)));
    env.broker.write_role("app", Role::new()).unwrap();
    let creds = env.broker.creds("app").unwrap();
    let issued = env.broker.lease(creds.lease_id()).unwrap();

    let before = SystemTime::now();
    let lease = env
        .broker
        .renew(creds.lease_id(), Some(Duration::from_secs(300)))
        .unwrap();
    let grown = lease.expires_at().duration_since(before).unwrap();
    assert!(
        grown > Duration::from_secs(298) && grown <= Duration::from_secs(300),
        "{grown:?}"
    );
    assert_eq!(env.valid_until(creds.username()), Some(lease.expires_at()));
    assert_eq!(env.broker.lease(creds.lease_id()).unwrap(), lease);
    assert_eq!(lease.issued_at(), issued.issued_at());

    // Far past the max: capped at issue + 600 s, in the table and in the catalog alike.
    let lease = env
        .broker
        .renew(creds.lease_id(), Some(Duration::from_secs(86400)))
        .unwrap();
    assert_eq!(
        lease.expires_at(),
        issued.issued_at() + Duration::from_secs(600)
    );
    assert_eq!(lease.expires_at(), lease.max_expires_at());
    assert_eq!(env.valid_until(creds.username()), Some(lease.expires_at()));

    // None: the role's default lease from now.
    let lease = env.broker.renew(creds.lease_id(), None).unwrap();
    let grown = lease
        .expires_at()
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        grown > Duration::from_secs(57) && grown <= Duration::from_secs(60),
        "{grown:?}"
    );
    assert_eq!(env.valid_until(creds.username()), Some(lease.expires_at()));

    // The credential still logs in after renewals.
    env.pg.login(creds.username(), creds.password()).unwrap();
}

#[test]
fn renew_of_unknown_revoked_or_expired_leases_names_the_lease() {
    let env = common::start();
    env.broker
        .write_role(
            "brief",
            Role::new().lease(Duration::from_secs(1), Duration::from_secs(60)),
        )
        .unwrap();

    let err = env
        .broker
        .renew("postgresql/creds/brief/nope", None)
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownLease);
    assert!(
        err.to_string().contains("postgresql/creds/brief/nope"),
        "{err}"
    );

    let revoked = env.broker.creds("brief").unwrap();
    env.broker.revoke(revoked.lease_id()).unwrap();
    let err = env.broker.renew(revoked.lease_id(), None).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnknownLease);
    assert!(err.to_string().contains(revoked.lease_id()), "{err}");

    let expiring = env.broker.creds("brief").unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    let err = env.broker.renew(expiring.lease_id(), None).unwrap_err();
    // Either the sweeper has already dropped it, or it is past its end and waiting to be swept.
    assert!(
        matches!(
            err.kind(),
            ErrorKind::LeaseExpired | ErrorKind::UnknownLease
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains(expiring.lease_id()), "{err}");
}

#[test]
fn zero_increment_is_refused_and_changes_nothing() {
    let env = common::start();
    env.broker.write_role("app", Role::new()).unwrap();
    let creds = env.broker.creds("app").unwrap();
    let before = env.broker.lease(creds.lease_id()).unwrap();
    let err = env
        .broker
        .renew(creds.lease_id(), Some(Duration::ZERO))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert_eq!(env.broker.lease(creds.lease_id()).unwrap(), before);
    assert_eq!(env.valid_until(creds.username()), Some(before.expires_at()));
}

#[test]
fn custom_renew_sql_runs() {
    let env = common::start();
    env.admin()
        .batch_execute("CREATE TABLE renewals (username text, until timestamptz)")
        .unwrap();
    let role = Role::new().renew_sql(
        r#"ALTER ROLE "{{name}}" VALID UNTIL '{{expiration}}'; INSERT INTO renewals VALUES ('{{name}}', '{{expiration}}');"#,
    );
    env.broker.write_role("audited", role).unwrap();
    let creds = env.broker.creds("audited").unwrap();
    let lease = env
        .broker
        .renew(creds.lease_id(), Some(Duration::from_secs(120)))
        .unwrap();
    let row = env
        .admin()
        .query_one("SELECT username, until FROM renewals", &[])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), creds.username());
    assert_eq!(row.get::<_, SystemTime>(1), lease.expires_at());
    assert_eq!(env.valid_until(creds.username()), Some(lease.expires_at()));
}

#[test]
fn valid_until_is_the_leases_end_even_when_the_templates_leave_it_out() {
    let env = common::start();
    let role = Role::new()
        .creation_sql(r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}';"#)
        .renew_sql(r#"ALTER ROLE "{{name}}" CONNECTION LIMIT 5 -- no expiration here"#);
    env.broker.write_role("plain", role).unwrap();
    let creds = env.broker.creds("plain").unwrap();
    let lease = env.broker.lease(creds.lease_id()).unwrap();
    assert_eq!(env.valid_until(creds.username()), Some(lease.expires_at()));

    let renewed = env
        .broker
        .renew(creds.lease_id(), Some(Duration::from_secs(120)))
        .unwrap();
    assert_ne!(renewed.expires_at(), lease.expires_at());
    assert_eq!(
        env.valid_until(creds.username()),
        Some(renewed.expires_at())
    );
    let limit: i32 = env
        .admin()
        .query_one(
            "SELECT rolconnlimit FROM pg_roles WHERE rolname = $1",
            &[&creds.username()],
        )
        .unwrap()
        .get(0);
    assert_eq!(limit, 5, "the renew SQL ran too");
}

#[test]
fn concurrent_renewals_of_one_lease_all_succeed() {
    // PostgreSQL fails one of two concurrent ALTER ROLE of the same role ("tuple concurrently updated"); the
    // broker tries the loser again.
    let env = common::start_with(|b| b.pool_size(4));
    env.broker.write_role("app", Role::new()).unwrap();
    let creds = env.broker.creds("app").unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for i in 0..100 {
                    env.broker
                        .renew(creds.lease_id(), Some(Duration::from_secs(600 + i)))
                        .expect("a concurrent renewal succeeds");
                }
            });
        }
    });
    let lease = env.broker.lease(creds.lease_id()).unwrap();
    let valid_until = env.valid_until(creds.username()).unwrap();
    // The last renewal to reach PostgreSQL and the last to update the table may differ by a few seconds.
    let gap = lease
        .expires_at()
        .duration_since(valid_until)
        .or_else(|e| Ok::<_, ()>(e.duration()))
        .unwrap();
    assert!(gap <= Duration::from_secs(100), "{gap:?}");
}
