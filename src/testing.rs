//! A throwaway PostgreSQL server for tests, examples and benchmarks (feature `testing`).
//!
//! [`TestPostgres::start`] runs `initdb` into a fresh temporary directory with `scram-sha-256` authentication,
//! starts the server on a free loopback port with its log in a file, and stops it and removes the directory
//! when dropped. PostgreSQL refuses to run as root, so when the process is root the server runs as the
//! `postgres` OS user (through `setpriv`), which must be able to read and run the binaries.
//!
//! # Which PostgreSQL
//!
//! The server binaries (`initdb`, `pg_ctl`, `postgres`) are taken from the first of:
//!
//! 1. the directory named by the environment variable [`PG_BIN_ENV`] (`CREDBROKER_PG_BIN`), if set: it must
//!    hold them, or every start fails saying so;
//! 2. the first directory on `PATH` that holds them;
//! 3. `pg_config --bindir`;
//! 4. the newest `/usr/lib/postgresql/*/bin` (Debian's layout).
//!
//! So the same build runs its tests against another version without recompiling (the variable is read at run
//! time):
//!
//! ```text
//! .ci/install-postgres 17                                # unpacks into /opt/credbroker-pg/17
//! CREDBROKER_PG_BIN=/opt/credbroker-pg/17/bin cargo test
//! ```
//!
//! [`TestPostgres::server_version_num`] tells a test which version it got.
//!
//! ```no_run
//! use credbroker::testing::TestPostgres;
//! use credbroker::{Broker, Role};
//!
//! let pg = TestPostgres::start()?;
//! let broker = Broker::builder().connection(pg.connection_string()).build()?;
//! broker.write_role("app", Role::new())?;
//! let creds = broker.creds("app")?;
//! let mut client = pg.login(creds.username(), creds.password())?;
//! client.simple_query("SELECT 1")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::credential::generate_password;

/// Settings for a [`TestPostgres`] before it starts.
///
/// # Examples
///
/// A server with TLS that logs every statement, for a test of what the broker sends:
///
/// ```no_run
/// use credbroker::testing::TestPostgres;
/// use credbroker::Broker;
///
/// let pg = TestPostgres::builder().tls(true).setting("log_statement", "all").start()?;
/// let ca = pg.ca_cert().expect("started with TLS").display().to_string();
/// let broker = Broker::builder()
///     .connection(pg.connection_string_with(&format!("sslmode=verify-full sslrootcert={ca}")))
///     .build()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Default, Clone)]
pub struct TestPostgresBuilder {
    tls: bool,
    expired_certificate: bool,
    settings: Vec<(String, String)>,
    auth_method: Option<String>,
}

impl TestPostgresBuilder {
    /// Turns on TLS (`ssl=on`) with a CA and a server certificate for `localhost` and `127.0.0.1` made with the
    /// `openssl` command; [`TestPostgres::ca_cert`] is the CA to trust.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::builder().tls(true).start()?;
    /// let ca = pg.ca_cert().expect("started with TLS");
    /// let url = pg.connection_string_with(&format!("sslmode=verify-ca sslrootcert={}", ca.display()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use = "a TestPostgresBuilder is built by value: this returns the changed settings"]
    pub fn tls(mut self, on: bool) -> TestPostgresBuilder {
        self.tls = on;
        self
    }

    /// Turns on TLS with a server certificate that has already expired (valid only on 1 January 2020), signed
    /// by a CA that is valid now: for testing that verification refuses it and says why.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    /// use credbroker::{Broker, ErrorKind};
    ///
    /// let pg = TestPostgres::builder().expired_certificate(true).start()?;
    /// let ca = pg.ca_cert().expect("started with TLS").display().to_string();
    /// let err = Broker::builder()
    ///     .connection(pg.connection_string_with(&format!("sslmode=verify-full sslrootcert={ca}")))
    ///     .build()
    ///     .unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::Tls);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use = "a TestPostgresBuilder is built by value: this returns the changed settings"]
    pub fn expired_certificate(mut self, expired: bool) -> TestPostgresBuilder {
        self.expired_certificate = expired;
        self.tls |= expired;
        self
    }

