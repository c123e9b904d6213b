//! Admin authentication without a static password: a client certificate, and a password provider asked at every
//! new admin connection.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use credbroker::testing::TestPostgres;
use credbroker::{Broker, ErrorKind, Role};

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A CA of our own and a client certificate for `user` (its CN) signed by it, in `dir`: (ca, cert, key).
fn client_certificate(dir: &Path, user: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca = client_ca(dir);
    let (crt, key) = sign_client(dir, user, "client");
    (ca, crt, key)
}

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// A client CA in `dir` (client-ca.crt, client-ca.key): the certificate's path.
fn client_ca(dir: &Path) -> PathBuf {
    let (ca_key, ca) = (dir.join("client-ca.key"), dir.join("client-ca.crt"));
    openssl(
        &[
            &["req", "-x509"][..],
            &EC,
            &["-keyout", path(&ca_key), "-out", path(&ca), "-days", "3"],
            &["-subj", "/CN=credbroker test client CA"],
        ]
        .concat(),
    );
    ca
}

/// A client certificate for CN `cn` signed by the CA in `dir`, as `<stem>.crt` and `<stem>.key`.
fn sign_client(dir: &Path, cn: &str, stem: &str) -> (PathBuf, PathBuf) {
    let (ca_key, ca) = (dir.join("client-ca.key"), dir.join("client-ca.crt"));
    let (key, csr, crt) = (
        dir.join(format!("{stem}.key")),
        dir.join(format!("{stem}.csr")),
        dir.join(format!("{stem}.crt")),
    );
    let subject = format!("/CN={cn}");
    openssl(
        &[
            &["req"][..],
            &EC,
            &["-keyout", path(&key), "-out", path(&csr), "-subj", &subject],
        ]
        .concat(),
    );
    let ext = dir.join("client.ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-extfile",
        path(&ext),
        "-req",
        "-in",
        path(&csr),
        "-CA",
        path(&ca),
        "-CAkey",
        path(&ca_key),
        "-CAcreateserial",
        "-days",
        "3",
        "-out",
        path(&crt),
    ]);
    (crt, key)
}

