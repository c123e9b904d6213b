//! State in the database: the marker every issued role carries, and its lease metadata.
//!
//! The lease table lives in memory, so the catalog keeps the truth that must survive the process. In the
//! transaction that creates a credential's role, the broker also makes the role a member of a `NOLOGIN` marker
//! role (default `credbroker_lease`) and writes a comment on it:
//!
//! ```text
//! credbroker lease=postgresql/creds/production/5f3c… role=production instance=web-1/app issued=2026-11-28T15:04:05Z max=2026-11-29T15:04:05Z
//! ```
//!
//! `VALID UNTIL` is always the lease's expiry, so the catalog alone says which roles are live, whose they are,
//! and until when: [`recovery`](crate::recovery) reads it back at start. A role without the marker is never
//! touched by recovery or the orphan sweep, whatever its name.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postgres::Client;
use postgres_protocol::escape::escape_identifier;

use crate::error::{Error, ErrorKind};
use crate::sql;

/// The marker role's name unless [`BrokerBuilder::marker_role`](crate::BrokerBuilder::marker_role) says otherwise.
///
/// # Examples
///
/// Every credential role is a member of the marker role, so an operator can count them from any session:
///
/// ```no_run
/// use credbroker::DEFAULT_MARKER_ROLE;
///
/// let mut admin = postgres::Client::connect("host=localhost user=username password=password", postgres::NoTls)?;
/// let credentials: i64 = admin
///     .query_one(
///         "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid WHERE r.rolname = $1",
///         &[&DEFAULT_MARKER_ROLE],
///     )?
///     .get(0);
/// println!("{credentials} credential roles exist");
/// # Ok::<(), postgres::Error>(())
/// ```
pub const DEFAULT_MARKER_ROLE: &str = "credbroker_lease";

/// Longest instance name: it goes into every role comment.
///
/// # Examples
///
/// An instance name made from a pod's name, which may be longer:
///
/// ```
/// use credbroker::{Broker, MAX_INSTANCE_NAME_LEN};
///
/// let pod = "orders-api-7c9f8d6b5-x2k4q.orders.svc.cluster.local.with.a.very.long.suffix.example";
/// let name: String = pod.chars().take(MAX_INSTANCE_NAME_LEN).collect();
/// assert_eq!(name.len(), MAX_INSTANCE_NAME_LEN);
/// let builder = Broker::builder()
///     .connection("host=localhost user=username password=password")
///     .instance_name(name);
/// ```
pub const MAX_INSTANCE_NAME_LEN: usize = 63;

/// The first word of every comment the broker writes.
const COMMENT_TAG: &str = "credbroker";

/// What the comment on a credential's role records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseMark {
    pub lease_id: String,
    pub role: String,
    pub instance: String,
    pub issued_at: SystemTime,
    pub max_expires_at: SystemTime,
}

impl LeaseMark {
    /// The comment text. Every value is made of characters that need no quoting (lease ids, role names and
    /// instance names are checked; times are RFC 3339), so the text splits back on spaces and `=`.
    pub(crate) fn comment(&self) -> String {
        format!(
            "{COMMENT_TAG} lease={} role={} instance={} issued={} max={}",
            self.lease_id,
            self.role,
            self.instance,
            humantime::format_rfc3339_seconds(self.issued_at),
            humantime::format_rfc3339_seconds(self.max_expires_at),
        )
    }

    /// Reads a comment back; `None` for anything the broker did not write.
    pub(crate) fn parse(comment: &str) -> Option<LeaseMark> {
        let mut words = comment.split(' ');
        if words.next()? != COMMENT_TAG {
            return None;
        }
        let (mut lease_id, mut role, mut instance, mut issued, mut max) =
            (None, None, None, None, None);
        for word in words {
            let (key, value) = word.split_once('=')?;
            match key {
                "lease" => lease_id = Some(value.to_owned()),
                "role" => role = Some(value.to_owned()),
                "instance" => instance = Some(value.to_owned()),
                "issued" => issued = Some(parse_time(value)?),
                "max" => max = Some(parse_time(value)?),
                _ => {}
            }
        }
        Some(LeaseMark {
            lease_id: lease_id?,
            role: role?,
            instance: instance?,
            issued_at: issued?,
            max_expires_at: max?,
        })
    }
}

fn parse_time(value: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(value).ok()
}

/// Checks a configured instance name: 1–63 characters of `[A-Za-z0-9_.:@/-]`.
pub(crate) fn check_instance_name(name: &str) -> Result<(), Error> {
    let ok =
        !name.is_empty() && name.len() <= MAX_INSTANCE_NAME_LEN && name.chars().all(instance_char);
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "instance name {name:?} is not 1–{MAX_INSTANCE_NAME_LEN} characters of [A-Za-z0-9_.:@/-]; \
                 give a name such as \"web-1\" or \"host/app\""
            ),
        ))
    }
}

fn instance_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.:@/-".contains(c)
}

