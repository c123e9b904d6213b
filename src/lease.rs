//! Leases and their time arithmetic: issue, renewal capping, and the `VALID UNTIL` timestamp.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, ErrorKind};

/// Longest lease duration accepted anywhere: beyond it a typo (`from_millis` for `from_secs`, say) is likelier
/// than intent, and timestamps stay far from overflow.
///
/// # Examples
///
/// Bounding a lease duration read from configuration before the builder refuses it:
///
/// ```
/// use credbroker::MAX_LEASE;
/// use std::time::Duration;
///
/// let hours: u64 = 36; // from a configuration file
/// let max = Duration::from_secs(hours * 3600).min(MAX_LEASE);
/// let builder = credbroker::Broker::builder().lease(Duration::from_secs(3600), max);
/// ```
pub const MAX_LEASE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A lease on one issued credential, as the lease table holds it.
///
/// Times are whole seconds: the role's `VALID UNTIL` in PostgreSQL is exactly [`Lease::expires_at`].
///
/// # Examples
///
/// Reading when a credential expires, and renewing it while it can still be renewed:
///
/// ```no_run
/// use std::time::{Duration, SystemTime};
///
/// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
/// let creds = broker.creds("readonly")?;
/// let lease = broker.lease(creds.lease_id()).expect("just issued");
/// let left = lease.expires_at().duration_since(SystemTime::now()).unwrap_or_default();
/// println!("{} is valid for {left:?} more", lease.username());
/// if lease.expires_at() < lease.max_expires_at() {
///     let lease = broker.renew(lease.id(), Some(Duration::from_secs(3600)))?;
///     println!("now valid until {}", humantime::format_rfc3339_seconds(lease.expires_at()));
/// }
/// # Ok::<(), credbroker::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub(crate) id: String,
    pub(crate) role: String,
    pub(crate) username: String,
    pub(crate) issued_at: SystemTime,
    pub(crate) expires_at: SystemTime,
    pub(crate) max_expires_at: SystemTime,
    pub(crate) revocation_attempts: u32,
    pub(crate) last_error: Option<String>,
}

impl Lease {
    /// The lease id, `postgresql/creds/<role>/<random id>`.
    ///
    /// # Examples
    ///
    /// Revoking every lease of one role, one at a time:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// for lease in broker.leases().iter().filter(|l| l.role() == "batch") {
    ///     broker.revoke(lease.id())?;
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name of the broker role the credential was issued for.
    ///
    /// # Examples
    ///
    /// Counting live leases by role:
    ///
    /// ```no_run
    /// use std::collections::BTreeMap;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let mut per_role: BTreeMap<String, usize> = BTreeMap::new();
    /// for lease in broker.leases() {
    ///     *per_role.entry(lease.role().to_owned()).or_default() += 1;
    /// }
    /// // The same counts as broker.stats().live
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The PostgreSQL login role (user name) of the credential.
    ///
    /// # Examples
    ///
    /// Finding the lease behind a user name seen in `pg_stat_activity` or a server log:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let suspicious = "readonly-1764342245-k3j9x0c2m5q8w1e4";
    /// if let Some(lease) = broker.leases().into_iter().find(|l| l.username() == suspicious) {
    ///     broker.revoke(lease.id())?;
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn username(&self) -> &str {
        &self.username
    }

    /// When the credential was issued.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::SystemTime;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// # let id = "postgresql/creds/readonly/00000000-0000-0000-0000-000000000000";
    /// if let Some(lease) = broker.lease(id) {
    ///     let age = SystemTime::now().duration_since(lease.issued_at()).unwrap_or_default();
    ///     println!("{} was issued {age:?} ago", lease.username());
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    /// When the lease ends: the role's `VALID UNTIL`, and the time the sweeper revokes it.
    ///
    /// # Examples
    ///
    /// Leases that end within the next five minutes:
    ///
    /// ```no_run
    /// use std::time::{Duration, SystemTime};
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let soon = SystemTime::now() + Duration::from_secs(300);
    /// for lease in broker.leases().iter().filter(|l| l.expires_at() <= soon) {
    ///     println!("{} ends at {}", lease.id(), humantime::format_rfc3339_seconds(lease.expires_at()));
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// The latest [`Lease::expires_at`] renewals can reach: issue time plus the max lease.
    ///
    /// # Examples
    ///
    /// Whether a renewal can still add time, or a new credential is needed:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// # let id = "postgresql/creds/readonly/00000000-0000-0000-0000-000000000000";
    /// let lease = broker.renew(id, None)?;
    /// if lease.expires_at() == lease.max_expires_at() {
    ///     let next = broker.creds(lease.role())?; // switch to it before this lease ends
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn max_expires_at(&self) -> SystemTime {
        self.max_expires_at
    }

