//! Every SQL statement the broker builds itself, in one place. Identifiers and literals are quoted with
//! `postgres_protocol::escape`, which is correct whatever `standard_conforming_strings` says; values that can be
//! bound as parameters are.

use postgres_protocol::escape::{escape_identifier, escape_literal};

/// The admin's own rights (superuser, CREATEROLE, whether it may signal other backends) and the server version.
pub(crate) const ADMIN_RIGHTS: &str = "SELECT current_user::text, r.rolsuper, r.rolcreaterole, \
     pg_has_role(current_user, 'pg_signal_backend', 'MEMBER'), current_setting('server_version_num')::int \
     FROM pg_roles r WHERE r.rolname = current_user";

/// The oldest PostgreSQL the broker's SQL runs on, as `server_version_num`.
pub(crate) const MIN_SERVER_VERSION: i32 = 140000;

/// The oid of a role by name (`$1`), if it exists.
pub(crate) const ROLE_OID: &str = "SELECT oid FROM pg_roles WHERE rolname = $1";

/// Ends every session of the roles with oids `$1` (an `oid[]`), waiting up to 5 s for each to exit (the timeout
/// argument needs PostgreSQL 14, hence [`MIN_SERVER_VERSION`]). By oid, not name: after `DROP ROLE` a surviving
/// session's `usename` is NULL but its `usesysid` is still the old oid. One query for a whole batch.
pub(crate) const TERMINATE_SESSIONS: &str =
    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity \
     WHERE usesysid = ANY($1) AND pid <> pg_backend_pid()";

/// Ends the client sessions of the roles with oids `$1` (an `oid[]`) that were just dropped: one that was still
/// authenticating when its role was fenced and ended, and registered only after. Only those oids: sessions of
/// roles someone else dropped are not ours to end.
pub(crate) const TERMINATE_DROPPED_SESSIONS: &str =
    "SELECT count(pg_terminate_backend(a.pid, 5000)) FROM pg_stat_activity a \
     WHERE a.backend_type = 'client backend' AND a.usesysid = ANY($1) \
     AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = a.usesysid)";

/// Which of the roles named in `$1` (a `text[]`) still have a session: the sqlx pool's way of knowing that no
/// connection of a retired credential remains (sqlx closes connections without telling its hooks).
#[cfg(feature = "sqlx")]
pub(crate) const ROLES_WITH_SESSIONS: &str = "SELECT DISTINCT usename::text FROM pg_stat_activity \
     WHERE usename = ANY($1)";

/// The id of the current transaction, assigning one: a template that commits or rolls back changes it.
pub(crate) const CURRENT_XID: &str = "SELECT txid_current()";

/// `ALTER ROLE … VALID UNTIL …`: the default renewal.
/// Undoes what a user's template may have `SET` on a pooled admin session (a plain `SET` outlives `COMMIT`):
/// settings go back to the session's defaults, which keep the statement and lock timeouts given at login.
pub(crate) const RESET_SESSION: &str = "RESET ALL; RESET ROLE";

pub(crate) fn set_valid_until(username: &str, expiration: &str) -> String {
    format!(
        "ALTER ROLE {} VALID UNTIL {}",
        escape_identifier(username),
        escape_literal(expiration)
    )
}

/// Which of the roles with oids `$1` own objects or hold privileges anywhere (any database, or shared objects
/// such as databases): those need `REASSIGN OWNED` and `DROP OWNED` before `DROP ROLE`.
pub(crate) const WITH_DEPENDENCIES: &str = "SELECT DISTINCT refobjid FROM pg_shdepend \
     WHERE refclassid = 'pg_authid'::regclass AND refobjid = ANY($1)";