/// The default instance name, `<host name>/<executable name>`, with other characters replaced by `_`. A
/// restarted process gets the same name, so it adopts the leases its predecessor left; two processes of the same
/// program on one host must be given distinct names with
/// [`BrokerBuilder::instance_name`](crate::BrokerBuilder::instance_name).
pub(crate) fn default_instance_name() -> String {
    // From the operating system on every platform: a fixed fallback shared by many hosts would make them adopt
    // each other's leases. Only a host without any name at all gets one.
    let host = gethostname::gethostname()
        .to_string_lossy()
        .trim()
        .to_owned();
    let host = if host.is_empty() {
        "unnamed-host".to_owned()
    } else {
        host
    };
    let program = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "app".into());
    let name: String = format!("{host}/{program}")
        .chars()
        .map(|c| if instance_char(c) { c } else { '_' })
        .take(MAX_INSTANCE_NAME_LEN)
        .collect();
    name
}

/// The name of the admin group of the instances sharing the marker role `marker`: `<marker>_admin`
/// (`credbroker_lease_admin` by default), the marker cut to 57 bytes (at a character boundary) if needed to keep
/// the name within PostgreSQL's 63.
///
/// Every issued role is granted to this `NOLOGIN NOINHERIT` group `WITH ADMIN OPTION` in the transaction that
/// creates it. Since PostgreSQL 16 a non-superuser with `CREATEROLE` may drop only roles it holds ADMIN OPTION
/// on, and only a role's creator gets that automatically; through the group, every instance's admin that is a
/// member holds it on every credential of every instance, so the living can drop a dead instance's expired roles
/// (the orphan sweep) whoever created them. `NOINHERIT` keeps the members from taking on the credentials'
/// privileges through the group.
///
/// # Examples
///
/// The `GRANT` that lets the admin user of a new instance sweep the roles of the others:
///
/// ```
/// use credbroker::{admin_group, DEFAULT_MARKER_ROLE};
///
/// let group = admin_group(DEFAULT_MARKER_ROLE);
/// assert_eq!(group, "credbroker_lease_admin");
/// println!(r#"GRANT "{group}" TO broker_admin_2;"#);
/// ```
#[must_use]
pub fn admin_group(marker: &str) -> String {
    const SUFFIX: &str = "_admin";
    let mut end = marker.len().min(63 - SUFFIX.len());
    while !marker.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{SUFFIX}", &marker[..end])
}

/// A group role the broker creates and relies on: the marker or the admin group.
#[derive(Clone, Copy)]
pub(crate) enum Group {
    Marker,
    Admin,
}

/// Creates the marker role (or the admin group) `name` if it does not exist yet, and refuses one that could
/// log in or is a superuser (a name that collides with a real user).
pub(crate) fn ensure_group(client: &mut Client, group: Group, name: &str) -> Result<(), Error> {
    let what = match group {
        Group::Marker => "marker role",
        Group::Admin => "admin group",
    };
    let db = |e| {
        Error::postgres(
            ErrorKind::Database,
            format!("could not check the {what} {name:?}"),
            e,
            &[],
        )
    };
    let row = client.query_opt(sql::MARKER_STATE, &[&name]).map_err(db)?;
    match row {
        Some(row) if row.get::<_, bool>(0) => Err(Error::new(
            ErrorKind::InvalidConfig,
            format!(
                "{what} {name:?} exists and can log in or is a superuser, so it is not a group; \
                 choose another marker name with BrokerBuilder::marker_role"
            ),
        )),
        Some(_) => Ok(()),
        None => {
            let (create, by_hand) = match group {
                Group::Marker => (sql::create_marker(name), "NOLOGIN"),
                Group::Admin => (sql::create_admin_group(name), "NOLOGIN NOINHERIT"),
            };
            match client.batch_execute(&create) {
                Ok(()) => {
                    log::info!("created {what} {name}");
                    Ok(())
                }
                // Another instance created it at the same moment.
                Err(e) if e.code() == Some(&postgres::error::SqlState::DUPLICATE_OBJECT) => Ok(()),
                Err(e) => Err(Error::postgres(
                    ErrorKind::Permission,
                    format!(
                        "could not create the {what} {name:?}; create it as a superuser with `CREATE ROLE {} {by_hand};`",
                        escape_identifier(name)
                    ),
                    e,
                    &[],
                )),
            }
        }
    }
}

/// A role that carries the marker, as the catalog describes it.
#[derive(Debug, Clone)]
pub(crate) struct MarkedRole {
    pub username: String,
    /// `VALID UNTIL`; `None` if unset or infinite.
    pub valid_until: Option<SystemTime>,
    /// The comment, if it is one the broker wrote.
    pub mark: Option<LeaseMark>,
}

impl MarkedRole {
    /// When this role's lease ends: `VALID UNTIL`, never later than the recorded max. `None` when neither is
    /// known: the role is then left alone.
    pub(crate) fn expires_at(&self) -> Option<SystemTime> {
        let max = self.mark.as_ref().map(|m| m.max_expires_at);
        match (self.valid_until, max) {
            (Some(v), Some(m)) => Some(v.min(m)),
            (v, m) => v.or(m),
        }
    }

