//! The admin connection: parsing the connection string, choosing TLS, and explaining connection failures.
//!
//! `sslmode` follows Vault's original backend and libpq: absent means `require`. The `postgres` crate knows
//! only `disable`, `prefer` and `require`, so this module takes `sslmode` and `sslrootcert` out of the string
//! itself and sets up the rustls connector to match:
//!
//! | `sslmode` | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `prefer` | if the server offers TLS | no |
//! | `require` (default) | yes | no; with `sslrootcert`, the chain (as libpq does) |
//! | `verify-ca` | yes | the chain, against `sslrootcert` |
//! | `verify-full` | yes | the chain and the host name |
//!
//! Where the certificate is not checked (`prefer`, and `require` without `sslrootcert`), a man in the middle can
//! present any certificate and then ask for the password in the clear (`password`) or as MD5, which the client
//! would answer. So in those modes the broker sets `channel_binding=require` unless the string sets
//! `channel_binding` itself: tokio-postgres then refuses cleartext, MD5 and trust before sending anything, and
//! logs in only with SCRAM-SHA-256-PLUS, which binds the exchange to the TLS channel (an interposed server
//! cannot relay it, and SCRAM never sends the password). An explicit `channel_binding=prefer` is the opt-out.
//!
//! The admin may log in without a password in the string (see [Admin
//! authentication](crate::guide::operations#admin-authentication)):
//! - `sslcert`/`sslkey`: a client certificate and its key (PEM), presented by admin connections only (never by
//!   a [`RolePool`](crate::RolePool)'s, which log in with issued credentials), for `hostssl … cert` lines in
//!   `pg_hba.conf`. With a certificate and no password, channel binding is not forced: there is no password
//!   for an interposed server to ask for.
//! - `sslrootcert=system`: the platform's trusted CAs (as libpq 16+), for servers with a certificate from a
//!   public CA; it implies `sslmode=verify-full`, and refuses any weaker mode, since with public CAs only the
//!   host name ties the certificate to your server.
//! - [`BrokerBuilder::password_provider`](crate::BrokerBuilder::password_provider): a closure asked for the
//!   password at every new admin connection.

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use postgres::config::{ChannelBinding, Host, SslMode as PgSslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WantsClientCert;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ConfigBuilder, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;
use zeroize::Zeroizing;

use crate::error::{chain, Error, ErrorKind};

/// The fix for an unknown key: the keys `postgres::Config` reads, and ours.
/// tokio-postgres' default TCP keepalive idle time; a connection string that sets another keeps it.
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

const KNOWN_KEYS: &str = "the keys understood are host, hostaddr, port, user, password, dbname, sslmode, \
     sslrootcert, sslcert, sslkey, connect_timeout, application_name, options, target_session_attrs, channel_binding, \
     keepalives, keepalives_idle, keepalives_interval, keepalives_retries, tcp_user_timeout, \
     load_balance_hosts and sslnegotiation";

/// The `sslmode` values the broker understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, certificate not checked.
    Prefer,
    /// TLS always; certificate checked against `sslrootcert` only if one is given.
    Require,
    /// TLS always; certificate chain checked against `sslrootcert`.
    VerifyCa,
    /// TLS always; certificate chain and host name checked.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, Error> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                // Echo only what looks like a mode name: a value run together with the next pair by a lost
                // space (`sslmode=disablepassword=...`) must not be shown.
                let shown = if other.len() <= 16
                    && other
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'-' || b == b'_')
                {
                    format!(" {other:?}")
                } else {
                    String::new()
                };
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    format!(
                        "unknown sslmode{shown} in the connection string; \
                         use disable, prefer, require, verify-ca or verify-full"
                    ),
                ));
            }
        })
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// A parsed admin connection: the client config, the TLS connector, and how to describe the target.
#[derive(Clone)]
pub(crate) struct Connection {
    /// Holds the admin password as a plain `Vec<u8>` that is freed without being wiped: `postgres::Config` has
    /// no way to zeroize it, and the pool needs it for as long as the broker lives, to open connections after
    /// one breaks. What this module controls is wiped: the connection string's copies made while splitting it
    /// (sized up front so that no growing buffer leaves a copy behind). What it does not: `postgres::Config`'s
    /// own parser and `Config::password` copy the value, and every login copies it again into the SCRAM state
    /// of `postgres-protocol`, with the salted password derived from it; those copies are freed unwiped. The
    /// operator's guide, [Secrets in memory](crate::guide::operations#in-memory), lists them all.
    pub config: postgres::Config,
    /// The same settings for the async client, without the admin password (for the deadpool pool).
    #[cfg(feature = "deadpool")]
    pub async_config: tokio_postgres::Config,
    /// The TLS connector without a client certificate: the one [`RolePool`](crate::RolePool)s use.
    pub tls: MakeRustlsConnect,
    /// The admin's client certificate of `sslcert`/`sslkey`, if given, re-read when the files change.
    client_identity: Option<Arc<ClientIdentity>>,
    /// Asked for the admin password at every new admin connection, if set.
    password_provider: Option<PasswordProvider>,
    /// Whether channel binding is the broker's default here (TLS without a checked certificate, and the string
    /// does not say): a password provider then turns it on.
    bind_channel: bool,
    /// Whether the admin logs in by client certificate alone (no password in the string): only the admin's
    /// own login then drops the channel-binding requirement, never `config`, which pools copy.
    certificate_only: bool,
    pub ssl_mode: SslMode,
    /// `sslrootcert`, for pools whose client library sets up TLS itself (sqlx).
    #[cfg(feature = "sqlx")]
    pub root_cert: Option<PathBuf>,
    /// `-c statement_timeout=… -c lock_timeout=…`, sent in the startup packet of admin sessions only: they are
    /// the sessions' defaults, so `RESET ALL` after a template keeps them.
    admin_options: Option<String>,
}