    /// How many revocations of this lease have failed so far (0 for a lease nobody tried to revoke).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// for lease in broker.failed_leases() {
    ///     if lease.revocation_attempts() > 10 {
    ///         eprintln!("{} keeps failing: {}", lease.username(), lease.last_error().unwrap_or_default());
    ///     }
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn revocation_attempts(&self) -> u32 {
        self.revocation_attempts
    }

    /// The error of the last failed revocation, if any.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// for lease in broker.failed_leases() {
    ///     if let Some(error) = lease.last_error() {
    ///         eprintln!("{} not dropped yet: {error}", lease.username());
    ///     }
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

/// A default lease and the max lease, checked: `0 < default <= max <= MAX_LEASE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeasePolicy {
    pub default: Duration,
    pub max: Duration,
}

impl LeasePolicy {
    pub(crate) fn new(default: Duration, max: Duration) -> Result<LeasePolicy, Error> {
        let bad = |msg: String| Err(Error::new(ErrorKind::InvalidConfig, msg));
        if default < Duration::from_secs(1) {
            return bad(format!(
                "default lease {default:?} is shorter than one second; leases are whole seconds, give at least 1s"
            ));
        }
        if max > MAX_LEASE {
            return bad(format!(
                "max lease {max:?} is longer than 100 years; give a realistic duration (e.g. Duration::from_secs(86400))"
            ));
        }
        if default > max {
            return bad(format!(
                "default lease {default:?} is longer than max lease {max:?}; the default must not exceed the max"
            ));
        }
        Ok(LeasePolicy { default, max })
    }

    /// Expiry and max expiry of a lease issued at `now`.
    pub(crate) fn issue(&self, now: SystemTime) -> (SystemTime, SystemTime, SystemTime) {
        let issued = floor_secs(now);
        (issued, issued + self.default, issued + self.max)
    }

    /// Expiry of a renewal at `now` adding `increment` (default: the default lease), capped at `max_expires_at`.
    pub(crate) fn renew(
        &self,
        now: SystemTime,
        increment: Option<Duration>,
        max_expires_at: SystemTime,
    ) -> Result<SystemTime, Error> {
        let increment = increment.unwrap_or(self.default);
        if increment < Duration::from_secs(1) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!("renew increment {increment:?} is shorter than one second; give at least 1s, or None for the role's default lease"),
            ));
        }
        let wanted = floor_secs(now)
            .checked_add(increment.min(MAX_LEASE))
            .unwrap_or(max_expires_at);
        Ok(wanted.min(max_expires_at))
    }
}

/// `t` rounded down to a whole second since the epoch.
pub(crate) fn floor_secs(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// `t` as PostgreSQL reads it whatever the server's time zone: `2026-11-28 15:04:05+00`.
pub(crate) fn pg_timestamp(t: SystemTime) -> String {
    // humantime gives `2026-11-28T15:04:05Z`; PostgreSQL takes either form, and this one reads like psql output.
    let rfc3339 = humantime::format_rfc3339_seconds(t).to_string();
    rfc3339.replacen('T', " ", 1).replacen('Z', "+00", 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn timestamps_are_utc_with_offset() {
        assert_eq!(pg_timestamp(at(1_764_342_245)), "2025-11-28 15:04:05+00");
        assert_eq!(pg_timestamp(at(0)), "1970-01-01 00:00:00+00");
    }

    #[test]
    fn policy_checks_durations() {
        let s = Duration::from_secs;
        assert!(LeasePolicy::new(s(60), s(60)).is_ok());
        for (d, m) in [
            (s(0), s(60)),
            (s(61), s(60)),
            (s(1), MAX_LEASE + s(1)),
            (Duration::from_millis(10), s(60)),
        ] {
            assert_eq!(
                LeasePolicy::new(d, m).unwrap_err().kind(),
                ErrorKind::InvalidConfig
            );
        }
    }

    #[test]
    fn issue_and_renew_are_whole_seconds_and_capped() {
        let p = LeasePolicy::new(Duration::from_secs(60), Duration::from_secs(300)).unwrap();
        let now = at(1000) + Duration::from_millis(700);
        let (issued, expires, max) = p.issue(now);
        assert_eq!((issued, expires, max), (at(1000), at(1060), at(1300)));
        assert_eq!(p.renew(at(1010), None, max).unwrap(), at(1070));
        assert_eq!(
            p.renew(at(1010), Some(Duration::from_secs(30)), max)
                .unwrap(),
            at(1040)
        );
        assert_eq!(
            p.renew(at(1010), Some(Duration::from_secs(9999)), max)
                .unwrap(),
            at(1300)
        );
        assert_eq!(
            p.renew(at(1010), Some(Duration::MAX), max).unwrap(),
            at(1300)
        );
        assert_eq!(
            p.renew(at(1010), Some(Duration::ZERO), max)
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidConfig
        );
    }
}
