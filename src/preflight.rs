//! Pre-flight: before the broker starts, check that the admin user can do everything revocation and recovery
//! will ask of it, and say in one error each thing that is missing and the `GRANT` that fixes it.
//!
//! | capability | needed for | fix |
//! |---|---|---|
//! | superuser or `CREATEROLE` | creating, altering and dropping roles | `ALTER ROLE admin CREATEROLE;` |
//! | `pg_signal_backend` (or superuser) | ending the sessions of a revoked role | `GRANT pg_signal_backend TO admin;` |
//! | the privileges of the reassign owner (membership on 14–15) | `REASSIGN OWNED BY … TO owner` | `GRANT owner TO admin;` (16+: `… WITH INHERIT TRUE`) |
//! | `CONNECT` on every database | cleaning up objects a role owns there | `GRANT CONNECT ON DATABASE d TO admin;` |
//! | ADMIN OPTION on the marker role (PostgreSQL 16+) | marking each role it creates | `GRANT marker TO admin WITH ADMIN OPTION;` |
//! | membership in the admin group `<marker>_admin` (PostgreSQL 16+) | dropping roles other instances created | `GRANT marker_admin TO admin;` |
//! | ADMIN OPTION on a role's [group](crate::Role::group) (PostgreSQL 16+; checked at `write_role`) | making each credential a member | `GRANT group TO admin WITH ADMIN OPTION, INHERIT FALSE, SET FALSE;` |
//!
//! The marker role and the admin group are created here when missing (the creator is then a member of both with
//! ADMIN OPTION on PostgreSQL 16+). See [`admin_group`](crate::admin_group) for why the group exists.
//!
//! The default owner, `credbroker_owner`, is created if missing and granted to the admin here (see
//! [`owner`](crate::owner)); an owner that is a superuser, or the admin when it is a superuser, is refused with
//! [`ErrorKind::InvalidConfig`].
//!
//! One more check only warns: whether the admin can still connect to a server whose ordinary connection slots
//! are all taken (see [`reserve_advice`]), so that revocation never waits for a free slot.
//!
//! A degraded mode without session termination can be chosen explicitly with
//! [`BrokerBuilder::terminate_sessions(false)`](crate::BrokerBuilder::terminate_sessions); then
//! `pg_signal_backend` is not required.

use postgres::Client;
use postgres_protocol::escape::escape_identifier;

use crate::error::{Error, ErrorKind};
use crate::marker::{admin_group, ensure_group, Group};
use crate::owner::{self, DEFAULT_OWNER_ROLE};
use crate::sql;

/// What the broker will ask of the admin user.
pub(crate) struct Needs<'a> {
    /// The role that receives reassigned objects.
    pub owner: &'a str,
    pub marker: &'a str,
    pub terminate_sessions: bool,
}

/// Who the admin is, as pre-flight found it.
pub(crate) struct Admin {
    pub user: String,
    pub superuser: bool,
}