impl Connection {
    /// Parses a libpq `key=value` string or a `postgres://` URL.
    ///
    /// No error message contains a password given in `source`: every password value found while splitting the
    /// string is redacted from the message, whichever parser (ours or `postgres::Config`'s) produced it.
    pub(crate) fn parse(source: &str, connect_timeout: Duration) -> Result<Connection, Error> {
        let mut keys = Keys::default();
        Connection::parse_keys(source, connect_timeout, &mut keys).map_err(|e| {
            let secrets: Vec<&str> = keys.passwords.iter().map(|p| p.as_str()).collect();
            e.redacted(&secrets)
        })
    }

    fn parse_keys(
        source: &str,
        connect_timeout: Duration,
        keys: &mut Keys,
    ) -> Result<Connection, Error> {
        if source.trim().is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "the connection string is empty; give one like \
                 \"host=localhost user=username password=password\" or a postgres:// URL",
            ));
        }
        let rest = if source.starts_with("postgres://") || source.starts_with("postgresql://") {
            take_keys_from_url(source, keys)?
        } else {
            take_keys_from_key_values(source, keys)?
        };
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e: postgres::Error| {
            // The parser's messages name the bad key, never a value; `parse` redacts passwords all the same.
            let text = chain(&e);
            let text = text
                .strip_prefix("invalid connection string: ")
                .unwrap_or(&text);
            // A garbled string can make part of a password look like a key: show a key only if it is a name.
            let unnamed = text
                .strip_prefix("unknown option `")
                .and_then(|rest| rest.split_once('`'))
                .is_some_and(|(key, _)| {
                    key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                });
            let text = if unnamed {
                "unknown option (not shown: it is not a key name, and could hold a secret)"
            } else {
                text
            };
            let fix = if text.starts_with("unknown option") {
                KNOWN_KEYS
            } else {
                "use libpq key=value pairs or a postgres:// URL"
            };
            Error::new(
                ErrorKind::InvalidConfig,
                format!("invalid connection string: {text}; {fix}"),
            )
        })?;
        drop(rest);
        let system_roots = keys.root_cert.as_deref() == Some(std::path::Path::new(SYSTEM_ROOTS));
        let ssl_mode = match &keys.mode {
            Some(mode) => SslMode::parse(mode)?,
            None if system_roots => SslMode::VerifyFull,
            None => SslMode::Require,
        };
        if system_roots && ssl_mode != SslMode::VerifyFull {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "sslrootcert=system trusts every public CA, so only the host name ties a certificate to your \
                     server: it needs sslmode=verify-full (as libpq), not {ssl_mode}; drop sslmode or set it to \
                     verify-full"
                ),
            ));
        }
        let client_cert = match (keys.client_cert.take(), keys.client_key.take()) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    "the connection string gives only one of sslcert and sslkey; give both: the client \
                     certificate and its private key, in PEM files",
                ))
            }
        };
        if client_cert.is_some() && ssl_mode == SslMode::Disable {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "sslcert/sslkey with sslmode=disable: a client certificate needs TLS; drop sslmode=disable",
            ));
        }
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        let verified = match ssl_mode {
            SslMode::Disable | SslMode::Prefer => false,
            SslMode::Require => keys.root_cert.is_some(),
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        };
        // `disable` is an explicit choice of plaintext; with it, channel binding could never be had anyway.
        let bind_channel = !verified && ssl_mode != SslMode::Disable && !keys.channel_binding;
        let certificate_only = client_cert.is_some() && config.get_password().is_none();
        // Required on the shared config even for a certificate-only admin: RolePools copy it and send passwords.
        if bind_channel {
            config.channel_binding(ChannelBinding::Require);
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("credbroker");
        }
        // A half-open connection (a peer gone without a FIN: failover, a dropped NAT entry) is noticed after
        // about a minute of silence instead of the kernel's two hours. Pool connections inherit this.
        if config.get_keepalives_idle() == DEFAULT_KEEPALIVES_IDLE {
            config
                .keepalives(true)
                .keepalives_idle(Duration::from_secs(30))
                .keepalives_interval(Duration::from_secs(10))
                .keepalives_retries(3);
        }
        let root_cert = keys.root_cert.take();
        let tls = MakeRustlsConnect::new(tls_config(ssl_mode, root_cert.clone(), None)?);
        let client_identity = match client_cert {
            Some(files) => Some(Arc::new(ClientIdentity::load(
                ssl_mode,
                root_cert.clone(),
                files,
            )?)),
            None => None,
        };
        #[cfg(feature = "deadpool")]
        let async_config = {
            let mut async_config = config.clone();
            async_config.password("");
            async_config
        };
        Ok(Connection {
            config: config.into(),
            #[cfg(feature = "deadpool")]
            async_config,
            tls,
            client_identity,
            password_provider: None,
            bind_channel,
            certificate_only,
            ssl_mode,
            #[cfg(feature = "sqlx")]
            root_cert,
            admin_options: None,
        })
    }

    /// Asks `provider` for the admin password at every new admin connection. Refused if the connection string
    /// holds a password too: one source, so nobody wonders which one is in force.
    pub(crate) fn with_password_provider(
        mut self,
        provider: PasswordProvider,
    ) -> Result<Connection, Error> {
        if self.config.get_password().is_some() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "the connection string holds a password and a password provider is set; remove the password \
                 from the string: the provider gives it at every new admin connection",
            ));
        }
        if self.bind_channel {
            self.config.channel_binding(ChannelBinding::Require);
        }
        self.password_provider = Some(provider);
        Ok(self)
    }

    /// Sets the statement and lock timeouts of admin sessions.
    pub(crate) fn with_limits(mut self, statement: Duration, lock: Duration) -> Connection {
        let ms = |d: Duration| d.as_millis().max(1);
        self.admin_options = Some(format!(
            "-c statement_timeout={} -c lock_timeout={}",
            ms(statement),
            ms(lock)
        ));
        self
    }

    /// The config of an admin session: the connection string's, with the statement and lock timeouts added to
    /// any `options` it gives.
    pub(crate) fn admin_config(&self) -> postgres::Config {
        let mut config = self.config.clone();
        if let Some(ours) = &self.admin_options {
            let options = match self.config.get_options() {
                Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {ours}"),
                _ => ours.clone(),
            };
            config.options(&options);
        }
        config
    }

    /// `host:port` of the target, for messages; every host, comma-separated, of a multi-host string (one port
    /// for all of them, or one each, as libpq reads them).
    pub(crate) fn target(&self) -> String {
        let ports = self.config.get_ports();
        let port = |i: usize| match ports {
            [] => 5432,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(5432),
        };
        let hosts = self.config.get_hosts();
        if hosts.is_empty() {
            return format!("localhost:{}", port(0));
        }
        let targets: Vec<String> = hosts
            .iter()
            .enumerate()
            .map(|(i, host)| match host {
                Host::Tcp(h) => format!("{h}:{}", port(i)),
                Host::Unix(p) => format!("{}:{}", p.display(), port(i)),
            })
            .collect();
        targets.join(",")
    }

    /// The admin user name as given in the connection string.
    pub(crate) fn user(&self) -> &str {
        self.config.get_user().unwrap_or("")
    }

    /// Opens one client connection, turning failures into errors that say what to fix.
    pub(crate) fn connect(&self) -> Result<postgres::Client, Error> {
        self.login(self.admin_config())
    }

    /// Opens one client connection to another database of the same server, with the same credentials and TLS.
    pub(crate) fn connect_to(&self, database: &str) -> Result<postgres::Client, Error> {
        let mut config = self.admin_config();
        config.dbname(database);
        self.login(config)
    }

    /// Logs in as the admin with `config`, the password from the provider if one is set, and the admin's TLS.
    fn login(&self, mut config: postgres::Config) -> Result<postgres::Client, Error> {
        if let Some(provider) = &self.password_provider {
            let limit = config
                .get_connect_timeout()
                .copied()
                .unwrap_or(Duration::from_secs(10));
            let password = ask_provider(provider, limit)?;
            config.password(password.as_bytes());
        } else if self.certificate_only && self.bind_channel {
            // The certificate is the only credential: no password is sent for channel binding to protect, and
            // `cert` authentication has no SCRAM exchange that could bind the channel. Only our default is
            // relaxed: a channel_binding the string gives stays as given.
            config.channel_binding(ChannelBinding::Prefer);
        }
        let tls = match &self.client_identity {
            Some(identity) => identity.connector()?,
            None => self.tls.clone(),
        };
        config.connect(tls).map_err(|e| self.explain(e))
    }

    /// Explains a failure to connect.
    pub(crate) fn explain(&self, err: postgres::Error) -> Error {
        let target = self.target();
        let user = self.user();
        if let Some(db) = err.as_db_error() {
            let hint = match db.code().code() {
                "28P01" if self.password_provider.is_some() => format!(
                    "password authentication failed for admin user {user:?}; check the user in the connection \
                     string and the password the password provider returns"
                ),
                "28P01" => format!(
                    "password authentication failed for admin user {user:?}; check the user and password in the connection string"
                ),
                "28000" => format!(
                    "the server refused admin user {user:?} ({}); check pg_hba.conf and the sslmode",
                    db.message()
                ),
                "3D000" => format!("{}; check dbname in the connection string", db.message()),
                _ => format!("PostgreSQL refused the admin connection: {}", db.message()),
            };
            let code = db.code().code().to_owned();
            return Error::new(
                ErrorKind::Connection,
                format!("could not connect to {target}: {hint}"),
            )
            .with_code(code)
            .with_source(err);
        }
        let text = chain(&err);
        if let Some(why) = channel_binding_refusal(&err) {
            return Error::new(
                ErrorKind::Tls,
                format!("refused to log in to {target}: {why}"),
            )
            .with_source(err);
        }
        let lower = text.to_ascii_lowercase();
        if lower.contains("server does not support tls") {
            return Error::new(
                ErrorKind::SslNotEnabled,
                format!(
                    "SSL is not enabled on the server at {target}. It is highly recommended to configure \
                     PostgreSQL to use SSL; the check can be disabled with sslmode=disable in the connection string"
                ),
            )
            .with_source(err);
        }
        if lower.contains("tls handshake") || lower.contains("certificate") {
            // BadSignature: a CA of the same name as the real issuer, but another key.
            let why = if ["unknownissuer", "unknown issuer", "badsignature"]
                .iter()
                .any(|k| lower.contains(k))
            {
                "the server's certificate is not signed by the CA in sslrootcert; give the right CA file"
            } else if lower.contains("not valid for name") || lower.contains("notvalidforname") {
                "the server's certificate does not name the host connected to; connect by a name the certificate \
                 lists, or use sslmode=verify-ca to check the chain only"
            } else if lower.contains("expired") {
                "the server's certificate has expired; renew it on the server"
            } else if lower.contains("notvalidyet") || lower.contains("not valid yet") {
                "the server's certificate is not valid yet; check the clocks"
            } else {
                "the TLS handshake failed; check the server's certificate and sslmode"
            };
            return Error::new(
                ErrorKind::Tls,
                format!("TLS to {target} failed: {why} ({text})"),
            )
            .with_source(err);
        }
        Error::new(
            ErrorKind::Connection,
            format!(
                "could not connect to PostgreSQL at {target}: {text}; check that the server is running and that \
                 host and port are right"
            ),
        )
        .with_source(err)
    }
}

