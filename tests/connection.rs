//! The admin connection: sslmode as Vault's backend had it, real TLS, URLs, and clear connection errors.

mod common;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, ErrorKind, Role};

#[test]
fn without_sslmode_tls_is_required_and_a_server_without_ssl_is_explained() {
    let pg = TestPostgres::start().unwrap();
    let plain = format!(
        "host=127.0.0.1 port={} dbname=postgres user=admin password={}",
        pg.port(),
        pg.admin_password()
    );
    let err = Broker::builder()
        .connection(plain.clone())
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SslNotEnabled, "{err}");
    let text = err.to_string();
    assert!(text.contains("SSL is not enabled on the server"), "{text}");
    assert!(text.contains("highly recommended"), "{text}");
    assert!(text.contains("sslmode=disable"), "{text}");
    assert!(!text.contains(pg.admin_password()));

    let err = Broker::builder()
        .connection(format!("{plain} sslmode=require"))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::SslNotEnabled);

    // prefer falls back to plaintext, but then there is no channel binding: refused unless the string accepts
    // the risk. disable never tries TLS, and is taken as that choice.
    let err = Broker::builder()
        .connection(format!("{plain} sslmode=prefer"))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("channel_binding=prefer"), "{err}");
    for mode in ["prefer channel_binding=prefer", "disable"] {
        let broker = Broker::builder()
            .connection(format!("{plain} sslmode={mode}"))
            .build()
            .unwrap();
        broker.write_role("app", Role::new()).unwrap();
        let _ = broker.creds("app").unwrap();
    }
}

/// Builds a broker on `connection` and issues one credential, or says why not.
fn issue_one(connection: String) -> Result<(), credbroker::Error> {
    let broker = Broker::builder().connection(connection).build()?;
    broker.write_role("app", Role::new())?;
    broker.creds("app").map(drop)
}

/// The refusal of a login without channel binding, with what to do.
fn assert_refused_without_channel_binding(err: &credbroker::Error, password: &str) {
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    let text = err.to_string();
    for needed in [
        "SCRAM-SHA-256-PLUS",
        "password was not sent",
        "sslmode=verify-full sslrootcert=",
        "channel_binding=prefer",
    ] {
        assert!(text.contains(needed), "{needed:?} missing: {text}");
    }
    assert!(!text.contains(password), "{text}");
    assert!(!format!("{err:?}").contains(password));
}

#[test]
fn unverified_tls_never_answers_a_cleartext_password_request() {
    let pg = TestPostgres::builder()
        .tls(true)
        .auth_method("password")
        .start()
        .unwrap();
    let ca = pg.ca_cert().unwrap().display().to_string();
    let string = |extra: &str| {
        format!(
            "host=localhost port={} user=admin password={} dbname=postgres {extra}",
            pg.port(),
            pg.admin_password()
        )
    };
    // No sslmode (require), require and prefer: TLS without a certificate check, so a man in the middle could
    // be the one asking for the password in the clear. Refused before it is sent.
    for extra in ["", "sslmode=require", "sslmode=prefer"] {
        let err = issue_one(string(extra)).unwrap_err();
        assert_refused_without_channel_binding(&err, pg.admin_password());
    }
    // The same strings with the documented opt-out log in: the server would have accepted the password.
    for extra in [
        "channel_binding=prefer",
        "sslmode=require channel_binding=prefer",
    ] {
        issue_one(string(extra)).unwrap_or_else(|e| panic!("{extra}: {e}"));
    }
    // A checked certificate keeps the default: the password goes only to the server the CA vouches for.
    for mode in ["verify-full", "verify-ca", "require"] {
        issue_one(string(&format!("sslmode={mode} sslrootcert={ca}")))
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
    }
}

#[test]
fn unverified_tls_never_answers_an_md5_request() {
    let pg = TestPostgres::builder()
        .tls(true)
        .auth_method("md5")
        .start()
        .unwrap();
    // md5 in pg_hba.conf still uses SCRAM for a password stored as SCRAM: store this admin's as MD5.
    pg.admin_client()
        .unwrap()
        .batch_execute(
            "SET password_encryption = 'md5';              CREATE ROLE md5admin LOGIN SUPERUSER PASSWORD 'md5-admin-password-1'",
        )
        .unwrap();
    let string = |extra: &str| {
        format!(
            "host=localhost port={} user=md5admin password=md5-admin-password-1 dbname=postgres {extra}",
            pg.port()
        )
    };
    let err = issue_one(string("sslmode=require")).unwrap_err();
    assert_refused_without_channel_binding(&err, "md5-admin-password-1");
    issue_one(string("sslmode=require channel_binding=prefer")).expect("md5 with the opt-out");
    let ca = pg.ca_cert().unwrap().display().to_string();
    issue_one(string(&format!("sslmode=verify-full sslrootcert={ca}"))).expect("md5, verified");
}