/// Checks every capability in `needs`, then creates the marker role if it is missing; returns the admin, or one
/// [`ErrorKind::Permission`] error listing each missing capability and its fix.
pub(crate) fn check(client: &mut Client, needs: &Needs<'_>) -> Result<Admin, Error> {
    let db = |e| {
        Error::postgres(
            ErrorKind::Connection,
            "could not read the admin user's rights",
            e,
            &[],
        )
    };
    let row = client.query_one(sql::ADMIN_RIGHTS, &[]).map_err(db)?;
    let (user, superuser, createrole, signal, version): (String, bool, bool, bool, i32) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    if version < sql::MIN_SERVER_VERSION {
        return Err(Error::new(
            ErrorKind::Connection,
            format!("the server runs PostgreSQL version number {version}; credbroker needs PostgreSQL 14 or later"),
        ));
    }
    let admin = escape_identifier(&user);
    let mut missing: Vec<String> = Vec::new();
    if !superuser && !createrole {
        missing.push(format!(
            "may not create roles: `ALTER ROLE {admin} CREATEROLE;` (or connect as a superuser)"
        ));
    }
    if !superuser && !signal && needs.terminate_sessions {
        missing.push(format!(
            "may not end the sessions of revoked credentials: `GRANT pg_signal_backend TO {admin};` \
             (or opt out with BrokerBuilder::terminate_sessions(false): sessions then outlive revocation)"
        ));
    }
    let owner_state = owner::state(client, needs.owner, version).map_err(db)?;
    if let Some(state) = &owner_state {
        owner::refuse_privileged(needs.owner, state)?;
    }
    let is_default_owner = needs.owner == DEFAULT_OWNER_ROLE;
    match &owner_state {
        // The default owner is created, and granted to the admin, below.
        _ if is_default_owner => {}
        None => missing.push(format!(
            "the owner for reassigned objects, {:?}, does not exist: create it (`CREATE ROLE {} NOLOGIN;`), \
             or leave BrokerBuilder::reassign_owned_to unset for the default, {DEFAULT_OWNER_ROLE:?}",
            needs.owner,
            escape_identifier(needs.owner)
        )),
        Some(state) if !state.reachable && !superuser => missing.push(format!(
            "may not hand objects to {:?} (REASSIGN OWNED needs the privileges of that role): `{}`",
            needs.owner,
            sql::grant_owner_to_admin(needs.owner, Some(&user), version)
        )),
        Some(_) => {}
    }
    let unreachable: Vec<String> = client
        .query(sql::DATABASES_WITHOUT_CONNECT, &[])
        .map_err(db)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    for database in unreachable {
        missing.push(format!(
            "may not connect to database {database:?} (needed to clean up what a role owns there): \
             `GRANT CONNECT ON DATABASE {} TO {admin};`",
            escape_identifier(&database)
        ));
    }
    if !superuser && version >= 160000 {
        // A marker this admin creates below comes with ADMIN OPTION; one that exists must have been granted so.
        let admin_option: Option<bool> = client
            .query_opt(sql::HAS_ADMIN_OPTION, &[&needs.marker])
            .map_err(db)?
            .map(|row| row.get(0));
        if admin_option == Some(false) {
            missing.push(format!(
                "may not grant the marker role {:?} to the roles it creates: `GRANT {} TO {admin} WITH ADMIN OPTION;`",
                needs.marker,
                escape_identifier(needs.marker)
            ));
        }
    }
    let group = admin_group(needs.marker);
    if !superuser && version >= 160000 {
        // A group this admin creates below comes with membership; one that exists must have been granted.
        let member: Option<bool> = client
            .query_opt(sql::IS_MEMBER_OF, &[&group])
            .map_err(db)?
            .map(|row| row.get(0));
        if member == Some(false) {
            missing.push(format!(
                "may not drop the expired roles other instances created (PostgreSQL 16+ needs ADMIN OPTION on \
                 each; the admin group {group:?} holds it on every credential): `GRANT {} TO {admin};`",
                escape_identifier(&group)
            ));
        }
    }
    if missing.is_empty() {
        // Only a build that will go ahead creates anything.
        ensure_group(client, Group::Marker, needs.marker)?;
        ensure_group(client, Group::Admin, &group)?;
        if is_default_owner {
            let (exists, reachable) = owner_state.map_or((false, false), |s| (true, s.reachable));
            owner::ensure_default_owner(client, exists, reachable, superuser, version)?;
        }
        match reserve_advice(client, &user, superuser, version) {
            Ok(None) => {}
            Ok(Some(advice)) => log::warn!("{advice}"),
            Err(e) => log::warn!(
                "could not read the server's connection reserve settings: {}",
                crate::error::describe(&e)
            ),
        }
        Ok(Admin { user, superuser })
    } else {
        Err(Error::new(
            ErrorKind::Permission,
            format!(
                "admin user {user:?} lacks what credbroker needs; as a superuser, fix each:\n  - {}",
                missing.join("\n  - ")
            ),
        ))
    }
}

/// The broker's own roles, which no broker role may use as its credentials' group.
pub(crate) struct Reserved<'a> {
    pub marker: &'a str,
    pub owner: &'a str,
}