/// If `err` is tokio-postgres refusing a login without channel binding (`channel_binding=require`), what
/// happened and what to do; `None` for any other error.
pub(crate) fn channel_binding_refusal(err: &postgres::Error) -> Option<String> {
    if !chain(err).contains("server did not use channel binding") {
        return None;
    }
    Some(
        "the server did not authenticate with SCRAM-SHA-256-PLUS (channel binding): it asked for the password \
         in the clear or as MD5, or let the user in without one, or the connection is not encrypted. Channel \
         binding is required because the server's certificate is not checked (sslmode=prefer, or require \
         without sslrootcert): a man in the middle could otherwise read the password. The password was not \
         sent. Check the certificate with sslmode=verify-full sslrootcert=/path/to/ca.crt (then any password \
         method is safe), or use scram-sha-256 in pg_hba.conf with TLS, or accept the risk explicitly with \
         channel_binding=prefer in the connection string"
            .to_owned(),
    )
}

/// What the broker reads from the connection string itself: `sslmode` and `sslrootcert` (which
/// `postgres::Config` does not understand), whether `channel_binding` is set, and every password value, to
/// redact from error messages.
#[derive(Default)]
struct Keys {
    mode: Option<String>,
    root_cert: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    /// Whether `channel_binding` was given (it is passed on to `postgres::Config`, which reads it).
    channel_binding: bool,
    passwords: Vec<Zeroizing<String>>,
}