#[test]
fn scram_over_tls_logs_in_with_channel_binding_under_require() {
    let pg = TestPostgres::builder().tls(true).start().unwrap();
    // An explicit channel_binding=require succeeds only through SCRAM-SHA-256-PLUS; the default does the same.
    for extra in ["", "channel_binding=require"] {
        let broker = Broker::builder()
            .connection(pg.connection_string_with(&format!("sslmode=require {extra}")))
            .build()
            .unwrap_or_else(|e| panic!("{extra}: {e}"));
        broker.write_role("app", Role::new()).unwrap();
        let _ = broker.creds("app").unwrap();
        assert!(broker_sessions_use_tls(&pg));
        // A pool's logins inherit the setting: its credentials' SCRAM logins are bound to the channel too.
        let pool = broker.pool("app").unwrap();
        pool.get().unwrap().simple_query("SELECT 1").unwrap();
    }
}

/// Whether every backend of the broker's pool (application_name credbroker) runs over TLS.
fn broker_sessions_use_tls(pg: &TestPostgres) -> bool {
    let rows = pg
        .admin_client()
        .unwrap()
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'credbroker'",
            &[],
        )
        .unwrap();
    !rows.is_empty() && rows.iter().all(|r| r.get::<_, bool>(0))
}

#[test]
fn verify_full_checks_the_ca_and_the_host_name() {
    let pg = TestPostgres::builder().tls(true).start().unwrap();
    let ca = pg.ca_cert().unwrap().display().to_string();
    let base = |host: &str| {
        format!(
            "{host} port={} user=admin password={} dbname=postgres",
            pg.port(),
            pg.admin_password()
        )
    };

    let broker = Broker::builder()
        .connection(format!(
            "{} sslmode=verify-full sslrootcert={ca}",
            base("host=localhost")
        ))
        .build()
        .expect("verify-full against the test CA");
    broker.write_role("app", Role::new()).unwrap();
    let creds = broker.creds("app").unwrap();
    assert!(broker_sessions_use_tls(&pg));
    broker.revoke(creds.lease_id()).unwrap();
    // A pool's connections inherit the admin connection's TLS settings: its credentials travel encrypted too.
    let pool = broker.pool("app").unwrap();
    let mut client = pool.get().unwrap();
    let (ssl, app): (bool, String) = {
        let row = client
            .query_one(
                "SELECT s.ssl, a.application_name FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE pid = pg_backend_pid()",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(ssl, "pool connection without TLS");
    assert_eq!(app, client.lease_id());
    drop(client);
    drop(pool);

    // A certificate that does not name the host: verify-full refuses, verify-ca accepts.
    let wrong_host = base("host=db.invalid hostaddr=127.0.0.1");
    let err = Broker::builder()
        .connection(format!("{wrong_host} sslmode=verify-full sslrootcert={ca}"))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("does not name the host"), "{err}");
    assert!(!err.to_string().contains(pg.admin_password()), "{err}");
    Broker::builder()
        .connection(format!("{wrong_host} sslmode=verify-ca sslrootcert={ca}"))
        .build()
        .expect("verify-ca ignores the host name");

    // Another CA: refused, and the error says so.
    let other = TestPostgres::builder().tls(true).start().unwrap();
    let other_ca = other.ca_cert().unwrap().display().to_string();
    let err = Broker::builder()
        .connection(format!(
            "{} sslmode=verify-full sslrootcert={other_ca}",
            base("host=localhost")
        ))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("not signed by the CA"), "{err}");
    assert!(!err.to_string().contains(pg.admin_password()), "{err}");

    // require encrypts without checking (as libpq does); a URL works the same way.
    let url = format!(
        "postgres://admin:{}@127.0.0.1:{}/postgres?sslmode=require",
        pg.admin_password(),
        pg.port()
    );
    let broker = Broker::builder()
        .connection(url)
        .build()
        .expect("require over TLS");
    broker.write_role("app", Role::new()).unwrap();
    let _ = broker.creds("app").unwrap();
    assert!(broker_sessions_use_tls(&pg));
}