    /// Adds a `postgresql.conf` setting, e.g. `("log_statement", "all")`. The value is written quoted.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::builder().setting("log_statement", "all").start()?;
    /// let broker = credbroker::Broker::builder().connection(pg.connection_string()).build()?;
    /// broker.write_role("app", credbroker::Role::new())?;
    /// let creds = broker.creds("app")?;
    /// // Every statement is in the log, and the password in none of them:
    /// assert!(!pg.log_contents()?.contains(creds.password()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use = "a TestPostgresBuilder is built by value: this returns the changed settings"]
    pub fn setting(mut self, name: &str, value: &str) -> TestPostgresBuilder {
        self.settings.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The `pg_hba.conf` method for every connection (`initdb --auth`); default `scram-sha-256`. For testing
    /// what a client does when asked for a password in the clear (`password`) or as MD5 (`md5`).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::builder().tls(true).auth_method("password").start()?;
    /// // TLS without a certificate check: the broker does not answer a request for the password in the clear.
    /// let refused = credbroker::Broker::builder().connection(pg.connection_string_with("sslmode=require")).build();
    /// assert!(refused.is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use = "a TestPostgresBuilder is built by value: this returns the changed settings"]
    pub fn auth_method(mut self, method: &str) -> TestPostgresBuilder {
        self.auth_method = Some(method.to_owned());
        self
    }

    /// Initialises and starts the server.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let pg = credbroker::testing::TestPostgres::builder().setting("max_connections", "20").start()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn start(self) -> io::Result<TestPostgres> {
        TestPostgres::start_with(self)
    }
}

/// A running throwaway PostgreSQL server; stopped, and its directory removed, on drop.
///
/// # Examples
///
/// A test of an application's own code against a real server, with the broker in front of it:
///
/// ```no_run
/// use credbroker::testing::TestPostgres;
/// use credbroker::{Broker, Role};
///
/// let pg = TestPostgres::start()?;
/// pg.admin_client()?.batch_execute("CREATE TABLE orders (id int8 PRIMARY KEY)")?;
/// let broker = Broker::builder().connection(pg.connection_string()).build()?;
/// broker.write_role(
///     "app",
///     Role::new().creation_sql(
///         r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
///            GRANT SELECT ON orders TO "{{name}}";"#,
///     ),
/// )?;
/// let creds = broker.creds("app")?;
/// let mut client = pg.login(creds.username(), creds.password())?;
/// assert!(client.query("SELECT id FROM orders", &[])?.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct TestPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    password: String,
    ca_cert: Option<PathBuf>,
    /// The `postgres` OS user's uid and gid when the server must run as that user (this process is root).
    run_as: Option<(u32, u32)>,
}

/// The superuser `initdb` creates.
const ADMIN_USER: &str = "admin";

