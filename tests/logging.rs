//! What the broker logs, and what the server logs of it: every lifecycle event with lease id and username, never
//! a password, a verifier (in the crate's log) or the admin password, through every path that reaches SQL.

mod common;

use std::time::Duration;

use credbroker::{testing, Broker, Credential, Error, PoolOptions, Role, ShutdownMode};

#[test]
fn logs_name_leases_and_users_but_no_secret() {
    common::logs::install();
    let env = common::start_logging_everything();
    let (broker, pg) = (&env.broker, &env.pg);
    let mut admin = env.admin();
    admin
        .batch_execute("CREATE TABLE revoked (u text); CREATE ROLE app_group NOLOGIN;")
        .unwrap();
    admin.batch_execute("CREATE DATABASE second").unwrap();
    broker
        .write_role(
            "app",
            Role::new()
                .lease(Duration::from_secs(1), Duration::from_secs(60))
                .revocation_sql(
                    r#"INSERT INTO revoked VALUES ('{{name}}'); DROP ROLE "{{name}}";"#,
                ),
        )
        .unwrap();
    broker
        .write_role(
            "grouped",
            Role::new().creation_sql(
                r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
                   GRANT app_group TO "{{name}}";"#,
            ),
        )
        .unwrap();
    broker.write_role("owner", Role::new()).unwrap();
    broker
        .write_role(
            "pooled",
            Role::new().lease(Duration::from_secs(2), Duration::from_secs(4)),
        )
        .unwrap();
    let mut errors: Vec<Error> = Vec::new();

    // A pool that renews, rotates and revokes on drop; the passwords it logged in with.
    let pool = broker
        .pool_with(
            "pooled",
            PoolOptions::new()
                .rotate_before(Duration::from_secs(1))
                .on_drop(ShutdownMode::Revoke {
                    timeout: Duration::from_secs(5),
                }),
        )
        .unwrap();
    let first = pool.get().unwrap();
    let mut pool_passwords = vec![testing::pool_password(&first)];
    let first_lease = first.lease_id().to_owned();
    drop(first);
    assert!(common::eventually(Duration::from_secs(10), || pool
        .lease_id()
        != first_lease));
    let second = pool.get().unwrap();
    pool_passwords.push(testing::pool_password(&second));
    assert!(pool_passwords[1].len() == 32 && pool_passwords[0] != pool_passwords[1]);
    let pool_debug = format!("{pool:?} {second:?}");
    drop(second);
    drop(pool);

    // Issue, renew, revoke, expire; a revocation SQL that fails, then a forced revocation.
    let renewed = broker.creds("app").unwrap();
    let lease = broker
        .renew(renewed.lease_id(), Some(Duration::from_secs(30)))
        .unwrap();
    let revoked = broker.creds("app").unwrap();
    broker.revoke(revoked.lease_id()).unwrap();
    let expiring = broker.creds("app").unwrap();
    assert!(common::eventually(Duration::from_secs(15), || broker
        .lease(expiring.lease_id())
        .is_none()));
    admin.batch_execute("DROP TABLE revoked").unwrap();
    let failing = broker.creds("app").unwrap();
    errors.push(broker.revoke(failing.lease_id()).unwrap_err());
    broker.revoke_force(failing.lease_id()).unwrap();

    // A role that owns a table in another database: cleaned up over a connection to it.
    let elsewhere = broker.creds("owner").unwrap();
    common::admin_in(pg, "second")
        .batch_execute(&format!(
            "GRANT CREATE ON SCHEMA public TO \"{}\"",
            elsewhere.username()
        ))
        .unwrap();
    pg.login_to("second", elsewhere.username(), elsewhere.password())
        .unwrap()
        .batch_execute("CREATE TABLE owned (x int)")
        .unwrap();
    broker.revoke(elsewhere.lease_id()).unwrap();

    // A creation that fails at run time: the group it grants was dropped after write_role.
    admin.batch_execute("DROP ROLE app_group").unwrap();
    errors.push(broker.creds("grouped").unwrap_err());

    // Credentials left to the next start of the same instance, which adopts them.
    let adopted = broker.creds("owner").unwrap();
    let verifier: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&adopted.username()],
        )
        .unwrap()
        .get(0);
    let builder = || Broker::builder().connection(pg.connection_string());
    let debug = [
        format!("{broker:?}"),
        format!("{:?}", builder()),
        format!("{lease:?}"),
        format!("{:?}", broker.leases()),
        format!("{errors:?}"),
        errors.iter().map(Error::to_string).collect(),
        pool_debug,
    ]
    .join("\n");
    drop(env.broker);
    let restarted = builder().build().unwrap();
    let mut live = vec![renewed.lease_id(), adopted.lease_id()];
    live.sort();
    let ids: Vec<String> = restarted
        .leases()
        .iter()
        .map(|l| l.id().to_owned())
        .collect();
    assert_eq!(ids, live);
    assert_eq!(restarted.revoke_prefix("").unwrap(), 2);
    drop(restarted);

    let issued: [&Credential; 6] = [
        &renewed, &revoked, &expiring, &failing, &elsewhere, &adopted,
    ];
    let debug = format!("{debug}\n{issued:?}");
    let lines = common::logs::lines();
    let crate_log = lines.join("\n");
    let server_log = pg.log_contents().unwrap();
    let places = [
        ("the crate's log", &crate_log),
        ("the server log", &server_log),
        ("a Debug or Display", &debug),
    ];
    let secrets: Vec<&str> = issued
        .iter()
        .map(|c| c.password())
        .chain(pool_passwords.iter().map(String::as_str))
        .chain([pg.admin_password()])
        .collect();
    for (what, text) in places {
        for secret in &secrets {
            assert!(!text.contains(secret), "a password in {what}:\n{text}");
        }
    }
    for (what, text) in [places[0], places[2]] {
        assert!(
            !text.contains("SCRAM-SHA-256"),
            "a verifier in {what}:\n{text}"
        );
    }
    for creds in issued {
        assert!(
            crate_log.contains(creds.lease_id()) && crate_log.contains(creds.username()),
            "lease {} and user {} logged:\n{crate_log}",
            creds.lease_id(),
            creds.username()
        );
    }
    for event in [
        "INFO issued lease",
        "INFO renewed lease",
        "WARN revocation of lease",
        "WARN forced revocation",
        "INFO adopted lease",
        "INFO opened pool of role pooled",
        "INFO pool of role pooled rotated from lease",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(event)),
            "{event}:\n{crate_log}"
        );
    }
    for why in ["requested", "expired", "rotated", "pool closed"] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("INFO revoked lease") && l.contains(why)),
            "{why}:\n{crate_log}"
        );
    }

    // The server saw every statement, the failing creation, and the connection to the other database; what it
    // logged of each password is the verifier (by design), never the plaintext.
    for seen in [
        "LOG:  statement: ",
        "role \"app_group\" does not exist",
        "connection authorized: user=admin database=second",
        verifier.as_str(),
    ] {
        assert!(server_log.contains(seen), "{seen:?} not in the server log");
    }
    for (at, _) in server_log.match_indices("PASSWORD '") {
        let value = &server_log[at + "PASSWORD '".len()..];
        assert!(
            value.starts_with("SCRAM-SHA-256$4096:"),
            "a password that is not a verifier in the server log: {}",
            &value[..value.len().min(60)]
        );
    }
}