#[test]
fn an_expired_certificate_fails_verification_saying_so_but_require_still_connects() {
    let pg = TestPostgres::builder()
        .expired_certificate(true)
        .start()
        .unwrap();
    let ca = pg.ca_cert().unwrap().display().to_string();
    let string = |mode: &str| {
        format!(
            "host=localhost port={} user=admin password={} dbname=postgres sslmode={mode}",
            pg.port(),
            pg.admin_password()
        )
    };
    for mode in ["verify-full", "verify-ca"] {
        let err = Broker::builder()
            .connection(format!("{} sslrootcert={ca}", string(mode)))
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Tls, "{mode}: {err}");
        let text = err.to_string();
        assert!(
            text.contains("the server's certificate has expired; renew it on the server"),
            "{mode}: {text}"
        );
        assert!(!text.contains(pg.admin_password()), "{text}");
    }
    // require encrypts without checking the certificate, as libpq does.
    let broker = Broker::builder()
        .connection(string("require"))
        .build()
        .expect("require ignores the expiry");
    broker.write_role("app", Role::new()).unwrap();
    let _ = broker.creds("app").unwrap();
    assert!(broker_sessions_use_tls(&pg));
}

#[test]
fn connection_failures_say_what_to_fix() {
    let pg = TestPostgres::start().unwrap();
    let err = Broker::builder()
        .connection(format!(
            "host=127.0.0.1 port={} user=admin password=wrong-password-123 sslmode=disable",
            pg.port()
        ))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert_eq!(err.db_code(), Some("28P01"));
    assert!(
        err.to_string().contains("password authentication failed"),
        "{err}"
    );
    assert!(!err.to_string().contains("wrong-password-123"));

    let closed = common::closed_port();
    let err = Broker::builder()
        .connection(format!(
            "host=127.0.0.1 port={closed} user=admin password=x sslmode=disable"
        ))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection);
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{closed}")),
        "{err}"
    );

    let err = Broker::builder().build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    let err = Broker::builder()
        .connection("host=x bogus=1")
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    let err = Broker::builder()
        .connection(pg.connection_string())
        .pool_size(0)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
}

#[test]
fn an_admin_that_cannot_create_roles_is_refused_with_the_fix() {
    let pg = TestPostgres::start().unwrap();
    pg.admin_client()
        .unwrap()
        .batch_execute(
            "CREATE ROLE weak LOGIN PASSWORD 'weak-password-1';
             CREATE ROLE manager LOGIN CREATEROLE PASSWORD 'manager-password-1';",
        )
        .unwrap();
    let as_user = |user: &str, password: &str| common::connection_as(&pg, user, password);
    let err = Broker::builder()
        .connection(as_user("weak", "weak-password-1"))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permission);
    assert!(
        err.to_string().contains(r#"ALTER ROLE "weak" CREATEROLE"#),
        "{err}"
    );

    // CREATEROLE alone is not enough: pre-flight names exactly what is missing, and the fix.
    let err = Broker::builder()
        .connection(as_user("manager", "manager-password-1"))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Permission);
    let message = err.to_string();
    let missing: Vec<&str> = message.lines().skip(1).collect();
    assert_eq!(missing.len(), 1, "{err}");
    assert!(
        missing[0].contains(r#"`GRANT pg_signal_backend TO "manager";`"#),
        "{err}"
    );

    // CREATEROLE and pg_signal_backend are enough to issue credentials and revoke them, even a role that owns a
    // table (the broker makes itself a member for REASSIGN OWNED).
    pg.admin_client()
        .unwrap()
        .batch_execute("GRANT pg_signal_backend TO manager")
        .unwrap();
    let broker = Broker::builder()
        .connection(as_user("manager", "manager-password-1"))
        .build()
        .unwrap();
    pg.admin_client()
        .unwrap()
        .batch_execute("GRANT CREATE ON SCHEMA public TO manager WITH GRANT OPTION")
        .unwrap();
    let role = Role::new().creation_sql(common::CREATES_TABLES);
    broker.write_role("app", role).unwrap();
    let creds = broker.creds("app").unwrap();
    common::create_table_as(&pg, &creds, "owned_by_app");
    assert!(common::eventually(
        std::time::Duration::from_secs(5),
        || {
            let active: i64 = pg
                .admin_client()
                .unwrap()
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = $1",
                    &[&creds.username()],
                )
                .unwrap()
                .get(0);
            active == 0
        }
    ));
    broker.revoke(creds.lease_id()).unwrap();
    assert!(common::roles_with_prefix(&pg, "app-").is_empty());
    let owner: String = pg
        .admin_client()
        .unwrap()
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'owned_by_app'",
            &[],
        )
        .unwrap()
        .get(0);
    // Not to the admin: to the owner role build() created and made the admin a member of.
    assert_eq!(owner, credbroker::DEFAULT_OWNER_ROLE);
}