impl TestPostgres {
    /// Starts a server with default settings, without TLS.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?; // stopped and removed when `pg` is dropped
    /// let broker = credbroker::Broker::builder().connection(pg.connection_string()).build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn start() -> io::Result<TestPostgres> {
        TestPostgres::builder().start()
    }

    /// Settings for a server to start.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// let pg = credbroker::testing::TestPostgres::builder().tls(true).start()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn builder() -> TestPostgresBuilder {
        TestPostgresBuilder::default()
    }

    fn start_with(options: TestPostgresBuilder) -> io::Result<TestPostgres> {
        let bin = find_bin_dir()?;
        let run_as = if is_root() {
            Some(postgres_ids()?)
        } else {
            None
        };
        let password = generate_password()
            .map_err(|e| io::Error::other(e.to_string()))?
            .to_string();
        let dir = make_temp_dir(run_as.is_some())?;
        let mut pg = TestPostgres {
            dir,
            bin,
            port: 0,
            password,
            ca_cert: None,
            run_as,
        };
        pg.init(&options)?;
        let mut last_error = None;
        // Another process may take the free port between our probe and the server's bind: try a few.
        for _ in 0..5 {
            pg.port = free_port()?;
            match pg.pg_ctl_start() {
                Ok(()) => return Ok(pg),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("PostgreSQL did not start")))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server log file.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// println!("server log: {}", pg.log_path().display());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Everything the server has logged so far.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// // ... a test that should leave no error in the log ...
    /// assert!(!pg.log_contents()?.contains("ERROR:"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn log_contents(&self) -> io::Result<String> {
        fs::read_to_string(self.log_path())
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// let url = format!("postgres://{}:{}@127.0.0.1:{}/postgres", pg.admin_user(), pg.admin_password(), pg.port());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's version as `server_version_num` (e.g. `160014` for 16.14), for tests whose expectations
    /// differ between PostgreSQL versions; [`TestPostgres::major_version`] for the major alone.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// if pg.server_version_num()? >= 160_000 {
    ///     // PostgreSQL 16 rules for CREATEROLE apply
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn server_version_num(&self) -> Result<i32, postgres::Error> {
        let row = self
            .admin_client()?
            .query_one("SELECT current_setting('server_version_num')::int", &[])?;
        Ok(row.get(0))
    }

    /// The server's major version (14, 15, …).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// println!("testing against PostgreSQL {}", pg.major_version()?);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn major_version(&self) -> Result<i32, postgres::Error> {
        Ok(self.server_version_num()? / 10_000)
    }

    /// The superuser's name.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// let mut admin = pg.login(pg.admin_user(), pg.admin_password())?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn admin_user(&self) -> &str {
        ADMIN_USER
    }

    /// The superuser's password.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// // A connection string of the application's own format:
    /// let url = format!("postgres://{}:{}@127.0.0.1:{}/postgres", pg.admin_user(), pg.admin_password(), pg.port());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn admin_password(&self) -> &str {
        &self.password
    }

    /// The CA certificate that signed the server's certificate, when started with TLS.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::builder().tls(true).start()?;
    /// let ca = pg.ca_cert().expect("started with TLS");
    /// let url = pg.connection_string_with(&format!("sslmode=verify-full sslrootcert={}", ca.display()));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn ca_cert(&self) -> Option<&Path> {
        self.ca_cert.as_deref()
    }

    /// A libpq connection string for the superuser with `sslmode=disable`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// let broker = credbroker::Broker::builder().connection(pg.connection_string()).build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn connection_string(&self) -> String {
        self.connection_string_with("sslmode=disable")
    }

    /// A libpq connection string for the superuser followed by `extra` (e.g. `sslmode=verify-full ...`).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// let broker = credbroker::Broker::builder()
    ///     .connection(pg.connection_string_with("sslmode=disable connect_timeout=5"))
    ///     .build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn connection_string_with(&self, extra: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={ADMIN_USER} password={} dbname=postgres {extra}",
            self.port, self.password
        )
    }

    /// A new superuser connection, without TLS.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// pg.admin_client()?.batch_execute("CREATE TABLE orders (id int8 PRIMARY KEY)")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn admin_client(&self) -> Result<postgres::Client, postgres::Error> {
        self.login(ADMIN_USER, &self.password)
    }

    /// Logs in as `user` with `password` (password authentication, no TLS), as an application would.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// let broker = credbroker::Broker::builder().connection(pg.connection_string()).build()?;
    /// broker.write_role("app", credbroker::Role::new())?;
    /// let creds = broker.creds("app")?;
    /// let mut client = pg.login(creds.username(), creds.password())?;
    /// broker.revoke(creds.lease_id())?;
    /// assert!(pg.login(creds.username(), creds.password()).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn login(&self, user: &str, password: &str) -> Result<postgres::Client, postgres::Error> {
        self.login_to("postgres", user, password)
    }

    /// Logs in as `user` with `password` to `database` (password authentication, no TLS).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// pg.admin_client()?.batch_execute("CREATE DATABASE orders")?;
    /// let broker = credbroker::Broker::builder().connection(pg.connection_string()).build()?;
    /// broker.write_role("app", credbroker::Role::new())?;
    /// let creds = broker.creds("app")?;
    /// let mut client = pg.login_to("orders", creds.username(), creds.password())?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn login_to(
        &self,
        database: &str,
        user: &str,
        password: &str,
    ) -> Result<postgres::Client, postgres::Error> {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(database)
            .connect(postgres::NoTls)
    }

    /// Runs `pg_ctl restart` (fast shutdown, then start on the same port): every connection is broken.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// let broker = credbroker::Broker::builder().connection(pg.connection_string()).build()?;
    /// broker.write_role("app", credbroker::Role::new())?;
    /// pg.restart()?;
    /// // The broker's admin connections were broken; it reconnects on the next call.
    /// let creds = broker.creds("app")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn restart(&self) -> io::Result<()> {
        self.pg_ctl(&["-m", "fast", "restart"])
    }

    /// Stops the server (fast shutdown: sessions are ended), keeps it down for `outage`, and starts it again on
    /// the same port: a database outage.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// let broker = credbroker::Broker::builder().connection(pg.connection_string()).build()?;
    /// broker.write_role("app", credbroker::Role::new())?;
    /// let pool = broker.pool("app")?;
    /// pg.outage(std::time::Duration::from_secs(5))?;
    /// // The pool's broken connections are replaced once the server is back.
    /// pool.get()?.simple_query("SELECT 1")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn outage(&self, outage: std::time::Duration) -> io::Result<()> {
        self.pg_ctl(&["-m", "fast", "stop"])?;
        std::thread::sleep(outage);
        self.pg_ctl_start()
    }

    fn init(&mut self, options: &TestPostgresBuilder) -> io::Result<()> {
        let data = self.data_dir();
        let pwfile = self.dir.join("pwfile");
        fs::write(&pwfile, &self.password)?;
        self.hand_to_postgres(&self.dir)?;
        self.hand_to_postgres(&pwfile)?;
        let out = self.run_pg(
            "initdb",
            &[
                "-D",
                path_str(&data)?,
                "-U",
                ADMIN_USER,
                &format!("--pwfile={}", path_str(&pwfile)?),
                &format!(
                    "--auth={}",
                    options.auth_method.as_deref().unwrap_or("scram-sha-256")
                ),
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        check(out, "initdb")?;
        fs::remove_file(&pwfile)?;

        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nmax_connections = 200\n\
             log_connections = on\nlog_disconnections = on\nlog_line_prefix = '%m [%p] %u '\n",
            path_str(&self.dir)?
        );
        if options.tls {
            self.make_certificates(options.expired_certificate)?;
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        for (name, value) in &options.settings {
            conf.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing = fs::read_to_string(&conf_path)?;
        existing.push_str(&conf);
        fs::write(&conf_path, existing)?;
        Ok(())
    }

    fn pg_ctl_start(&self) -> io::Result<()> {
        self.pg_ctl(&["-o", &format!("-p {}", self.port), "start"])
    }

    /// `pg_ctl -D <data> -l <log> -w <args>`, failing with its output.
    fn pg_ctl(&self, args: &[&str]) -> io::Result<()> {
        let data = self.data_dir();
        let log = self.log_path();
        let all = [&["-D", path_str(&data)?, "-l", path_str(&log)?, "-w"], args].concat();
        check(
            self.run_pg("pg_ctl", &all)?,
            &format!("pg_ctl {}", args.join(" ")),
        )
    }

    /// A CA and a server certificate in the data directory, the key readable by the server's user only. An
    /// expired certificate is signed with `openssl ca`, the one signing command of OpenSSL 3.0 that takes
    /// explicit validity dates.
    fn make_certificates(&mut self, expired: bool) -> io::Result<()> {
        let data = self.data_dir();
        let ca_key = self.dir.join("ca.key");
        let ca_crt = self.dir.join("ca.crt");
        let csr = self.dir.join("server.csr");
        let ext = self.dir.join("server.ext");
        let key = data.join("server.key");
        let crt = data.join("server.crt");
        fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n")?;
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"],
                &ec[..],
                &[
                    "-keyout",
                    path_str(&ca_key)?,
                    "-out",
                    path_str(&ca_crt)?,
                    "-days",
                    "3",
                    "-subj",
                    "/CN=credbroker test CA",
                ],
            ]
            .concat(),
        )?;
        openssl(
            &[
                &["req"],
                &ec[..],
                &[
                    "-keyout",
                    path_str(&key)?,
                    "-out",
                    path_str(&csr)?,
                    "-subj",
                    "/CN=localhost",
                ],
            ]
            .concat(),
        )?;
        let signing = [
            "-in",
            path_str(&csr)?,
            "-out",
            path_str(&crt)?,
            "-extfile",
            path_str(&ext)?,
        ];
        if expired {
            let ca_conf = self.dir.join("ca.cnf");
            let dir = path_str(&self.dir)?;
            fs::write(
                &ca_conf,
                format!(
                    "[ca]\ndefault_ca = test_ca\n[test_ca]\ndatabase = {dir}/index.txt\nnew_certs_dir = {dir}\n\
                     serial = {dir}/serial\ndefault_md = sha256\npolicy = any\nunique_subject = no\n\
                     [any]\ncommonName = supplied\n"
                ),
            )?;
            fs::write(self.dir.join("index.txt"), "")?;
            fs::write(self.dir.join("serial"), "01\n")?;
            openssl(
                &[
                    &[
                        "ca",
                        "-batch",
                        "-notext",
                        "-config",
                        path_str(&ca_conf)?,
                        "-cert",
                        path_str(&ca_crt)?,
                        "-keyfile",
                        path_str(&ca_key)?,
                        "-startdate",
                        "20200101000000Z",
                        "-enddate",
                        "20200102000000Z",
                    ][..],
                    &signing[..],
                ]
                .concat(),
            )?;
        } else {
            openssl(
                &[
                    &[
                        "x509",
                        "-req",
                        "-CA",
                        path_str(&ca_crt)?,
                        "-CAkey",
                        path_str(&ca_key)?,
                        "-CAcreateserial",
                        "-days",
                        "3",
                    ][..],
                    &signing[..],
                ]
                .concat(),
            )?;
        }
        for file in [&key, &crt] {
            self.hand_to_postgres(file)?;
        }
        fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        self.ca_cert = Some(ca_crt);
        Ok(())
    }

    fn hand_to_postgres(&self, path: &Path) -> io::Result<()> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    fn run_pg(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        let exe = self.bin.join(program);
        self.command(&exe)
            .args(args)
            .current_dir(&self.dir)
            .output()
    }

    /// A command running `exe` as the server's user.
    fn command(&self, exe: &Path) -> Command {
        if self.run_as.is_some() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
                .arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }
}