    /// Whether this role's comment names `instance`.
    pub(crate) fn belongs_to(&self, instance: &str) -> bool {
        self.mark.as_ref().is_some_and(|m| m.instance == instance)
    }
}

/// The server's current time (see [`sql::SERVER_NOW`]).
pub(crate) fn server_now(client: &mut Client) -> Result<SystemTime, postgres::Error> {
    Ok(client.query_one(sql::SERVER_NOW, &[])?.get(0))
}

/// Every member of the marker role, with its `VALID UNTIL` and comment.
pub(crate) fn marked_roles(
    client: &mut Client,
    marker: &str,
) -> Result<Vec<MarkedRole>, postgres::Error> {
    let rows = client.query(sql::MARKED_ROLES, &[&marker])?;
    Ok(to_marked(&rows))
}

/// The members of the marker role whose `VALID UNTIL` passed at least `age` ago by the server's clock.
pub(crate) fn expired_marked_roles(
    client: &mut Client,
    marker: &str,
    age: Duration,
) -> Result<Vec<MarkedRole>, postgres::Error> {
    let rows = client.query(sql::ORPHAN_CANDIDATES, &[&marker, &age.as_secs_f64()])?;
    Ok(to_marked(&rows))
}

fn to_marked(rows: &[postgres::Row]) -> Vec<MarkedRole> {
    rows.iter()
        .map(|row| {
            let valid_until: Option<i64> = row.get(1);
            let comment: Option<String> = row.get(2);
            MarkedRole {
                username: row.get(0),
                valid_until: valid_until
                    .and_then(|s| u64::try_from(s).ok())
                    .map(|s| UNIX_EPOCH + Duration::from_secs(s)),
                mark: comment.as_deref().and_then(LeaseMark::parse),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark() -> LeaseMark {
        LeaseMark {
            lease_id: "postgresql/creds/prod/0011-22".into(),
            role: "prod".into(),
            instance: "host-1/app".into(),
            issued_at: UNIX_EPOCH + Duration::from_secs(1_764_342_245),
            max_expires_at: UNIX_EPOCH + Duration::from_secs(1_764_428_645),
        }
    }

    #[test]
    fn comment_round_trips() {
        let m = mark();
        assert_eq!(
            m.comment(),
            "credbroker lease=postgresql/creds/prod/0011-22 role=prod instance=host-1/app \
             issued=2025-11-28T15:04:05Z max=2025-11-29T15:04:05Z"
        );
        assert_eq!(LeaseMark::parse(&m.comment()), Some(m));
    }

    #[test]
    fn admin_group_names_fit_postgres() {
        assert_eq!(admin_group(DEFAULT_MARKER_ROLE), "credbroker_lease_admin");
        let long = "é".repeat(31) + "x"; // 63 bytes
        let group = admin_group(&long);
        assert_eq!(group, "é".repeat(28) + "_admin");
        assert!(group.len() <= 63);
    }

    #[test]
    fn foreign_comments_are_not_marks() {
        for c in [
            "",
            "hello",
            "credbroker",
            "credbroker lease=x role=y",
            "credbroker lease=x role=y instance=z issued=yesterday max=2025-11-29T15:04:05Z",
            "credbroker: every member of this role is a credential",
        ] {
            assert_eq!(LeaseMark::parse(c), None, "{c:?}");
        }
    }

    #[test]
    fn instance_names() {
        assert!(check_instance_name("web-1").is_ok());
        assert!(check_instance_name("host.example.com/app@2:x_y").is_ok());
        for bad in ["", "a b", "x'y", "é", &"a".repeat(64)] {
            assert_eq!(
                check_instance_name(bad).unwrap_err().kind(),
                ErrorKind::InvalidConfig,
                "{bad:?}"
            );
        }
        let default = default_instance_name();
        assert!(check_instance_name(&default).is_ok(), "{default:?}");
        assert!(default.contains('/'), "{default:?}");
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let expected: String = host
            .chars()
            .map(|c| if instance_char(c) { c } else { '_' })
            .collect();
        assert!(
            default.starts_with(&format!("{expected}/")),
            "{default:?} for host {host:?}"
        );
    }

    #[test]
    fn expiry_is_valid_until_capped_by_max() {
        let at = |s| Some(UNIX_EPOCH + Duration::from_secs(s));
        let role = |valid_until, mark| MarkedRole {
            username: "u".into(),
            valid_until,
            mark,
        };
        let m = mark();
        let max = m.max_expires_at;
        assert_eq!(role(at(10), Some(m.clone())).expires_at(), at(10));
        assert_eq!(role(None, Some(m.clone())).expires_at(), Some(max));
        assert_eq!(role(at(u32::MAX as u64), Some(m)).expires_at(), Some(max));
        assert_eq!(role(at(10), None).expires_at(), at(10));
        assert_eq!(role(None, None).expires_at(), None);
    }
}