impl Keys {
    /// Takes the pair if it is one of ours and returns true; returns false for a pair to pass on.
    fn take(&mut self, key: &str, value: &str) -> bool {
        match key {
            "sslmode" => self.mode = Some(value.to_owned()),
            "sslrootcert" => self.root_cert = Some(PathBuf::from(value)),
            "sslcert" => self.client_cert = Some(PathBuf::from(value)),
            "sslkey" => self.client_key = Some(PathBuf::from(value)),
            "password" => {
                self.passwords.push(Zeroizing::new(value.to_owned()));
                return false;
            }
            "channel_binding" => {
                self.channel_binding = true;
                return false;
            }
            _ => return false,
        }
        true
    }
}

/// Splits a libpq `key=value` string (values may be `'quoted'`, with `\` escapes) into our keys and the rest,
/// re-quoted for `postgres::Config`.
///
/// The buffers that hold values are allocated once, large enough never to grow, and wiped on drop: a growing
/// `String` would leave copies of the password in freed memory.
fn take_keys_from_key_values(source: &str, keys: &mut Keys) -> Result<Zeroizing<String>, Error> {
    // Messages give byte positions, never the text: a malformed pair may be a piece of the password.
    let malformed = |msg: String| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "invalid connection string: {msg}; write key=value pairs separated by spaces, quoting values \
                 with spaces as 'like this'"
            ),
        )
    };
    // Re-quoting at most doubles a value and adds `='' ` to a pair of at least `k=`.
    let mut rest = Zeroizing::new(String::with_capacity(3 * source.len() + 8));
    let mut value = Zeroizing::new(String::with_capacity(source.len()));
    let mut chars = source.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(key_start, _)) = chars.peek() else {
            break;
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if key.is_empty() {
            return Err(malformed(format!(
                "a value at byte {key_start} has no key before its \"=\""
            )));
        }
        if chars.next().map(|(_, c)| c) != Some('=') {
            return Err(malformed(format!(
                "the word at byte {key_start} is not followed by \"=\" (a value with spaces that is not quoted?)"
            )));
        }
        if !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            let hint = if key.contains("://") {
                "; a URL must start with postgres:// or postgresql://"
            } else {
                ""
            };
            return Err(malformed(format!(
                "the key at byte {key_start} is not a parameter name (letters, digits and '_'){hint}"
            )));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        value.clear();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next().map(|(_, c)| c)),
                    Some(c) => value.push(c),
                    None => {
                        return Err(malformed(format!(
                            "the quoted value of {key:?} (byte {key_start}) has no closing quote"
                        )))
                    }
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next().map(|(_, c)| c));
                } else {
                    value.push(c);
                }
            }
        }
        if !keys.take(&key, &value) {
            rest.push_str(&key);
            rest.push_str("='");
            for c in value.chars() {
                if c == '\\' || c == '\'' {
                    rest.push('\\');
                }
                rest.push(c);
            }
            rest.push_str("' ");
        }
    }
    Ok(rest)
}

