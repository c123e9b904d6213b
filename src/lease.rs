//! Leases and their time arithmetic: issue, renewal capping, and the `VALID UNTIL` timestamp.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, ErrorKind};

/// Longest lease duration accepted anywhere: beyond it a typo (`from_millis` for `from_secs`, say) is likelier
/// than intent, and timestamps stay far from overflow.
pub const MAX_LEASE: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A lease on one issued credential, as the lease table holds it.
///
/// Times are whole seconds: the role's `VALID UNTIL` in PostgreSQL is exactly [`Lease::expires_at`].
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
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name of the broker role the credential was issued for.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// The PostgreSQL login role (user name) of the credential.
    pub fn username(&self) -> &str {
        &self.username
    }

    /// When the credential was issued.
    pub fn issued_at(&self) -> SystemTime {
        self.issued_at
    }

    /// When the lease ends: the role's `VALID UNTIL`, and the time the sweeper revokes it.
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// The latest [`Lease::expires_at`] renewals can reach: issue time plus the max lease.
    pub fn max_expires_at(&self) -> SystemTime {
        self.max_expires_at
    }

    /// How many revocations of this lease have failed so far (0 for a lease nobody tried to revoke).
    pub fn revocation_attempts(&self) -> u32 {
        self.revocation_attempts
    }

    /// The error of the last failed revocation, if any.
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