/// Streaming replicas, for failover tests.
///
/// A replica is a [`TestPostgres`] of its own (its own directory and port, the same superuser and password) that
/// streams from its primary. The base backup is taken with `pg_basebackup -R` when the server's bin directory
/// has it (Debian's packages do). The packaged builds of other versions ship only `initdb`, `pg_ctl` and
/// `postgres`, and `pg_basebackup` refuses servers newer than itself, so there the backup is the same one
/// `pg_basebackup` makes, through PostgreSQL's low-level API: `pg_backup_start` (`pg_start_backup` on 14), a copy
/// of the data directory without its WAL, `pg_backup_stop` and its `backup_label`. Either way the replica then
/// fetches the WAL it needs by streaming, so the primary keeps `wal_keep_size = 256MB` from then on.
impl TestPostgres {
    /// Takes a base backup of `primary` and starts it as a streaming replica on a port of its own; returns once
    /// the replica is streaming (or fails after 60 s, saying why).
    ///
    /// # Examples
    ///
    /// A failover that loses the primary's last transactions:
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let primary = TestPostgres::start()?;
    /// let replica = TestPostgres::replica_of(&primary)?;
    /// primary.admin_client()?.batch_execute("CREATE ROLE replicated")?;
    /// replica.wait_for_replay(&primary)?;
    /// replica.pause_replication()?; // what the primary does from now on is not replicated
    /// primary.stop_immediately()?;
    /// replica.promote()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn replica_of(primary: &TestPostgres) -> io::Result<TestPostgres> {
        let dir = make_temp_dir(primary.run_as.is_some())?;
        let mut replica = TestPostgres {
            dir,
            bin: primary.bin.clone(),
            port: 0,
            password: primary.password.clone(),
            ca_cert: None,
            run_as: primary.run_as,
        };
        replica.hand_to_postgres(&replica.dir)?;
        let mut admin = primary.admin_client().map_err(io::Error::other)?;
        // Two statements: ALTER SYSTEM cannot run in the implicit transaction of a multi-statement query.
        admin
            .batch_execute("ALTER SYSTEM SET wal_keep_size = '256MB'")
            .and_then(|()| admin.batch_execute("SELECT pg_reload_conf()"))
            .map_err(io::Error::other)?;
        if primary.bin.join("pg_basebackup").is_file() {
            replica.pg_basebackup(primary)?;
        } else {
            replica.copy_base_backup(primary, &mut admin)?;
        }
        if let Some(ca) = &primary.ca_cert {
            let copy = replica.dir.join("ca.crt");
            fs::copy(ca, &copy)?;
            replica.ca_cert = Some(copy);
        }
        let data = replica.data_dir();
        fs::write(data.join("standby.signal"), "")?;
        replica.hand_to_postgres(&data.join("standby.signal"))?;
        // Appended last, so they win over what the copy of the primary's configuration says.
        let conninfo = format!(
            "host=127.0.0.1 port={} user={ADMIN_USER} password={} application_name=replica",
            primary.port, primary.password
        );
        let mut auto = fs::read_to_string(data.join("postgresql.auto.conf")).unwrap_or_default();
        auto.push_str(&format!(
            "\nprimary_conninfo = '{}'\nunix_socket_directories = '{}'\n",
            conninfo.replace('\'', "''"),
            path_str(&replica.dir)?
        ));
        fs::write(data.join("postgresql.auto.conf"), auto)?;
        replica.hand_to_postgres(&data.join("postgresql.auto.conf"))?;
        let mut last_error = None;
        for _ in 0..5 {
            replica.port = free_port()?;
            match replica.pg_ctl_start() {
                Ok(()) => {
                    last_error = None;
                    break;
                }
                Err(e) => last_error = Some(e),
            }
        }
        if let Some(e) = last_error {
            return Err(e);
        }
        replica.wait_until("the replica to stream from its primary", || {
            Ok(replica
                .admin_client()?
                .query_opt(
                    "SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                    &[],
                )?
                .is_some())
        })?;
        Ok(replica)
    }

    fn pg_basebackup(&self, primary: &TestPostgres) -> io::Result<()> {
        let data = self.data_dir();
        let exe = self.bin.join("pg_basebackup");
        let mut cmd = self.command(&exe);
        cmd.env("PGPASSWORD", &primary.password).args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            ADMIN_USER,
            "-D",
            path_str(&data)?,
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        ]);
        check(cmd.current_dir(&self.dir).output()?, "pg_basebackup")
    }

    /// The base backup `pg_basebackup` would take, with the low-level backup API and a file copy (both servers
    /// run on this host).
    fn copy_base_backup(
        &self,
        primary: &TestPostgres,
        admin: &mut postgres::Client,
    ) -> io::Result<()> {
        let major = primary.major_version().map_err(io::Error::other)?;
        let (start, stop) = if major >= 15 {
            (
                "SELECT pg_backup_start('credbroker replica', true)::text",
                "SELECT labelfile FROM pg_backup_stop(false)",
            )
        } else {
            (
                "SELECT pg_start_backup('credbroker replica', true, false)::text",
                "SELECT labelfile FROM pg_stop_backup(false, false)",
            )
        };
        admin.query_one(start, &[]).map_err(io::Error::other)?;
        let data = self.data_dir();
        let copied = copy_data_dir(&primary.data_dir(), &data);
        let label: String = admin.query_one(stop, &[]).map_err(io::Error::other)?.get(0);
        copied?;
        fs::write(data.join("backup_label"), label)?;
        chown_tree(&data, self.run_as)?;
        fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700))
    }

    /// Promotes this replica to a primary (`pg_ctl promote`, which waits until it accepts writes).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let primary = TestPostgres::start()?;
    /// let replica = TestPostgres::replica_of(&primary)?;
    /// primary.stop_immediately()?;
    /// replica.promote()?;
    /// replica.admin_client()?.batch_execute("CREATE TABLE after_failover ()")?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn promote(&self) -> io::Result<()> {
        self.pg_ctl(&["promote"])
    }

    /// Stops the server the way a crash would (`pg_ctl stop -m immediate`): no shutdown checkpoint, every
    /// connection broken, and nothing more sent to replicas.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let pg = TestPostgres::start()?;
    /// let broker = credbroker::Broker::builder().connection(pg.connection_string()).build()?;
    /// broker.write_role("app", credbroker::Role::new())?;
    /// pg.stop_immediately()?;
    /// assert!(broker.creds("app").is_err()); // the server is gone
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stop_immediately(&self) -> io::Result<()> {
        self.pg_ctl(&["-m", "immediate", "stop"])
    }

    /// Stops this replica's WAL receiver: sets `primary_conninfo` to `''` and reloads (PostgreSQL 13+ stops the
    /// receiver then), and returns once no receiver runs. What the primary commits from then on is not
    /// replicated, as when a failover loses the last transactions of an asynchronous replica.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let primary = TestPostgres::start()?;
    /// let replica = TestPostgres::replica_of(&primary)?;
    /// replica.pause_replication()?;
    /// primary.admin_client()?.batch_execute("CREATE ROLE never_replicated")?;
    /// primary.stop_immediately()?;
    /// replica.promote()?; // without role never_replicated
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn pause_replication(&self) -> io::Result<()> {
        self.admin_client()
            .and_then(|mut c| {
                c.batch_execute("ALTER SYSTEM SET primary_conninfo = ''")?;
                c.batch_execute("SELECT pg_reload_conf()")
            })
            .map_err(io::Error::other)?;
        self.wait_until("the WAL receiver to stop", || {
            Ok(self
                .admin_client()?
                .query_opt("SELECT 1 FROM pg_stat_wal_receiver", &[])?
                .is_none())
        })
    }

    /// Waits (up to 60 s) until this replica has replayed everything `primary` had written when called.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use credbroker::testing::TestPostgres;
    ///
    /// let primary = TestPostgres::start()?;
    /// let replica = TestPostgres::replica_of(&primary)?;
    /// primary.admin_client()?.batch_execute("CREATE ROLE replicated")?;
    /// replica.wait_for_replay(&primary)?;
    /// let found = replica.admin_client()?.query_opt("SELECT 1 FROM pg_roles WHERE rolname = 'replicated'", &[])?;
    /// assert!(found.is_some());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait_for_replay(&self, primary: &TestPostgres) -> io::Result<()> {
        let target: String = primary
            .admin_client()
            .and_then(|mut c| c.query_one("SELECT pg_current_wal_lsn()::text", &[]))
            .map_err(io::Error::other)?
            .get(0);
        self.wait_until("the replica to replay the primary's WAL", || {
            Ok(self
                .admin_client()?
                .query_one(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= $1::text::pg_lsn, false)",
                    &[&target],
                )?
                .get(0))
        })
    }

    /// Polls `done` every 50 ms for up to 60 s; fails naming `what`, with the last error, if it never holds.
    fn wait_until(
        &self,
        what: &str,
        mut done: impl FnMut() -> Result<bool, postgres::Error>,
    ) -> io::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut last = String::new();
        loop {
            match done() {
                Ok(true) => return Ok(()),
                Ok(false) => last.clear(),
                Err(e) => last = e.to_string(),
            }
            if std::time::Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "timed out after 60 s waiting for {what} {last} (server log: {})",
                    self.log_path().display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Copies a running server's data directory for a base backup: without its WAL, its pid file and what the
/// backup protocol leaves out; files that vanish during the copy (the server is running) are skipped.
fn copy_data_dir(from: &Path, to: &Path) -> io::Result<()> {
    const SKIP_FILES: [&str; 3] = ["postmaster.pid", "postmaster.opts", "backup_label"];
    const EMPTY_DIRS: [&str; 5] = [
        "pg_wal",
        "pg_replslot",
        "pg_stat_tmp",
        "pg_dynshmem",
        "pg_notify",
    ];
    fn copy(from: &Path, to: &Path, top: bool) -> io::Result<()> {
        fs::create_dir_all(to)?;
        let entries = match fs::read_dir(from) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let (src, dst) = (entry.path(), to.join(&*name));
            if top && SKIP_FILES.contains(&&*name) {
                continue;
            }
            let kind = match entry.file_type() {
                Ok(kind) => kind,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if kind.is_dir() {
                if top && EMPTY_DIRS.contains(&&*name) {
                    fs::create_dir_all(&dst)?;
                } else {
                    copy(&src, &dst, false)?;
                }
            } else if let Err(e) = fs::copy(&src, &dst) {
                if e.kind() != io::ErrorKind::NotFound {
                    return Err(e);
                }
            }
        }
        Ok(())
    }
    copy(from, to, true)?;
    fs::create_dir_all(to.join("pg_wal").join("archive_status"))
}

/// Hands every file under `path` to the server's user.
fn chown_tree(path: &Path, run_as: Option<(u32, u32)>) -> io::Result<()> {
    let Some((uid, gid)) = run_as else {
        return Ok(());
    };
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), run_as)?;
        }
    }
    Ok(())
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
        if std::thread::panicking() {
            // A failing test: keep the server log for the post-mortem.
            eprintln!(
                "TestPostgres: test failed; server log kept at {}",
                self.log_path().display()
            );
            return;
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn check(out: Output, what: &str) -> io::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}