/// Takes our keys out of a URL's query string.
///
/// The user information ends at the first `@`, as `postgres::Config` reads it, so the query is looked for only
/// after it: a `?` in a password does not start the query.
fn take_keys_from_url(source: &str, keys: &mut Keys) -> Result<Zeroizing<String>, Error> {
    let invalid = |msg: &str| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!("invalid connection URL: {msg}"),
        )
    };
    let after_scheme = source.find("://").map_or(0, |i| i + 3);
    let authority_start = match source[after_scheme..].find('@') {
        Some(at) => {
            let userinfo = &source[after_scheme..after_scheme + at];
            if let Some((_, password)) = userinfo.split_once(':') {
                keys.passwords.push(Zeroizing::new(password.to_owned()));
                let decoded = percent_decode_str(password).decode_utf8_lossy();
                keys.passwords.push(Zeroizing::new(decoded.into_owned()));
            }
            after_scheme + at + 1
        }
        None => after_scheme,
    };
    let host_end = source[authority_start..]
        .find(['/', '?'])
        .map_or(source.len(), |i| authority_start + i);
    if source[authority_start..host_end].contains('@') {
        return Err(invalid(
            "more than one \"@\" before the host; percent-encode \"@\" in the user name or password as %40",
        ));
    }
    let Some(query_start) = source[authority_start..]
        .find('?')
        .map(|i| authority_start + i)
    else {
        return Ok(Zeroizing::new(source.to_owned()));
    };
    let mut rest = Zeroizing::new(String::with_capacity(source.len()));
    rest.push_str(&source[..query_start]);
    let mut separator = '?';
    for pair in source[query_start + 1..]
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |text: &str, what: &str| -> Result<String, Error> {
            match percent_decode_str(text).decode_utf8() {
                Ok(decoded) => Ok(decoded.into_owned()),
                Err(_) => Err(invalid(&format!(
                    "{what} in the query string is not valid percent-encoded UTF-8"
                ))),
            }
        };
        let key = decode(key, "a key")?;
        if key == "password" {
            // Redacted as written too: a decoding error below must not show it either.
            keys.passwords.push(Zeroizing::new(value.to_owned()));
        }
        let value = Zeroizing::new(decode(value, &format!("the value of {key:?}"))?);
        if !keys.take(&key, &value) {
            rest.push(separator);
            rest.push_str(pair);
            separator = '&';
        }
    }
    Ok(rest)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `mode`, presenting the client certificate and key of `client_cert`
/// (PEM files) if given.
fn tls_config(
    mode: SslMode,
    root_cert: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::Tls, format!("TLS setup failed: {e}")))?;
    let verify_chain_only = match mode {
        SslMode::Disable | SslMode::Prefer => None,
        SslMode::Require => root_cert.as_ref().map(|_| true),
        SslMode::VerifyCa => Some(true),
        SslMode::VerifyFull => Some(false),
    };
    let Some(chain_only) = verify_chain_only else {
        return client_auth(
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(provider))),
            client_cert,
        );
    };
    let roots = Arc::new(load_roots(mode, root_cert)?);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| Error::new(ErrorKind::Tls, format!("TLS setup failed: {e}")))?;
    if chain_only {
        client_auth(
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki))),
            client_cert,
        )
    } else {
        client_auth(builder.with_webpki_verifier(webpki), client_cert)
    }
}

/// Finishes a rustls configuration: with the client certificate chain and key in the PEM files of
/// `client_cert`, or without client authentication.
/// The admin's client certificate and key files, and the TLS connector made from them: re-made at the next
/// admin login after either file's modification time or size changes, so a short-lived certificate rotated on
/// disk (cert-manager, Vault agent) is picked up without a restart.
pub(crate) struct ClientIdentity {
    mode: SslMode,
    root_cert: Option<PathBuf>,
    files: (PathBuf, PathBuf),
    /// The files' stamps when the connector was made, and the connector.
    current: parking_lot::Mutex<(FileStamps, MakeRustlsConnect)>,
}

type FileStamps = [Option<(std::time::SystemTime, u64)>; 2];

impl ClientIdentity {
    fn load(
        mode: SslMode,
        root_cert: Option<PathBuf>,
        files: (PathBuf, PathBuf),
    ) -> Result<ClientIdentity, Error> {
        let stamps = stamps(&files);
        let tls = tls_config(mode, root_cert.clone(), Some(files.clone()))?;
        Ok(ClientIdentity {
            mode,
            root_cert,
            files,
            current: parking_lot::Mutex::new((stamps, MakeRustlsConnect::new(tls))),
        })
    }

    /// The connector for the certificate on disk now. A pair that cannot be used (a key written before its
    /// certificate, mid-rotation) fails this login with the reason; the next login reads the files again.
    fn connector(&self) -> Result<MakeRustlsConnect, Error> {
        let mut current = self.current.lock();
        let now = stamps(&self.files);
        if now != current.0 {
            let tls = tls_config(self.mode, self.root_cert.clone(), Some(self.files.clone()))?;
            *current = (now, MakeRustlsConnect::new(tls));
            log::info!(
                "admin client certificate {} re-read: it changed on disk",
                self.files.0.display()
            );
        }
        Ok(current.1.clone())
    }
}

/// Modification time and size of each file (`None` if unreadable: then it is read, and fails, at once).
fn stamps(files: &(PathBuf, PathBuf)) -> FileStamps {
    let stamp = |path: &PathBuf| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    [stamp(&files.0), stamp(&files.1)]
}

fn client_auth(
    builder: ConfigBuilder<ClientConfig, WantsClientCert>,
    client_cert: Option<(PathBuf, PathBuf)>,
) -> Result<ClientConfig, Error> {
    let Some((cert_path, key_path)) = client_cert else {
        return Ok(builder.with_no_client_auth());
    };
    let unreadable = |what: &str, path: &PathBuf, why: String| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "cannot use {what} {}: {why}; give a readable PEM file",
                path.display()
            ),
        )
    };
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| unreadable("sslcert", &cert_path, e.to_string()))?;
    if chain.is_empty() {
        return Err(unreadable(
            "sslcert",
            &cert_path,
            "it holds no certificate".into(),
        ));
    }
    // The key's own parse errors never quote it.
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| unreadable("sslkey", &key_path, e.to_string()))?;
    builder.with_client_auth_cert(chain, key).map_err(|e| {
        Error::new(
            ErrorKind::Tls,
            format!(
                "cannot use the client certificate {} with the key {}: {e}; give an X.509 v3 certificate and \
                 its own private key, in PEM files",
                cert_path.display(),
                key_path.display()
            ),
        )
    })
}

