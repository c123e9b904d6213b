//! The crate's one error type.
//!
//! Every message says what happened and what to do about it. Messages never contain a password, a SCRAM
//! verifier or the admin password: anything that came back from PostgreSQL is passed through [`redact`] with
//! the secrets of the operation before it is stored.

use std::error::Error as StdError;
use std::fmt;

/// What kind of failure an [`Error`] is; match on it to decide what to do.
///
/// More kinds may come: match with a `_` arm.
///
/// # Examples
///
/// Revoking a lease when the role cannot be dropped right now (the server is down, a lock is held): the lease
/// stays in the table and the sweeper retries it with backoff, so the caller need not retry itself.
///
/// ```no_run
/// use credbroker::ErrorKind;
///
/// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
/// # let creds = broker.creds("readonly")?;
/// let id = creds.lease_id();
/// match broker.revoke(id) {
///     Ok(()) => {}
///     // Revoked by someone else meanwhile, or expired and swept: nothing left to do.
///     Err(e) if e.kind() == ErrorKind::UnknownLease => {}
///     // Stop using the credential (its `VALID UNTIL` still fences it) and let the sweeper finish;
///     // `failed_leases` lists what is waiting, with the last error, for an alert if it lasts.
///     Err(e) if e.kind() == ErrorKind::Revocation => {
///         eprintln!("revocation of {id} deferred: {e}");
///         for lease in broker.failed_leases() {
///             eprintln!("  {} after {} attempts: {:?}", lease.id(), lease.revocation_attempts(), lease.last_error());
///         }
///     }
///     Err(e) => return Err(e),
/// }
/// # Ok::<(), credbroker::Error>(())
/// ```
///
/// Deciding what to do when issuing fails:
///
/// ```no_run
/// use credbroker::{Credential, Error, ErrorKind};
/// use std::time::Duration;
///
/// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
/// let creds: Credential = loop {
///     match broker.creds("readonly") {
///         Ok(creds) => break creds,
///         // The server is down or restarting, or every role of the cap is in use: wait and try again.
///         Err(e) if matches!(e.kind(), ErrorKind::Connection | ErrorKind::LeaseCap) => {
///             eprintln!("{e}; retrying in 5 s");
///             std::thread::sleep(Duration::from_secs(5));
///         }
///         // A bug in the configuration (unknown role, missing right): retrying will not help.
///         Err(e) => return Err(e),
///     }
/// };
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The builder was given something unusable: a malformed connection string, a bad duration, a missing
    /// `sslrootcert`. Nothing was contacted.
    InvalidConfig,
    /// PostgreSQL could not be reached, refused the admin login, or the pool had no connection in time.
    Connection,
    /// No `sslmode` was given (so TLS is required) and the server does not offer SSL.
    SslNotEnabled,
    /// The TLS handshake failed: unknown CA, wrong host name, expired certificate.
    Tls,
    /// The admin user lacks a right the broker needs (for example `CREATEROLE`).
    Permission,
    /// A role name outside 1–32 characters of `[A-Za-z0-9_-]`.
    InvalidRoleName,
    /// A SQL template with an unknown or unbalanced placeholder, or without a required one.
    InvalidTemplate,
    /// PostgreSQL rejected a role's SQL when `write_role` tried it (syntax error, unknown group role, ...).
    TemplateRejected,
    /// No role of that name is defined.
    UnknownRole,
    /// No lease with that id is in the lease table.
    UnknownLease,
    /// The lease has expired or is being revoked, so it can no longer be renewed.
    LeaseExpired,
    /// PostgreSQL failed a statement while issuing or renewing a credential.
    Database,
    /// The lease's role does not exist on the primary the broker reaches since a failover: the failover lost the
    /// transaction that created it. The lease has left the table; request new credentials.
    LeaseLost,
    /// A role could not be dropped; the lease stays in the table and is retried.
    Revocation,
    /// The operating system's random number generator failed.
    Random,
    /// The admin password provider ([`BrokerBuilder::password_provider`](crate::BrokerBuilder::password_provider))
    /// returned an error; [`std::error::Error::source`] is that error.
    PasswordProvider,
    /// A cap on live leases (the role's [`Role::max_leases`](crate::Role::max_leases) or the broker's
    /// [`BrokerBuilder::max_leases`](crate::BrokerBuilder::max_leases)) is reached; nothing was created. Revoke
    /// leases, let them expire, or raise the cap.
    LeaseCap,
    /// The broker has shut down: a [`RolePool`](crate::RolePool) that outlived it can no longer renew or rotate
    /// its credential, and found no connection.
    ShutDown,
}

