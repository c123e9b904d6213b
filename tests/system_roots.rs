//! `sslrootcert=system`: the platform's trusted CAs. In its own test binary because it sets `SSL_CERT_FILE`,
//! which `rustls-native-certs` reads (as OpenSSL does), to make the test CA a "system" CA.

use credbroker::testing::TestPostgres;
use credbroker::{Broker, ErrorKind, Role};

#[test]
fn system_roots_verify_the_server_against_the_platforms_cas() {
    let pg = TestPostgres::builder().tls(true).start().unwrap();
    let string = format!(
        "host=localhost hostaddr=127.0.0.1 port={} user={} password={} dbname=postgres sslrootcert=system",
        pg.port(),
        pg.admin_user(),
        pg.admin_password()
    );
    // The platform's CAs do not include the test CA: the handshake fails on the certificate. A machine with no
    // CA bundle at all (a bare container) cannot show that: that part is skipped, saying why; Debian with
    // ca-certificates (CI) runs it.
    let err = Broker::builder().connection(&string).build().unwrap_err();
    if err.kind() == ErrorKind::InvalidConfig
        && err.to_string().contains("found no usable CA certificate")
    {
        eprintln!(
            "SKIPPED the refusal by the platform's CAs: this machine has no CA bundle ({err}); install \
             ca-certificates to run it"
        );
    } else {
        assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    }

    // With the test CA as the platform's bundle, the same string logs in, verifying the host name too.
    // SAFETY of set_var: this binary's one test, no other thread reads the environment now.
    std::env::set_var("SSL_CERT_FILE", pg.ca_cert().unwrap());
    let broker = Broker::builder().connection(&string).build().unwrap();
    broker.write_role("app", Role::new()).unwrap();
    let creds = broker.creds("app").unwrap();
    broker.revoke(creds.lease_id()).unwrap();
    drop(broker);
    let wrong_host = string.replace("host=localhost", "host=db.invalid");
    let err = Broker::builder()
        .connection(&wrong_host)
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
}