/// Checks, at `write_role`, the group that the credentials of role `role` will act as (see
/// [`Role::group`](crate::Role::group)); returns whether it exists (a missing one is created once the role's
/// templates pass, by [`ensure_credentials_group`]).
///
/// Refused: a group that can log in (whoever holds its password would be every credential at once, and a
/// `pg_hba.conf` `+group` line would match that login too), a superuser (every credential would be one), one
/// with CREATEROLE, BYPASSRLS or REPLICATION (every credential would hold it), a predefined `pg_*` role, the
/// broker's own roles, and a group that is a member of the admin, of the broker's own roles, of the predefined
/// roles that reach the server's files and programs, or of any role with those attributes (`SET ROLE` reaches
/// it). On PostgreSQL 16+ a non-superuser admin needs ADMIN OPTION on an existing group to
/// grant it; on 14–15 `CREATEROLE` is enough.
pub(crate) fn check_credentials_group(
    client: &mut Client,
    role: &str,
    group: &str,
    reserved: &Reserved<'_>,
) -> Result<bool, Error> {
    let refuse = |why: String| {
        Error::new(
            ErrorKind::InvalidConfig,
            format!("role {role:?} cannot use {group:?} as its credentials' group: {why}"),
        )
    };
    if group == reserved.marker || group == admin_group(reserved.marker) {
        return Err(refuse(
            "it is one of the broker's own roles (the marker or the admin group); name a group of your own".into(),
        ));
    }
    if group.starts_with("pg_") {
        return Err(refuse(
            "names starting with pg_ are PostgreSQL's predefined roles, which carry server-wide rights; name \
             a group of your own"
                .into(),
        ));
    }
    if group == reserved.owner {
        return Err(refuse(
            "it is the role that receives what revoked credentials owned (reassign_owned_to): the credentials \
             would get all of it; name a group of your own"
                .into(),
        ));
    }
    let db = |e| {
        Error::postgres(
            ErrorKind::Database,
            format!("could not check the group {group:?} of role {role:?}"),
            e,
            &[],
        )
    };
    let rights = client.query_one(sql::ADMIN_RIGHTS, &[]).map_err(db)?;
    let (admin, admin_superuser, version): (String, bool, i32) =
        (rights.get(0), rights.get(1), rights.get(4));
    let marker_admin = admin_group(reserved.marker);
    let mut forbidden = vec![reserved.marker, &marker_admin, reserved.owner];
    forbidden.extend(sql::SERVER_ACCESS_ROLES);
    let Some(row) = client
        .query_opt(sql::GROUP_STATE, &[&group, &forbidden])
        .map_err(db)?
    else {
        return Ok(false);
    };
    let (login, superuser, admin_option): (bool, bool, bool) = (row.get(0), row.get(1), row.get(2));
    let name = escape_identifier(group);
    if superuser {
        return Err(refuse(format!(
            "it is a superuser, and every credential would act as one; use a NOLOGIN role with only the \
             privileges the application needs (`CREATE ROLE {name}_app NOLOGIN;`)"
        )));
    }
    let attributes: Vec<&str> = [
        (
            row.get::<_, bool>(3),
            "CREATEROLE (every credential could create and grant roles)",
        ),
        (
            row.get::<_, bool>(4),
            "BYPASSRLS (row-level security would not apply to any credential)",
        ),
        (
            row.get::<_, bool>(5),
            "REPLICATION (every credential could stream the whole cluster)",
        ),
    ]
    .into_iter()
    .filter_map(|(set, what)| set.then_some(what))
    .collect();
    if !attributes.is_empty() {
        return Err(refuse(format!(
            "it has {}; every credential acts as the group, so drop them: `ALTER ROLE {name} NOCREATEROLE \
             NOBYPASSRLS NOREPLICATION;`",
            attributes.join(", ")
        )));
    }
    let (reserved_parents, mighty_parents): (Vec<String>, Vec<String>) = (row.get(6), row.get(7));
    if let Some(parent) = reserved_parents.iter().chain(&mighty_parents).next() {
        let what = if *parent == admin {
            "the broker's admin, so every credential would hold the admin's rights"
        } else if reserved_parents.contains(parent) {
            "one of the broker's own roles or a predefined role that reads or writes the server's files or runs \
             programs on it"
        } else {
            "a role with SUPERUSER, CREATEROLE, BYPASSRLS or REPLICATION, which every credential could SET ROLE to"
        };
        return Err(refuse(format!(
            "it is a member of {parent:?}, {what}; revoke that membership (`REVOKE {} FROM {name};`) or name \
             another group",
            escape_identifier(parent)
        )));
    }
    if login {
        return Err(refuse(format!(
            "it can log in, so whoever holds its password acts as every credential, and a pg_hba.conf \
             `+{group}` line matches that login too; make it a group with `ALTER ROLE {name} NOLOGIN;` \
             (see docs/operations.md, \"Identity: ephemeral logins, a stable group\", on moving a static user to a group)"
        )));
    }
    if !admin_superuser && version >= 160000 && !admin_option {
        return Err(Error::new(
            ErrorKind::Permission,
            format!(
                "admin user {admin:?} may not grant the group {group:?} of role {role:?} to credentials \
                 (PostgreSQL 16+ needs ADMIN OPTION on it); as a superuser, run `GRANT {name} TO {} WITH ADMIN \
                 OPTION, INHERIT FALSE, SET FALSE;`",
                escape_identifier(&admin)
            ),
        ));
    }
    Ok(true)
}