/// The error of every fallible operation in this crate.
///
/// [`Error::kind`] says what failed; `Display` says what happened and what fixes it; [`std::error::Error::source`]
/// keeps the underlying cause (a `postgres::Error`, an I/O error) where there is one.
///
/// # Examples
///
/// Checking the configuration fails before anything is contacted, so this runs without a server:
///
/// ```
/// use credbroker::{Broker, ErrorKind};
/// use std::time::Duration;
///
/// let err = Broker::builder()
///     .connection("host=localhost user=username password=password")
///     .lease(Duration::from_secs(7200), Duration::from_secs(3600)) // default above max
///     .build()
///     .unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::InvalidConfig);
/// println!("{err}"); // says what is wrong and how to fix it
/// ```
///
/// Logging an error with every cause behind it:
///
/// ```no_run
/// use std::error::Error as _;
///
/// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
/// if let Err(e) = broker.creds("readonly") {
///     eprintln!("could not get a credential ({:?}): {e}", e.kind());
///     let mut cause = e.source();
///     while let Some(c) = cause {
///         eprintln!("  caused by: {c}");
///         cause = c.source();
///     }
/// }
/// # Ok::<(), credbroker::Error>(())
/// ```
pub struct Error {
    kind: ErrorKind,
    message: String,
    code: Option<String>,
    source: Option<Box<dyn StdError + Send + Sync + 'static>>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            code: None,
            source: None,
        }
    }

    /// An error caused by a PostgreSQL client error; its server message is appended (redacted of `secrets`).
    pub(crate) fn postgres(
        kind: ErrorKind,
        context: impl Into<String>,
        err: postgres::Error,
        secrets: &[&str],
    ) -> Error {
        let code = err.code().map(|c| c.code().to_owned());
        let message = format!("{}: {}", context.into(), redact(&describe(&err), secrets));
        let source = if secrets.is_empty() {
            Some(Box::new(err) as Box<dyn StdError + Send + Sync>)
        } else {
            // The postgres error may quote the SQL near a syntax error; keep only the redacted text.
            None
        };
        Error {
            kind,
            message,
            code,
            source,
        }
    }

    pub(crate) fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Error {
        self.source = Some(Box::new(source));
        self
    }

    pub(crate) fn with_boxed_source(mut self, source: Box<dyn StdError + Send + Sync>) -> Error {
        self.source = Some(source);
        self
    }

    pub(crate) fn with_code(mut self, code: impl Into<String>) -> Error {
        self.code = Some(code.into());
        self
    }

    /// The same error with every non-empty secret replaced by `<redacted>` in its message; its source is
    /// dropped if any cause in it quotes a secret.
    pub(crate) fn redacted(mut self, secrets: &[&str]) -> Error {
        self.message = redact(&self.message, secrets);
        let leaks = |s: &(dyn StdError + 'static)| {
            let text = chain(s);
            secrets.iter().any(|p| !p.is_empty() && text.contains(p))
        };
        if self.source.as_deref().is_some_and(|s| leaks(s)) {
            self.source = None;
        }
        self
    }

    /// What kind of failure this is.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{Broker, ErrorKind};
    ///
    /// // No connection string: refused before anything is contacted.
    /// let err = Broker::builder().build().unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    /// ```
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The five-character SQLSTATE PostgreSQL returned (for example `42710`), when the server reported the error.
    ///
    /// # Examples
    ///
    /// Telling a role's SQL that names a missing table (`42P01`) from other rejections:
    ///
    /// ```no_run
    /// use credbroker::{ErrorKind, Role};
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let role = Role::new().creation_sql(
    ///     r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
    ///        GRANT SELECT ON orders TO "{{name}}";"#,
    /// );
    /// match broker.write_role("orders", role) {
    ///     Err(e) if e.kind() == ErrorKind::TemplateRejected && e.db_code() == Some("42P01") => {
    ///         eprintln!("table orders does not exist yet; run the migrations first");
    ///     }
    ///     other => other?,
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn db_code(&self) -> Option<&str> {
        self.code.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Error")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .field("code", &self.code)
            .finish()
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn StdError + 'static))
    }
}

/// The whole message of a client error: the server's `ERROR: message (DETAIL, HINT)` for a database error,
/// else the error and each of its causes, which is where rust-postgres keeps the reason for an I/O or TLS failure.
pub(crate) fn describe(err: &postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            s.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = db.hint() {
            s.push_str(&format!(" (hint: {hint})"));
        }
        return s;
    }
    chain(err)
}

/// An error followed by each of its causes, joined by `": "`.
pub(crate) fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut s = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        next = cause.source();
    }
    s
}

/// `text` with every occurrence of each non-empty secret replaced by `<redacted>`.
pub(crate) fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret, "<redacted>");
    }
    out
}

/// Checks a `Duration` setting against its bounds (`min..=max`), so that no deadline computed from it can
/// overflow and no wait is unbounded. The error names the setting, its bounds and an example.
pub(crate) fn check_duration(
    setting: &str,
    value: std::time::Duration,
    min: std::time::Duration,
    max: std::time::Duration,
    example: &str,
) -> Result<(), Error> {
    if value < min || value > max {
        return Err(Error::new(
            ErrorKind::InvalidConfig,
            format!("{setting} {value:?} is out of range: give {min:?} to {max:?}, e.g. {example}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_replaces_every_secret() {
        let text = "near 'SCRAM-SHA-256$4096:abc' and pw123 and pw123";
        assert_eq!(
            redact(text, &["SCRAM-SHA-256$4096:abc", "pw123", ""]),
            "near '<redacted>' and <redacted> and <redacted>"
        );
    }

    #[test]
    fn error_is_send_sync_static() {
        fn assert_bounds<T: StdError + Send + Sync + 'static>() {}
        assert_bounds::<Error>();
    }
}