/// A fresh directory for this test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "credbroker-admin-auth-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn an_admin_logs_in_with_a_client_certificate() {
    let pg = TestPostgres::builder().tls(true).start().unwrap();
    let dir = scratch("cert");
    let (client_ca, crt, key) = client_certificate(&dir, "certadmin");
    let mut admin = pg.admin_client().unwrap();
    // The server trusts our client CA; `certadmin` may log in by certificate only, over TLS, and has no password.
    admin
        .batch_execute(
            "CREATE ROLE certadmin LOGIN CREATEROLE; GRANT pg_signal_backend TO certadmin;",
        )
        .unwrap();
    admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET ssl_ca_file = '{}'",
            client_ca.display()
        ))
        .unwrap();
    let hba: String = admin.query_one("SHOW hba_file", &[]).unwrap().get(0);
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "hostssl all certadmin 127.0.0.1/32 cert\nhost all certadmin 0.0.0.0/0 reject\n{rules}"
        ),
    )
    .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();

    let server_ca = pg.ca_cert().unwrap().display().to_string();
    let base = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=certadmin dbname=postgres sslmode=verify-full \
         sslrootcert={server_ca}",
        pg.port()
    );
    let with_cert = format!("{base} sslcert={} sslkey={}", crt.display(), key.display());
    // The reload is asynchronous: wait until the server asks for the certificate.
    let mut last = None;
    let built = common::eventually(Duration::from_secs(20), || {
        match Broker::builder().connection(&with_cert).build() {
            Ok(broker) => {
                last = Some(Ok(broker));
                true
            }
            Err(e) => {
                last = Some(Err(e));
                false
            }
        }
    });
    let broker = match last {
        Some(Ok(broker)) if built => broker,
        other => panic!("no login by certificate: {:?}", other.map(|r| r.err())),
    };
    broker.write_role("app", Role::new()).unwrap();
    let creds = broker.creds("app").unwrap();
    let session_user: String = pg
        .login(creds.username(), creds.password())
        .unwrap()
        .query_one("SELECT session_user::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(session_user, creds.username());
    // The pool logs in with issued credentials (password authentication), not with the admin's certificate.
    let pool = broker.pool("app").unwrap();
    let client_dn = pool_client_dn(&pool);
    assert_eq!(
        client_dn, None,
        "a pool session presented a client certificate"
    );
    drop(pool);
    broker.revoke(creds.lease_id()).unwrap();
    assert!(common::roles_with_prefix(&pg, creds.username()).is_empty());
    drop(broker);

    // Without the certificate the same string is refused: the certificate was the only credential.
    let err = Broker::builder().connection(&base).build().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Connection, "{err}");
    // A key that is not the certificate's is refused before any connection.
    let (_, _, other_key) = client_certificate(&scratch("other"), "someone");
    let err = Broker::builder()
        .connection(format!(
            "{base} sslcert={} sslkey={}",
            crt.display(),
            other_key.display()
        ))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(
        err.to_string()
            .contains("cannot use the client certificate"),
        "{err}"
    );
    let err = Broker::builder()
        .connection(format!("{base} sslcert={}", crt.display()))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("give both"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The client certificate's subject that the pool's session presented (`None`: no certificate), checking
/// that the session is the pool's credential and is encrypted.
fn pool_client_dn(pool: &credbroker::RolePool) -> Option<String> {
    let row = pool
        .get()
        .unwrap()
        .query_one(
            "SELECT ssl, client_dn, current_user::text FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0), "the pool session is not encrypted");
    assert_ne!(row.get::<_, String>(2), "certadmin");
    row.get(1)
}

/// Writes pg_hba.conf: `certadmin` by certificate only, every other TCP login over TLS with `method`, then the
/// server's own `rules`; and reloads.
fn hba_with_certadmin(admin: &mut postgres::Client, rules: &str, method: &str) {
    let hba: String = admin.query_one("SHOW hba_file", &[]).unwrap().get(0);
    std::fs::write(
        &hba,
        format!(
            "hostssl all certadmin 127.0.0.1/32 cert\nhost all certadmin 0.0.0.0/0 reject\n\
             hostssl all all 127.0.0.1/32 {method}\n{rules}"
        ),
    )
    .unwrap();
    admin.batch_execute("SELECT pg_reload_conf()").unwrap();
}

#[test]
fn a_certificate_admin_without_a_checked_server_keeps_channel_binding_for_pools() {
    let pg = TestPostgres::builder().tls(true).start().unwrap();
    let dir = scratch("binding");
    let (client_ca, crt, key) = client_certificate(&dir, "certadmin");
    let mut admin = pg.admin_client().unwrap();
    admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET ssl_ca_file = '{}'",
            client_ca.display()
        ))
        .unwrap();
    admin
        .batch_execute(
            "CREATE ROLE certadmin LOGIN CREATEROLE; GRANT pg_signal_backend TO certadmin;",
        )
        .unwrap();
    let hba: String = admin.query_one("SHOW hba_file", &[]).unwrap().get(0);
    let rules = std::fs::read_to_string(&hba).unwrap();
    hba_with_certadmin(&mut admin, &rules, "scram-sha-256");
    // sslmode=require without sslrootcert: the server's certificate is not checked, so a password may only
    // travel inside SCRAM with channel binding.
    let conn = format!(
        "host=127.0.0.1 port={} user=certadmin dbname=postgres sslmode=require sslcert={} sslkey={}",
        pg.port(),
        crt.display(),
        key.display()
    );
    let mut broker = None;
    common::eventually(Duration::from_secs(20), || {
        broker = Broker::builder().connection(&conn).build().ok();
        broker.is_some()
    });
    let broker = broker.expect("the admin logs in by certificate alone");
    broker.write_role("app", Role::new()).unwrap();
    let pool = broker.pool("app").unwrap();
    assert_eq!(
        pool_client_dn(&pool),
        None,
        "a pool session presented the admin's client certificate"
    );
    drop(pool);

    // The pool roles' method becomes a cleartext password: the pool must refuse to send it.
    hba_with_certadmin(&mut admin, &rules, "password");
    let mut last = None;
    let refused = common::eventually(Duration::from_secs(20), || match broker.pool("app") {
        Ok(_) => {
            last = Some("the pool logged in with a cleartext password".to_owned());
            false
        }
        Err(e) => {
            let refused = e.kind() == ErrorKind::Tls && e.to_string().contains("channel binding");
            last = Some(e.to_string());
            refused
        }
    });
    assert!(refused, "{last:?}");
    // The admin itself still logs in by certificate (no password, nothing to bind).
    let creds = broker.creds("app").unwrap();
    broker.revoke(creds.lease_id()).unwrap();
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_password_provider_is_asked_at_every_new_admin_connection() {
    // Every statement is logged, so a password sent in SQL would show in the server log.
    let pg = TestPostgres::builder()
        .setting("log_statement", "all")
        .start()
        .unwrap();
    let mut admin = pg.admin_client().unwrap();
    // The test's own SQL sets passwords as SCRAM verifiers, so that the log holds no password from it either.
    let verifier = |p: &str| credbroker::testing::scram_verifier(p, 4096).unwrap();
    admin
        .batch_execute(&format!(
            "CREATE ROLE rotating LOGIN CREATEROLE PASSWORD '{}';
             GRANT pg_signal_backend TO rotating;",
            verifier("first-password-1")
        ))
        .unwrap();
    let current = Arc::new(Mutex::new("first-password-1".to_owned()));
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = {
        let (current, calls) = (current.clone(), calls.clone());
        move || -> Result<String, std::io::Error> {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(current.lock().unwrap().clone())
        }
    };
    let without_password = format!(
        "host=127.0.0.1 port={} user=rotating dbname=postgres sslmode=disable",
        pg.port()
    );
    let broker = Broker::builder()
        .connection(&without_password)
        .pool_size(1)
        .password_provider(provider)
        .build()
        .unwrap();
    assert!(calls.load(Ordering::SeqCst) >= 1);
    assert!(
        !format!("{broker:?}").contains("first-password-1"),
        "{broker:?}"
    );
    broker.write_role("app", Role::new()).unwrap();
    let _ = broker.creds("app").unwrap();

    // The password rotates on the server; the admin's open connections are ended, so the broker must log in
    // again, and only the new password works.
    admin
        .batch_execute(&format!(
            "ALTER ROLE rotating PASSWORD '{}'",
            verifier("second-password-2")
        ))
        .unwrap();
    *current.lock().unwrap() = "second-password-2".to_owned();
    let before = calls.load(Ordering::SeqCst);
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = 'rotating'",
        )
        .unwrap();
    let creds = broker.creds("app").expect("creds after the rotation");
    assert!(
        calls.load(Ordering::SeqCst) > before,
        "a new connection asked the provider"
    );
    assert!(pg.login("rotating", "first-password-1").is_err());
    pg.login(creds.username(), creds.password()).unwrap();
    broker.revoke(creds.lease_id()).unwrap();
    let log = pg.log_contents().unwrap();
    assert!(
        log.contains("ALTER ROLE rotating PASSWORD"),
        "statements are not logged"
    );
    for password in ["first-password-1", "second-password-2"] {
        assert!(!log.contains(password), "{password} in the server log");
    }
    drop(broker);

    // A provider that fails: a typed error with its cause; a password in the string as well: refused.
    let err = Broker::builder()
        .connection(&without_password)
        .password_provider(|| -> Result<String, std::io::Error> {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no token file",
            ))
        })
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PasswordProvider, "{err}");
    assert!(err.to_string().contains("no token file"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
    let err = Broker::builder()
        .connection(format!("{without_password} password=first-password-1"))
        .password_provider(|| Ok::<_, std::io::Error>("x".to_owned()))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(!err.to_string().contains("first-password-1"), "{err}");
}

#[test]
fn a_provider_that_panics_or_hangs_fails_the_login_with_a_typed_error() {
    let pg = TestPostgres::start().unwrap();
    let without_password = format!(
        "host=127.0.0.1 port={} user={} dbname=postgres sslmode=disable",
        pg.port(),
        pg.admin_user()
    );
    let err = Broker::builder()
        .connection(&without_password)
        .password_provider(|| -> Result<String, std::io::Error> {
            panic!("provider bug while holding secret-in-panic-9")
        })
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PasswordProvider, "{err}");
    assert!(err.to_string().contains("panicked"), "{err}");
    assert!(!err.to_string().contains("secret-in-panic-9"), "{err}");

    // A provider that does not answer: the login fails at the connect timeout; the provider's thread is left
    // to finish, which it does once the test lets it go.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let err = Broker::builder()
        .connection(&without_password)
        .connect_timeout(Duration::from_secs(1))
        .password_provider(move || -> Result<String, std::io::Error> {
            let _ = released
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(120));
            Ok("too-late-password-7".to_owned())
        })
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::PasswordProvider, "{err}");
    assert!(err.to_string().contains("connect timeout"), "{err}");
    drop(release);
}