/// The value of `sslrootcert` that selects the platform's trusted CAs.
pub(crate) const SYSTEM_ROOTS: &str = "system";

/// The platform's trusted CA certificates, through `rustls-native-certs` (which also honours `SSL_CERT_FILE`
/// and `SSL_CERT_DIR`, as OpenSSL and so libpq do). Certificates the store holds but rustls cannot use are
/// skipped; an empty result is an error.
fn system_roots() -> Result<RootCertStore, Error> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "it is empty".to_owned(), |e| e.to_string());
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "sslrootcert=system found no usable CA certificate in the platform's store ({why}); install the \
                 CA bundle (e.g. the ca-certificates package) or give sslrootcert=/path/to/ca.crt"
            ),
        ));
    }
    Ok(roots)
}

/// The CA certificates in `sslrootcert` (the platform's for `system`), or in libpq's default
/// `~/.postgresql/root.crt`.
fn load_roots(mode: SslMode, root_cert: Option<PathBuf>) -> Result<RootCertStore, Error> {
    if root_cert.as_deref() == Some(std::path::Path::new(SYSTEM_ROOTS)) {
        return system_roots();
    }
    let default = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt"));
    let path = match root_cert.or(default.filter(|p| p.exists())) {
        Some(path) => path,
        None => {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "sslmode={mode} needs the CA certificate to check the server against; \
                     add sslrootcert=/path/to/ca.crt to the connection string"
                ),
            ))
        }
    };
    let unreadable = |why: String| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "cannot use sslrootcert {}: {why}; give a readable PEM file of CA certificates",
                path.display()
            ),
        )
    };
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&path).map_err(|e| unreadable(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| unreadable(e.to_string()))?;
        roots.add(cert).map_err(|e| unreadable(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(unreadable("it holds no certificate".into()));
    }
    Ok(roots)
}

/// `sslmode=prefer`/`require` without a CA: encrypt, but accept any certificate (as libpq does). The handshake
/// signature is still verified, so the peer holds the certificate's key.
#[derive(Debug)]
struct NoCertificateCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertificateCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the full webpki check except the host name.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The admin password provider: see [`BrokerBuilder::password_provider`](crate::BrokerBuilder::password_provider).
pub(crate) type PasswordProvider =
    Arc<dyn Fn() -> Result<String, Box<dyn std::error::Error + Send + Sync>> + Send + Sync>;

/// How many admin password provider calls may run at once in a process (the rest fail at once).
const MAX_PROVIDER_CALLS: usize = 8;

/// Asks `provider` for the admin password on a helper thread, waiting up to `limit` (the connect timeout):
/// the provider runs on revocation workers, the sweeper and the pool's threads, so a panic in it is caught
/// and a provider that hangs fails this login instead of stalling them. A provider still running at the limit
/// is left to finish on its own thread; whatever it returns then is wiped and dropped. Errors never hold the
/// password, nor a panic's message (it could).
fn ask_provider(provider: &PasswordProvider, limit: Duration) -> Result<Zeroizing<String>, Error> {
    let failed = |what: String| {
        Error::new(
            ErrorKind::PasswordProvider,
            format!("no admin connection was opened: the admin password provider {what}"),
        )
    };
    // Provider calls still running in this process (one thread each): a hung provider must not pile up a thread
    // per login attempt while the pool, the sweeper and revocations keep retrying.
    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    struct Running;
    impl Drop for Running {
        fn drop(&mut self) {
            RUNNING.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let running = RUNNING.fetch_add(1, Ordering::AcqRel);
    let guard = Running;
    if running >= MAX_PROVIDER_CALLS {
        return Err(failed(format!(
            "has {running} calls still running (hung past the connect timeout); no more are started until one \
             returns: make it return sooner (cache the secret, or give it a timeout of its own)"
        )));
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let provider = provider.clone();
    std::thread::Builder::new()
        .name("credbroker-password-provider".into())
        .spawn(move || {
            let _guard = guard;
            let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                provider().map(Zeroizing::new)
            }));
            // The receiver is gone after a timeout: the answer is dropped here, its password wiped.
            let _ = tx.send(answer);
        })
        .map_err(|e| failed(format!("could not be run (no thread for it: {e})")).with_source(e))?;
    match rx.recv_timeout(limit) {
        Ok(Ok(Ok(password))) => Ok(password),
        Ok(Ok(Err(e))) => Err(failed(format!(
            "failed: {e}; fix what the provider reads (its error is the source of this one)"
        ))
        .with_boxed_source(e)),
        Ok(Err(_)) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(failed(
            "panicked (its message is not shown: it could hold the password); fix the provider: it must return \
             an error instead"
                .into(),
        )),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(failed(format!(
            "gave no answer within the connect timeout ({limit:?}); make it return sooner (cache the secret, or \
             give it a timeout of its own) or raise connect_timeout"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Connection, Error> {
        Connection::parse(s, Duration::from_secs(5))
    }

    fn refused(s: &str) -> Error {
        parse(s).map(|_| ()).expect_err("a bad connection string")
    }

    #[test]
    fn vault_quickstart_string_requires_tls_by_default() {
        let c = parse("host=localhost user=username password=password").unwrap();
        assert_eq!(c.ssl_mode, SslMode::Require);
        assert_eq!(c.config.get_ssl_mode(), PgSslMode::Require);
        assert_eq!(c.user(), "username");
        assert_eq!(c.target(), "localhost:5432");
    }

    #[test]
    fn unverified_tls_requires_channel_binding_unless_the_string_says_otherwise() {
        // A checked certificate (verify-ca, verify-full, require with sslrootcert) keeps the default: tested
        // against a real server, since those modes load the CA file here.
        let binding = |s: &str| parse(s).unwrap().config.get_channel_binding();
        for s in [
            "host=db",
            "host=db sslmode=require",
            "host=db sslmode=prefer",
            "postgres://u:p@db/app?sslmode=require",
        ] {
            assert_eq!(binding(s), ChannelBinding::Require, "{s}");
        }
        for (s, expected) in [
            ("host=db sslmode=disable", ChannelBinding::Prefer),
            ("host=db channel_binding=prefer", ChannelBinding::Prefer),
            (
                "host=db sslmode=require channel_binding=disable",
                ChannelBinding::Disable,
            ),
            (
                "postgres://u:p@db/app?channel_binding=prefer",
                ChannelBinding::Prefer,
            ),
            (
                "host=db sslmode=disable channel_binding=require",
                ChannelBinding::Require,
            ),
        ] {
            assert_eq!(binding(s), expected, "{s}");
        }
    }

    #[test]
    fn key_values_keep_quoted_values() {
        let c =
            parse(r"host=db port = 6543 user='my user' password='it\'s a \\pass' sslmode=disable")
                .unwrap();
        assert_eq!(c.ssl_mode, SslMode::Disable);
        assert_eq!(c.user(), "my user");
        assert_eq!(c.config.get_password(), Some(&br"it's a \pass"[..]));
        assert_eq!(c.target(), "db:6543");
    }

    #[test]
    fn urls_have_their_ssl_keys_taken_out() {
        let c = parse("postgres://u:p@db:5433/app?sslmode=prefer&application_name=x").unwrap();
        assert_eq!(c.ssl_mode, SslMode::Prefer);
        assert_eq!(c.config.get_dbname(), Some("app"));
        assert_eq!(c.config.get_application_name(), Some("x"));
        assert_eq!(c.target(), "db:5433");
    }

    #[test]
    fn multi_host_strings_keep_every_host_and_target_session_attrs() {
        use postgres::config::TargetSessionAttrs;
        for s in [
            "host=a,b port=5432,5433 target_session_attrs=read-write sslmode=disable",
            "postgres://u:p@a:5432,b:5433/app?target_session_attrs=read-write&sslmode=disable",
        ] {
            let c = parse(s).unwrap();
            assert_eq!(c.target(), "a:5432,b:5433", "{s}");
            assert_eq!(
                c.config.get_target_session_attrs(),
                TargetSessionAttrs::ReadWrite,
                "{s}"
            );
        }
        assert_eq!(
            parse("host=a,b port=6000 sslmode=disable")
                .unwrap()
                .target(),
            "a:6000,b:6000"
        );
    }

    #[test]
    fn bad_strings_are_invalid_config() {
        for bad in [
            "",
            "host=x sslmode=bogus",
            "host=x nonsense=1",
            "host",
            "host=x password='unterminated",
            "host=x sslmode=verify-full sslrootcert=/nonexistent/ca.crt",
        ] {
            let err = parse(bad).map(|_| ()).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{bad}: {err}");
        }
    }

    #[test]
    fn a_word_without_equals_is_located_not_echoed() {
        // The password has a space and is not quoted: its second half becomes a word without "=".
        let err = refused("host=x password=hunter2 secondhalf dbname=d");
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        let text = err.to_string();
        assert!(
            text.contains("byte 24") && text.contains("not quoted"),
            "{text}"
        );
        assert!(!text.contains("secondhalf"), "{text}");
    }

    #[test]
    fn a_url_with_a_mistyped_scheme_is_not_echoed() {
        // Read as key=value, the whole URL is one key, password included.
        let err = refused("postgress://admin:hunter2@db/app?sslmode=disable");
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        let text = err.to_string();
        assert!(text.contains("must start with postgres://"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn a_value_without_key_is_refused() {
        // postgres::Config stops reading at an empty key, silently dropping every later pair.
        let err = refused("=x host=db sslmode=disable");
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(err.to_string().contains("byte 0 has no key"), "{err}");
    }

    #[test]
    fn a_question_mark_in_a_url_password_does_not_start_the_query() {
        let c = parse("postgres://u:pa?ss@db/app?sslmode=disable").unwrap();
        assert_eq!(c.ssl_mode, SslMode::Disable);
        assert_eq!(c.config.get_password(), Some(&b"pa?ss"[..]));
        assert_eq!(c.config.get_dbname(), Some("app"));
    }

    #[test]
    fn percent_encoded_url_keys_are_ours_too() {
        let c = parse("postgres://u:p@db/app?ssl%6Dode=disable").unwrap();
        assert_eq!(c.ssl_mode, SslMode::Disable);
    }

    #[test]
    fn an_unencoded_at_in_a_url_password_is_refused_without_echo() {
        let err = refused("postgres://admin:hunter2@secret@db/app");
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        let text = err.to_string();
        assert!(text.contains("%40"), "{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("secret@"),
            "{text}"
        );
    }

    #[test]
    fn a_run_together_sslmode_is_not_echoed() {
        let err = refused("host=x sslmode=disablepassword=hunter2");
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = refused("host=x sslmode=verify_full");
        assert!(err.to_string().contains("\"verify_full\""), "{err}");
    }

    #[test]
    fn parse_errors_do_not_echo_the_password() {
        let err = refused("host=x password=hunter2secret bogus_key=1");
        assert!(!err.to_string().contains("hunter2secret"), "{err}");
        // A URL with a stray '?' before its user, as a property test found it: the decoded query "key" holds the
        // user and password.
        let err = refused("postgres://?ykfvij:%3D7D6%2BLY%3F7Adb:41162/app?sslmode=require");
        assert!(!err.to_string().contains("7D6+LY"), "{err}");
        assert!(
            err.to_string().contains("unknown option (not shown"),
            "{err}"
        );
    }

    #[test]
    fn system_roots_mean_verify_full_and_nothing_weaker() {
        let c = parse("host=db sslrootcert=system").unwrap();
        assert_eq!(c.ssl_mode, SslMode::VerifyFull);
        assert_eq!(c.config.get_channel_binding(), ChannelBinding::Prefer);
        for mode in ["disable", "prefer", "require", "verify-ca"] {
            let err = refused(&format!("host=db sslrootcert=system sslmode={mode}"));
            assert_eq!(err.kind(), ErrorKind::InvalidConfig);
            assert!(
                err.to_string().contains("needs sslmode=verify-full"),
                "{err}"
            );
        }
    }

    #[test]
    fn client_certificates_need_both_files_and_tls() {
        for s in ["host=db sslcert=/c.crt", "host=db sslkey=/c.key"] {
            assert!(refused(s).to_string().contains("give both"), "{s}");
        }
        let err = refused("host=db sslcert=/nowhere/c.crt sslkey=/nowhere/c.key sslmode=disable");
        assert!(err.to_string().contains("needs TLS"), "{err}");
        let err = refused("host=db sslcert=/nowhere/c.crt sslkey=/nowhere/c.key");
        assert!(
            err.to_string()
                .contains("cannot use sslcert /nowhere/c.crt"),
            "{err}"
        );
    }

    #[test]
    fn a_password_provider_excludes_a_password_in_the_string_and_binds_the_channel() {
        let provider: PasswordProvider = Arc::new(|| Ok("pw".to_owned()));
        let err = parse("host=db password=secret-1")
            .unwrap()
            .with_password_provider(provider.clone())
            .map(|_| ())
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(!err.to_string().contains("secret-1"));
        let c = parse("host=db")
            .unwrap()
            .with_password_provider(provider)
            .unwrap();
        assert_eq!(c.config.get_channel_binding(), ChannelBinding::Require);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Passwords with every character that needs quoting or encoding somewhere.
        fn password() -> impl Strategy<Value = String> {
            "[A-Za-z0-9 '\\\\=&@:/?%#+é]{8,16}"
        }

        fn quoted(value: &str) -> String {
            format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
        }

        fn url_encoded(value: &str) -> String {
            percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        }

        /// A connection string holding `password`, as key=value pairs in any order or as a URL.
        fn connection_string(password: String) -> impl Strategy<Value = (String, String)> {
            let sslmode = prop_oneof!["disable", "prefer", "require", "bogus", "verify-fu ll"];
            (
                any::<bool>(),
                sslmode,
                "[a-z]{1,8}",
                any::<u16>(),
                Just(password),
                any::<prop::sample::Index>(),
            )
                .prop_map(|(url, mode, user, port, password, at)| {
                    let s = if url {
                        format!(
                            "postgres://{user}:{}@db:{port}/app?sslmode={}",
                            url_encoded(&password),
                            url_encoded(&mode)
                        )
                    } else {
                        let mut pairs = vec![
                            format!("host=db port={port}"),
                            format!("user={user}"),
                            format!("sslmode={}", quoted(&mode)),
                        ];
                        pairs.insert(
                            at.index(pairs.len() + 1),
                            format!("password={}", quoted(&password)),
                        );
                        pairs.join(" ")
                    };
                    (s, password)
                })
        }

        /// Up to two edits: a character inserted or removed, as a typo would.
        fn mutated((s, password): (String, String)) -> impl Strategy<Value = (String, String)> {
            let edit = (
                any::<prop::sample::Index>(),
                prop::option::of(prop::sample::select(vec![
                    ' ', '\'', '"', '=', '\\', '@', '?', '&', '%', '/', ':', 'x',
                ])),
            );
            prop::collection::vec(edit, 0..=2).prop_map(move |edits| {
                let mut chars: Vec<char> = s.chars().collect();
                for (at, insert) in edits {
                    match insert {
                        Some(c) => chars.insert(at.index(chars.len() + 1), c),
                        None if !chars.is_empty() => {
                            chars.remove(at.index(chars.len()));
                        }
                        None => {}
                    }
                }
                (chars.into_iter().collect(), password.clone())
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn never_panics_on_arbitrary_input(s in any::<String>()) {
                let _ = parse(&s);
                let _ = parse(&format!("postgres://{s}"));
            }

            #[test]
            fn never_panics_on_connection_like_input(s in "[a-z ='\\\\@:/?&%#]{0,40}") {
                let _ = parse(&s);
                let _ = parse(&format!("postgresql://{s}"));
            }

            #[test]
            fn errors_never_show_the_password(
                (s, password) in password().prop_flat_map(connection_string).prop_flat_map(mutated)
            ) {
                if let Err(err) = parse(&s) {
                    prop_assert_eq!(err.kind(), ErrorKind::InvalidConfig);
                    let mut shown = format!("{err} {err:?}");
                    let mut cause = std::error::Error::source(&err);
                    while let Some(c) = cause {
                        shown.push_str(&c.to_string());
                        cause = c.source();
                    }
                    prop_assert!(!shown.contains(&password), "{} in {:?}", password, shown);
                    prop_assert!(!shown.contains(&url_encoded(&password)), "{}", shown);
                }
            }

            #[test]
            fn well_formed_strings_keep_the_password_exactly((s, password) in password().prop_flat_map(connection_string)) {
                match parse(&s) {
                    Ok(c) => prop_assert_eq!(c.config.get_password(), Some(password.as_bytes())),
                    // Only the deliberately bad sslmode values fail.
                    Err(e) => prop_assert!(e.to_string().contains("unknown sslmode"), "{}", e),
                }
            }
        }
    }
}