/// The databases other than the current one where the role with oid `$1` owns objects or holds privileges.
/// Objects in the current database and shared objects are handled on the current connection.
pub(crate) const OTHER_DATABASES_WITH_DEPENDENCIES: &str = "SELECT DISTINCT d.datname::text \
     FROM pg_shdepend s JOIN pg_database d ON d.oid = s.dbid \
     WHERE s.refclassid = 'pg_authid'::regclass AND s.refobjid = $1 AND d.datname <> current_database() \
     ORDER BY 1";

/// `ALTER ROLE … NOLOGIN` for each name: fences new logins before sessions are ended. Sent as one simple query,
/// so it runs as one implicit transaction.
pub(crate) fn nologin_all<'a>(usernames: impl IntoIterator<Item = &'a str>) -> String {
    usernames
        .into_iter()
        .map(|u| format!("ALTER ROLE {} NOLOGIN;", escape_identifier(u)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `DROP ROLE a, b, …`: drops roles that own nothing and hold no privileges, in one statement.
pub(crate) fn drop_roles<'a>(usernames: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<String> = usernames.into_iter().map(escape_identifier).collect();
    format!("DROP ROLE {};", names.join(", "))
}

/// `GRANT <role> TO CURRENT_USER`: `REASSIGN OWNED` needs the rights of the role, and an admin with only
/// `CREATEROLE` is not a member of the roles it creates. Committed on its own before the per-database steps, so
/// the connections to other databases see it.
pub(crate) fn grant_to_admin(username: &str) -> String {
    format!("GRANT {} TO CURRENT_USER;", escape_identifier(username))
}

/// Hands what the role owns in the current database to `owner` and drops its remaining privileges there (and on
/// shared objects).
pub(crate) fn reassign_and_drop_owned(username: &str, owner: &str) -> String {
    let name = escape_identifier(username);
    format!(
        "REASSIGN OWNED BY {name} TO {}; DROP OWNED BY {name};",
        escape_identifier(owner)
    )
}

/// `ALTER ROLE … NOLOGIN`: fences new logins before sessions are ended.
pub(crate) fn nologin(username: &str) -> String {
    nologin_all([username])
}

/// Takes the orphan sweep's session-level advisory lock (key: hash of `$1`) if free: one sweep at a time across
/// every instance sharing a marker role.
pub(crate) const TRY_SWEEP_LOCK: &str = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))";

/// Releases [`TRY_SWEEP_LOCK`].
pub(crate) const RELEASE_SWEEP_LOCK: &str = "SELECT pg_advisory_unlock(hashtextextended($1, 0))";

/// Whether role `$1` exists, and whether it may log in or is a superuser (then it cannot be a marker or the admin
/// group).
pub(crate) const MARKER_STATE: &str =
    "SELECT rolcanlogin OR rolsuper FROM pg_roles WHERE rolname = $1";

/// Creates the marker role, with a comment for whoever finds it in the catalog.
pub(crate) fn create_marker(marker: &str) -> String {
    let name = escape_identifier(marker);
    format!(
        "CREATE ROLE {name} NOLOGIN; COMMENT ON ROLE {name} IS {};",
        escape_literal(
            "credbroker: every member of this role is a credential issued by credbroker; \
             the comment on each member records its lease"
        )
    )
}

/// Creates the admin group (see [`admin_group`](crate::admin_group)). `NOINHERIT`: its members
/// administer credentials' roles without taking on their privileges.
pub(crate) fn create_admin_group(group: &str) -> String {
    let name = escape_identifier(group);
    format!(
        "CREATE ROLE {name} NOLOGIN NOINHERIT; COMMENT ON ROLE {name} IS {};",
        escape_literal(
            "credbroker: holds ADMIN OPTION on every credential's role, so that every broker admin who is a \
             member may drop any instance's expired credentials (PostgreSQL 16+)"
        )
    )
}

