//! The owner role: who receives what a revoked credential owned.
//!
//! `DROP ROLE` fails while the role owns objects, so revocation hands them over (`REASSIGN OWNED BY … TO
//! owner`). Whoever receives them gains nothing from it only if that role has no rights of its own worth
//! having: a credential that may create functions can write a `SECURITY DEFINER` one, which PUBLIC may execute,
//! and after revocation it runs as its new owner. Handed to a superuser admin, it would run as a superuser.
//! So the default owner is a dedicated `NOLOGIN` role, [`DEFAULT_OWNER_ROLE`], that [`build`] creates if
//! missing and makes the admin a member of (`REASSIGN OWNED` needs the privileges of the role it hands objects
//! to); it is granted nothing else. An owner named with [`reassign_owned_to`] must exist; a superuser is refused,
//! and so is the admin itself when it is a superuser.
//!
//! [`build`]: crate::BrokerBuilder::build
//! [`reassign_owned_to`]: crate::BrokerBuilder::reassign_owned_to

use postgres::Client;
use postgres_protocol::escape::escape_identifier;

use crate::error::{Error, ErrorKind};
use crate::sql;

/// The role that receives a revoked credential's objects unless
/// [`BrokerBuilder::reassign_owned_to`](crate::BrokerBuilder::reassign_owned_to) says otherwise.
///
/// # Examples
///
/// Listing the tables that revoked credentials left behind, for an operator to keep or drop:
///
/// ```no_run
/// use credbroker::DEFAULT_OWNER_ROLE;
///
/// let mut admin = postgres::Client::connect("host=localhost user=username password=password", postgres::NoTls)?;
/// for row in admin.query(
///     "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner \
///      WHERE r.rolname = $1 AND c.relkind = 'r'",
///     &[&DEFAULT_OWNER_ROLE],
/// )? {
///     let table: String = row.get(0);
///     println!("left by a revoked credential: {table}");
/// }
/// # Ok::<(), postgres::Error>(())
/// ```
pub const DEFAULT_OWNER_ROLE: &str = "credbroker_owner";

/// The owner role as the catalog describes it, seen from the admin.
pub(crate) struct OwnerState {
    pub superuser: bool,
    /// Whether the owner is the admin user itself.
    pub is_admin: bool,
    /// Whether the admin has what `REASSIGN OWNED … TO owner` needs: membership (PostgreSQL 14, 15), the
    /// privileges of the role (16+, where membership may come without INHERIT).
    pub reachable: bool,
}

/// The owner's state, or `None` if no role has that name.
pub(crate) fn state(
    client: &mut Client,
    owner: &str,
    server_version: i32,
) -> Result<Option<OwnerState>, postgres::Error> {
    let privilege = if server_version >= 160000 {
        "USAGE"
    } else {
        "MEMBER"
    };
    Ok(client
        .query_opt(sql::OWNER_STATE, &[&owner, &privilege])?
        .map(|row| OwnerState {
            superuser: row.get(0),
            is_admin: row.get(1),
            reachable: row.get(2),
        }))
}

/// Refuses an owner whose rights a revoked credential's objects would gain: a superuser, which includes the
/// admin when it is a superuser.
pub(crate) fn refuse_privileged(owner: &str, state: &OwnerState) -> Result<(), Error> {
    if !state.superuser {
        return Ok(());
    }
    let who = if state.is_admin {
        "is the admin user, a superuser"
    } else {
        "is a superuser"
    };
    Err(Error::new(
        ErrorKind::InvalidConfig,
        format!(
            "reassign_owned_to {owner:?} {who}: a SECURITY DEFINER function a credential wrote would run as a \
             superuser once its role is revoked; leave reassign_owned_to unset (the broker creates the NOLOGIN \
             role {DEFAULT_OWNER_ROLE:?}) or name a NOLOGIN role without privileges"
        ),
    ))
}

/// Creates the default owner role if it does not exist (`exists` false), then makes the admin able to hand
/// objects to it, unless it is a superuser (which may anyway). On PostgreSQL 16+ the creator holds ADMIN OPTION
/// on the role but not necessarily its privileges (`createrole_self_grant`), hence the explicit `INHERIT`.
pub(crate) fn ensure_default_owner(
    client: &mut Client,
    exists: bool,
    reachable: bool,
    admin_superuser: bool,
    server_version: i32,
) -> Result<(), Error> {
    let owner = DEFAULT_OWNER_ROLE;
    let fix = |e, what: &str| {
        Error::postgres(
            ErrorKind::Permission,
            format!(
                "could not {what} the owner role {owner:?}; as a superuser, run `CREATE ROLE {name} NOLOGIN; \
                 GRANT {name} TO <admin>;`",
                name = escape_identifier(owner)
            ),
            e,
            &[],
        )
    };
    if !exists {
        match client.batch_execute(&sql::create_owner(owner)) {
            Ok(()) => {
                log::info!("created owner role {owner} for the objects of revoked credentials")
            }
            // Another instance created it at the same moment.
            Err(e) if e.code() == Some(&postgres::error::SqlState::DUPLICATE_OBJECT) => {}
            Err(e) => return Err(fix(e, "create")),
        }
    }
    if !admin_superuser && !reachable {
        client
            .batch_execute(&sql::grant_owner_to_admin(owner, None, server_version))
            .map_err(|e| fix(e, "join"))?;
    }
    Ok(())
}
