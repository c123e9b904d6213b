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

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::percent_decode_str;
use postgres::config::{Host, SslMode as PgSslMode};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{chain, Error, ErrorKind};

/// The `sslmode` values the broker understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
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
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    format!(
                        "unknown sslmode {other:?} in the connection string; \
                         use disable, prefer, require, verify-ca or verify-full"
                    ),
                ))
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
    pub config: postgres::Config,
    pub tls: MakeRustlsConnect,
    pub ssl_mode: SslMode,
}

impl Connection {
    /// Parses a libpq `key=value` string or a `postgres://` URL.
    pub(crate) fn parse(source: &str, connect_timeout: Duration) -> Result<Connection, Error> {
        if source.trim().is_empty() {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                "the connection string is empty; give one like \
                 \"host=localhost user=username password=password\" or a postgres:// URL",
            ));
        }
        let (rest, ssl) =
            if source.starts_with("postgres://") || source.starts_with("postgresql://") {
                take_ssl_from_url(source)?
            } else {
                take_ssl_from_key_values(source)?
            };
        let mut config: postgres::Config = rest.parse().map_err(|e: postgres::Error| {
            // The parser's messages name the bad key or value, never the password.
            Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "invalid connection string: {}; use libpq key=value pairs or a postgres:// URL",
                    chain(&e)
                ),
            )
        })?;
        let ssl_mode = match ssl.mode {
            Some(mode) => SslMode::parse(&mode)?,
            None => SslMode::Require,
        };
        config.ssl_mode(match ssl_mode {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Prefer => PgSslMode::Prefer,
            _ => PgSslMode::Require,
        });
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(connect_timeout);
        }
        if config.get_application_name().is_none() {
            config.application_name("credbroker");
        }
        let tls = MakeRustlsConnect::new(tls_config(ssl_mode, ssl.root_cert)?);
        Ok(Connection {
            config,
            tls,
            ssl_mode,
        })
    }

    /// `host:port` of the first target, for messages.
    pub(crate) fn target(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}")
    }

    /// The admin user name as given in the connection string.
    pub(crate) fn user(&self) -> &str {
        self.config.get_user().unwrap_or("")
    }

    /// Opens one client connection, turning failures into errors that say what to fix.
    pub(crate) fn connect(&self) -> Result<postgres::Client, Error> {
        self.config
            .connect(self.tls.clone())
            .map_err(|e| self.explain(e))
    }

    /// Opens one client connection to another database of the same server, with the same credentials and TLS.
    pub(crate) fn connect_to(&self, database: &str) -> Result<postgres::Client, Error> {
        let mut config = self.config.clone();
        config.dbname(database);
        config
            .connect(self.tls.clone())
            .map_err(|e| self.explain(e))
    }

    /// Explains a failure to connect.
    pub(crate) fn explain(&self, err: postgres::Error) -> Error {
        let target = self.target();
        let user = self.user();
        if let Some(db) = err.as_db_error() {
            let hint = match db.code().code() {
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

/// `sslmode` and `sslrootcert` as written in the connection string.
#[derive(Default)]
struct SslKeys {
    mode: Option<String>,
    root_cert: Option<PathBuf>,
}

impl SslKeys {
    /// Takes the pair if it is one of ours; returns false for anything else.
    fn take(&mut self, key: &str, value: &str) -> bool {
        match key {
            "sslmode" => self.mode = Some(value.to_owned()),
            "sslrootcert" => self.root_cert = Some(PathBuf::from(value)),
            _ => return false,
        }
        true
    }
}

/// Splits a libpq `key=value` string (values may be `'quoted'`, with `\` escapes) into the SSL keys and the
/// rest, re-quoted for `postgres::Config`.
fn take_ssl_from_key_values(source: &str) -> Result<(String, SslKeys), Error> {
    let malformed = |msg: &str| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!("invalid connection string: {msg}; write key=value pairs separated by spaces, quoting values with spaces as 'like this'"),
        )
    };
    let mut ssl = SslKeys::default();
    let mut rest = String::new();
    let mut chars = source.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(malformed(&format!("missing \"=\" after {key:?}")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => {
                        return Err(malformed(&format!("unterminated quoted value for {key:?}")))
                    }
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        if !ssl.take(&key, &value) {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            rest.push_str(&format!("{key}='{quoted}' "));
        }
    }
    Ok((rest, ssl))
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query string.
fn take_ssl_from_url(source: &str) -> Result<(String, SslKeys), Error> {
    let mut ssl = SslKeys::default();
    let Some((base, query)) = source.split_once('?') else {
        return Ok((source.to_owned(), ssl));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode_str(value).decode_utf8().map_err(|_| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("invalid connection URL: the value of {key:?} is not valid percent-encoded UTF-8"),
            )
        })?;
        if !ssl.take(key, &value) {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((rest, ssl))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `mode`.
fn tls_config(mode: SslMode, root_cert: Option<PathBuf>) -> Result<ClientConfig, Error> {
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
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoCertificateCheck(provider)))
            .with_no_client_auth());
    };
    let roots = Arc::new(load_roots(mode, root_cert)?);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|e| Error::new(ErrorKind::Tls, format!("TLS setup failed: {e}")))?;
    if chain_only {
        Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            .with_no_client_auth())
    } else {
        Ok(builder.with_webpki_verifier(webpki).with_no_client_auth())
    }
}

/// The CA certificates in `sslrootcert`, or in libpq's default `~/.postgresql/root.crt`.
fn load_roots(mode: SslMode, root_cert: Option<PathBuf>) -> Result<RootCertStore, Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Connection, Error> {
        Connection::parse(s, Duration::from_secs(5))
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
    fn parse_errors_do_not_echo_the_password() {
        let err = parse("host=x password=hunter2secret bogus_key=1")
            .map(|_| ())
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2secret"), "{err}");
    }
}