#[test]
fn a_client_certificate_rotated_on_disk_is_used_by_the_next_admin_connection() {
    let pg = TestPostgres::builder().tls(true).start().unwrap();
    let dir = scratch("rotation");
    let ca = client_ca(&dir);
    let (crt, key) = sign_client(&dir, "certadmin-v1", "admin");
    let mut admin = pg.admin_client().unwrap();
    admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET ssl_ca_file = '{}'",
            ca.display()
        ))
        .unwrap();
    admin
        .batch_execute(
            "CREATE ROLE certadmin LOGIN CREATEROLE; GRANT pg_signal_backend TO certadmin;",
        )
        .unwrap();
    // The server maps a certificate's CN to the role through pg_ident.conf: first v1, later only v2.
    let ident: String = admin.query_one("SHOW ident_file", &[]).unwrap().get(0);
    let map_only = |admin: &mut postgres::Client, cn: &str| {
        std::fs::write(&ident, format!("rotation {cn} certadmin\n")).unwrap();
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
    };
    let hba: String = admin.query_one("SHOW hba_file", &[]).unwrap().get(0);
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostssl all certadmin 127.0.0.1/32 cert map=rotation\nhost all certadmin 0.0.0.0/0 reject\n{rules}"),
    )
    .unwrap();
    map_only(&mut admin, "certadmin-v1");
    let conn = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user=certadmin dbname=postgres sslmode=verify-full \
         sslrootcert={} sslcert={} sslkey={}",
        pg.port(),
        pg.ca_cert().unwrap().display(),
        crt.display(),
        key.display()
    );
    let mut broker = None;
    common::eventually(Duration::from_secs(20), || {
        broker = Broker::builder()
            .connection(&conn)
            .pool_size(1)
            .build()
            .ok();
        broker.is_some()
    });
    let broker = broker.expect("the admin logs in with certificate v1");
    broker.write_role("app", Role::new()).unwrap();
    let _ = broker.creds("app").unwrap();

    // Rotation: a new pair replaces the files (each renamed into place), and the server accepts only v2.
    let (new_crt, new_key) = sign_client(&dir, "certadmin-v2", "next");
    std::fs::rename(&new_key, &key).unwrap();
    std::fs::rename(&new_crt, &crt).unwrap();
    map_only(&mut admin, "certadmin-v2");
    // The broker's admin sessions end, so the next admin work opens a new connection.
    let dns = |admin: &mut postgres::Client| -> Vec<String> {
        admin
            .query(
                "SELECT s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.usename = 'certadmin' AND s.client_dn IS NOT NULL",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert!(dns(&mut admin).iter().all(|dn| dn.contains("certadmin-v1")));
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = 'certadmin'",
        )
        .unwrap();
    let mut last = None;
    let issued = common::eventually(Duration::from_secs(30), || match broker.creds("app") {
        Ok(_) => true,
        Err(e) => {
            last = Some(e.to_string());
            false
        }
    });
    assert!(
        issued,
        "no admin login with the rotated certificate: {last:?}"
    );
    let now = dns(&mut admin);
    assert!(
        !now.is_empty() && now.iter().all(|dn| dn.contains("certadmin-v2")),
        "{now:?}"
    );
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}