/// Marks `username` as a credential of this broker, in the creating transaction: membership in the marker role,
/// ADMIN OPTION on it for the admin group (so another instance's admin can drop it on PostgreSQL 16+), and the
/// lease comment.
pub(crate) fn mark(marker: &str, admin_group: &str, username: &str, comment: &str) -> String {
    let user = escape_identifier(username);
    format!(
        "GRANT {} TO {user}; GRANT {user} TO {} WITH ADMIN OPTION; COMMENT ON ROLE {user} IS {};",
        escape_identifier(marker),
        escape_identifier(admin_group),
        escape_literal(comment)
    )
}

/// Takes the marker away from a role the broker gives up on (`revoke_force`), so nothing touches it again.
pub(crate) fn unmark(marker: &str, username: &str) -> String {
    format!(
        "REVOKE {} FROM {};",
        escape_identifier(marker),
        escape_identifier(username)
    )
}

/// Every member of the marker role `$1`: name, `VALID UNTIL` in whole epoch seconds (NULL if unset or
/// infinite), and comment.
pub(crate) const MARKED_ROLES: &str = "SELECT r.rolname::text, \
     CASE WHEN isfinite(r.rolvaliduntil) THEN floor(extract(epoch FROM r.rolvaliduntil))::int8 END, \
     shobj_description(r.oid, 'pg_authid') \
     FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member \
     WHERE m.roleid = (SELECT oid FROM pg_roles WHERE rolname = $1)";

/// The orphan sweep's candidates: the members of the marker role `$1` whose `VALID UNTIL` passed at least `$2` seconds
/// (a `float8`) ago by the server's clock, with the columns of [`MARKED_ROLES`]. The filter runs on the server, so a
/// sweep of a catalog with many live credentials reads and sends only the expired ones (the members come from
/// `pg_auth_members`' index on the marker; see the operator's guide, "A fleet on one server", for the measurements).
pub(crate) const ORPHAN_CANDIDATES: &str = "SELECT r.rolname::text, \
     CASE WHEN isfinite(r.rolvaliduntil) THEN floor(extract(epoch FROM r.rolvaliduntil))::int8 END, \
     shobj_description(r.oid, 'pg_authid') \
     FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member \
     WHERE m.roleid = (SELECT oid FROM pg_roles WHERE rolname = $1) \
     AND r.rolvaliduntil <= now() - make_interval(secs => $2)";

/// The reassign owner `$1`: whether it is a superuser, whether it is the admin, and whether the admin holds
/// privilege `$2` (`MEMBER` or `USAGE`) on it. No row if the role does not exist.
pub(crate) const OWNER_STATE: &str = "SELECT r.rolsuper, r.rolname = current_user, \
     pg_has_role(current_user, r.oid, $2) FROM pg_roles r WHERE r.rolname = $1";

/// Creates the default owner role, with a comment for whoever finds it in the catalog.
pub(crate) fn create_owner(owner: &str) -> String {
    let name = escape_identifier(owner);
    format!(
        "CREATE ROLE {name} NOLOGIN; COMMENT ON ROLE {name} IS {};",
        escape_literal(
            "credbroker: owns what revoked credentials owned (REASSIGN OWNED); has no other rights; \
             review and drop its objects"
        )
    )
}

/// `GRANT owner TO admin` (`CURRENT_USER` if `admin` is `None`), with `INHERIT TRUE` on PostgreSQL 16+ (where
/// `REASSIGN OWNED` needs the privileges of the role, and the creator's automatic membership may lack them).
pub(crate) fn grant_owner_to_admin(
    owner: &str,
    admin: Option<&str>,
    server_version: i32,
) -> String {
    let inherit = if server_version >= 160000 {
        " WITH INHERIT TRUE"
    } else {
        ""
    };
    let admin = admin.map_or_else(|| "CURRENT_USER".to_owned(), escape_identifier);
    format!("GRANT {} TO {admin}{inherit};", escape_identifier(owner))
}