fn openssl(args: &[&str]) -> io::Result<()> {
    let out = Command::new("openssl").args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot run openssl (install the openssl package): {e}"),
        )
    })?;
    check(out, "openssl")
}

fn path_str(path: &Path) -> io::Result<&str> {
    path.to_str()
        .ok_or_else(|| io::Error::other(format!("path {} is not UTF-8", path.display())))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn postgres_ids() -> io::Result<(u32, u32)> {
    let id = |flag: &str| -> io::Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|_| {
            io::Error::other("running as root needs the `postgres` OS user (apt-get install postgresql creates it)")
        })
    };
    Ok((id("-u")?, id("-g")?))
}

fn make_temp_dir(run_as_postgres: bool) -> io::Result<PathBuf> {
    let suffix = generate_password().map_err(|e| io::Error::other(e.to_string()))?;
    // The server's user must reach the directory: root's TMPDIR may sit under a private home.
    let base = if run_as_postgres {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("credbroker-pg-{}", &suffix[..12]));
    fs::create_dir(&dir)?;
    Ok(dir)
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The environment variable naming the directory of the server binaries to test against; see
/// [Which PostgreSQL](self#which-postgresql).
///
/// # Examples
///
/// A test runner that runs the same test binary against several installed versions:
///
/// ```no_run
/// use credbroker::testing::PG_BIN_ENV;
/// use std::process::Command;
///
/// for major in [14, 16, 17] {
///     let status = Command::new("target/debug/deps/my_integration_test")
///         .env(PG_BIN_ENV, format!("/usr/lib/postgresql/{major}/bin"))
///         .status()?;
///     assert!(status.success(), "PostgreSQL {major}");
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
pub const PG_BIN_ENV: &str = "CREDBROKER_PG_BIN";

/// The directory holding `initdb`, `pg_ctl` and `postgres`.
fn find_bin_dir() -> io::Result<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if has_tools(&dir) {
            return Ok(dir);
        }
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{PG_BIN_ENV}={} does not hold initdb and pg_ctl; point it at a PostgreSQL bin directory \
                 (.ci/install-postgres unpacks versions 14, 16, 17, 18 under /opt/credbroker-pg/<major>/bin)",
                dir.display()
            ),
        ));
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(dir) = std::env::split_paths(&path).find(|d| has_tools(d)) {
            return Ok(dir);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_tools(&dir) {
            return Ok(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates.into_iter().rev().find(|d| has_tools(d)).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH, via pg_config, or under \
             /usr/lib/postgresql/*/bin; install them (apt-get install postgresql)",
        )
    })
}

/// The password a [`PooledClient`](crate::PooledClient) logged in with, for tests that check it appears nowhere
/// (logs, `Debug`, errors): the pool keeps it to itself otherwise.
///
/// # Examples
///
/// ```no_run
/// use credbroker::testing::{pool_password, TestPostgres};
///
/// let pg = TestPostgres::start()?;
/// let broker = credbroker::Broker::builder().connection(pg.connection_string()).build()?;
/// broker.write_role("app", credbroker::Role::new())?;
/// let pool = broker.pool("app")?;
/// let client = pool.get()?;
/// let password = pool_password(&client);
/// assert!(!format!("{client:?} {pool:?}").contains(&password));
/// assert!(!pg.log_contents()?.contains(&password));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use]
pub fn pool_password(client: &crate::PooledClient) -> String {
    client.password()
}

/// The SCRAM-SHA-256 verifier the broker would send for `password` with `iterations` rounds (random salt), for
/// baselines that must do the same work as the broker.
///
/// # Examples
///
/// ```
/// use credbroker::testing::scram_verifier;
///
/// let verifier = scram_verifier("correct horse battery staple", 1)?;
/// assert!(verifier.starts_with("SCRAM-SHA-256$1:"));
/// assert!(!verifier.contains("horse"));
/// # Ok::<(), credbroker::Error>(())
/// ```
pub fn scram_verifier(password: &str, iterations: u32) -> Result<String, crate::Error> {
    crate::credential::scram_verifier(password, iterations).map(|v| v.to_string())
}