/// Creates the credentials' group `group` (`NOLOGIN`) unless `exists`; the creator holds ADMIN OPTION on it
/// on PostgreSQL 16+, so it may grant it. If another instance created it at the same moment, it is checked
/// again as an existing group.
pub(crate) fn ensure_credentials_group(
    client: &mut Client,
    role: &str,
    group: &str,
    exists: bool,
    reserved: &Reserved<'_>,
) -> Result<(), Error> {
    if exists {
        return Ok(());
    }
    match client.batch_execute(&sql::create_group(group)) {
        Ok(()) => {
            log::info!("created group role {group} for the credentials of a broker role");
            Ok(())
        }
        Err(e) if sql::is_duplicate_role(&e) => {
            check_credentials_group(client, role, group, reserved).map(drop)
        }
        Err(e) if e.code() == Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) => {
            Err(Error::postgres(
                ErrorKind::Permission,
                format!(
                    "could not create the group role {group:?}; as a superuser, run `CREATE ROLE {} NOLOGIN;`",
                    escape_identifier(group)
                ),
                e,
                &[],
            ))
        }
        Err(e) => Err(Error::postgres(
            ErrorKind::Database,
            format!("could not create the group role {group:?} of role {role:?}"),
            e,
            &[],
        )),
    }
}

/// What the admin lacks to open a connection on a server whose ordinary slots are all taken, with the setting or
/// `GRANT` that fixes it; `None` if it can. A broker at rest holds `min_idle` connections, so a revocation
/// usually needs none; one that does (the idle connection broken, or in use) takes a reserved slot:
///
/// | server | who may use the reserve | setting |
/// |---|---|---|
/// | 16+ | members of `pg_use_reserved_connections` | `reserved_connections` |
/// | any | superusers (also the above) | `superuser_reserved_connections` (default 3) |
pub(crate) fn reserve_advice(
    client: &mut Client,
    user: &str,
    superuser: bool,
    version: i32,
) -> Result<Option<String>, postgres::Error> {
    let admin = escape_identifier(user);
    let setting = |client: &mut Client, name: &str| -> Result<i32, postgres::Error> {
        Ok(client
            .query_one("SELECT current_setting($1)::int", &[&name])?
            .get(0))
    };
    let prefix = format!(
        "admin user {user:?} cannot connect to a server whose ordinary connection slots are all taken, so \
         revocation then waits for a free slot (and is retried with backoff)"
    );
    if superuser {
        if setting(client, "superuser_reserved_connections")? > 0 {
            return Ok(None);
        }
        return Ok(Some(format!(
            "{prefix}: no slot is reserved for superusers; as a superuser run \
             `ALTER SYSTEM SET superuser_reserved_connections = 3;` and restart PostgreSQL"
        )));
    }
    if version < 160000 {
        return Ok(Some(format!(
            "{prefix}: before PostgreSQL 16 only superusers may use reserved slots \
             (superuser_reserved_connections); on 16+ use `ALTER SYSTEM SET reserved_connections = 3;` and \
             `GRANT pg_use_reserved_connections TO {admin};`"
        )));
    }
    let reserved = setting(client, "reserved_connections")?;
    let member: bool = client
        .query_one(
            "SELECT pg_has_role(current_user, 'pg_use_reserved_connections', 'USAGE')",
            &[],
        )?
        .get(0);
    let mut fixes = Vec::new();
    if reserved == 0 {
        fixes
            .push("`ALTER SYSTEM SET reserved_connections = 3;` and restart PostgreSQL".to_owned());
    }
    if !member {
        fixes.push(format!("`GRANT pg_use_reserved_connections TO {admin};`"));
    }
    if fixes.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!(
        "{prefix}; as a superuser, run {}",
        fixes.join(" and ")
    )))
}