/// A credentials' group `$1` (see [`Role::group`](crate::Role::group)): whether it can log in, whether it is a
/// superuser, whether the admin holds ADMIN OPTION on it, its CREATEROLE, BYPASSRLS and REPLICATION
/// attributes, the roles of `$2` (a `text[]`; the admin itself is added) it is a member of, and the other roles
/// it is a member of that carry SUPERUSER, CREATEROLE, BYPASSRLS or REPLICATION (`SET ROLE` reaches them). No
/// row if the group does not exist.
pub(crate) const GROUP_STATE: &str = "SELECT g.rolcanlogin, g.rolsuper, \
     pg_has_role(current_user, g.oid, 'MEMBER WITH ADMIN OPTION'), \
     g.rolcreaterole, g.rolbypassrls, g.rolreplication, \
     ARRAY(SELECT r.rolname::text FROM pg_roles r \
        WHERE r.oid <> g.oid AND (r.rolname = ANY($2::text[]) OR r.rolname = current_user) \
        AND pg_has_role(g.oid, r.oid, 'MEMBER') ORDER BY 1), \
     ARRAY(SELECT r.rolname::text FROM pg_roles r \
        WHERE r.oid <> g.oid AND (r.rolsuper OR r.rolcreaterole OR r.rolbypassrls OR r.rolreplication) \
        AND pg_has_role(g.oid, r.oid, 'MEMBER') ORDER BY 1) \
     FROM pg_roles g WHERE g.rolname = $1";

/// Predefined roles that read or write the server's files or run programs on it: no credentials' group may
/// be a member of them.
pub(crate) const SERVER_ACCESS_ROLES: [&str; 3] = [
    "pg_execute_server_program",
    "pg_read_server_files",
    "pg_write_server_files",
];

/// Whether `CREATE ROLE` failed because the role exists: 42710, or 23505 (a unique violation on
/// `pg_authid`) when it waited on another session's uncommitted `CREATE ROLE` of the same name that then
/// committed.
pub(crate) fn is_duplicate_role(err: &postgres::Error) -> bool {
    use postgres::error::SqlState;
    matches!(err.code(), Some(c) if *c == SqlState::DUPLICATE_OBJECT || *c == SqlState::UNIQUE_VIOLATION)
}

/// Creates a credentials' group, with a comment for whoever finds it in the catalog.
pub(crate) fn create_group(group: &str) -> String {
    let name = escape_identifier(group);
    format!(
        "CREATE ROLE {name} NOLOGIN; COMMENT ON ROLE {name} IS {};",
        escape_literal(
            "credbroker: the stable identity of a broker role; each credential is a login member that acts as \
             this role (SET role at login)"
        )
    )
}

/// Makes credential `username` a member of `group` that starts every session as the group: `SET ROLE` at login
/// (the per-role `role` setting), so `current_user` is the group and what the session creates belongs to it.
/// The membership takes the defaults on every version: inheritance as the role's `INHERIT` attribute says (on
/// by default, so a session that runs `RESET ROLE` keeps the group's privileges), and on PostgreSQL 16+ the SET
/// option, which `SET ROLE` needs.
pub(crate) fn join_group(group: &str, username: &str) -> String {
    let user = escape_identifier(username);
    format!(
        "GRANT {} TO {user}; ALTER ROLE {user} SET role = {};",
        escape_identifier(group),
        escape_literal(group)
    )
}

/// The server's clock: every comparison with a catalog timestamp (`VALID UNTIL`, the lease comment's max) is
/// made against it, not this process's clock, which may be skewed from the server's and other instances'.
pub(crate) const SERVER_NOW: &str = "SELECT now()";

/// Whether the admin is a member of role `$1` (`NULL`: no such role).
pub(crate) const IS_MEMBER_OF: &str =
    "SELECT pg_has_role(current_user, r.oid, 'MEMBER') FROM pg_roles r WHERE r.rolname = $1";

/// Whether the admin holds ADMIN OPTION on role `$1` (PostgreSQL 16+ needs it to grant the role).
pub(crate) const HAS_ADMIN_OPTION: &str =
    "SELECT pg_has_role(current_user, r.oid, 'MEMBER WITH ADMIN OPTION') FROM pg_roles r WHERE r.rolname = $1";

/// Databases that accept connections but not from the admin.
pub(crate) const DATABASES_WITHOUT_CONNECT: &str = "SELECT datname::text FROM pg_database \
     WHERE datallowconn AND NOT has_database_privilege(datname, 'CONNECT') ORDER BY 1";

/// Names as a list of SQL literals, for `IN (…)`.
fn literals<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = names.into_iter().map(escape_literal).collect();
    quoted.join(", ")
}

/// Oids as a list for `IN (…)`: numbers, nothing to quote.
fn oid_list(oids: &[u32]) -> String {
    let numbers: Vec<String> = oids.iter().map(u32::to_string).collect();
    numbers.join(", ")
}

/// The server's identity for failover detection: the system identifier, and the current timeline as the first 8
/// hex digits of the current WAL file's name (NULL on a standby, which has no current WAL). Not
/// `pg_control_checkpoint().timeline_id`: it keeps the old timeline on a just-promoted primary until the first
/// checkpoint after promotion completes.
pub(crate) const SERVER_IDENTITY: &str = "SELECT system_identifier::text, CASE WHEN pg_is_in_recovery() \
     THEN NULL ELSE substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8) END FROM pg_control_system()";

/// The roles among `$1` that exist, with their `VALID UNTIL` in Unix seconds (NULL if none or infinite).
pub(crate) const ROLES_VALID_UNTIL: &str =
    "SELECT rolname::text, CASE WHEN isfinite(rolvaliduntil) \
     THEN extract(epoch FROM rolvaliduntil)::bigint END FROM pg_roles WHERE rolname = ANY($1)";

/// The roles among `names` that exist: name and oid (simple query, one round trip: no statement to prepare).
pub(crate) fn existing_roles<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    format!(
        "SELECT rolname::text, oid::text FROM pg_roles WHERE rolname IN ({})",
        literals(names)
    )
}

/// The tag on the rows of [`fence_batch`] that name a role with dependencies.
pub(crate) const DEPENDENT_TAG: &str = "dependent";

/// One round trip for a batch: commit `NOLOGIN` for every role, then (if `terminate`) end their sessions,
/// waiting for each, then list (tagged [`DEPENDENT_TAG`]) the oids of those that own objects or hold
/// privileges anywhere. In that order: until the sessions are gone they could still create objects.
pub(crate) fn fence_batch<'a>(
    names: impl IntoIterator<Item = &'a str>,
    oids: &[u32],
    terminate: bool,
) -> String {
    let oids = oid_list(oids);
    let end_sessions = if terminate {
        format!(
            "SELECT 'ended', count(pg_terminate_backend(pid, 5000))::text FROM pg_stat_activity \
             WHERE usesysid IN ({oids}) AND pid <> pg_backend_pid();"
        )
    } else {
        String::new()
    };
    format!(
        "BEGIN; {} COMMIT; {end_sessions} SELECT DISTINCT '{DEPENDENT_TAG}', refobjid::text FROM pg_shdepend \
         WHERE refclassid = 'pg_authid'::regclass AND refobjid IN ({oids});",
        nologin_all(names)
    )
}

/// One round trip: drop the roles (one statement), then, if `terminate`, end the client sessions of those
/// roles (`oids`) that registered after they were fenced, as [`TERMINATE_DROPPED_SESSIONS`] does.
pub(crate) fn drop_batch<'a>(
    names: impl IntoIterator<Item = &'a str>,
    oids: &[u32],
    terminate: bool,
) -> String {
    let drop = drop_roles(names);
    if terminate {
        format!(
            "{drop} SELECT count(pg_terminate_backend(a.pid, 5000)) FROM pg_stat_activity a \
             WHERE a.backend_type = 'client backend' AND a.usesysid IN ({}) \
             AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = a.usesysid);",
            oid_list(oids)
        )
    } else {
        drop
    }
}
