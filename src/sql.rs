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

/// Ends every session of the role with oid `$1`, waiting up to 5 s for each to exit (the timeout argument needs
/// PostgreSQL 14, hence [`MIN_SERVER_VERSION`]). By oid, not name: after `DROP ROLE` a surviving session's
/// `usename` is NULL but its `usesysid` is still the old oid.
pub(crate) const TERMINATE_SESSIONS: &str =
    "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity \
     WHERE usesysid = $1 AND pid <> pg_backend_pid()";

/// Ends every client session whose role no longer exists: one that was still authenticating when its role was
/// fenced and ended, and registered only after. Run after each drop, it also ends stragglers of earlier ones.
pub(crate) const TERMINATE_ORPHAN_SESSIONS: &str =
    "SELECT count(pg_terminate_backend(a.pid, 5000)) \
     FROM pg_stat_activity a WHERE a.backend_type = 'client backend' AND a.usesysid IS NOT NULL \
     AND NOT EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = a.usesysid)";

/// The id of the current transaction, assigning one: a template that commits or rolls back changes it.
pub(crate) const CURRENT_XID: &str = "SELECT txid_current()";

/// `ALTER ROLE … VALID UNTIL …`: the default renewal.
pub(crate) fn set_valid_until(username: &str, expiration: &str) -> String {
    format!(
        "ALTER ROLE {} VALID UNTIL {}",
        escape_identifier(username),
        escape_literal(expiration)
    )
}

/// `ALTER ROLE … NOLOGIN`: fences new logins before sessions are ended.
pub(crate) fn nologin(username: &str) -> String {
    format!("ALTER ROLE {} NOLOGIN", escape_identifier(username))
}

/// Whether the role with oid `$1` owns objects or holds privileges in the current database (or on shared
/// objects such as databases): then it needs `REASSIGN OWNED` and `DROP OWNED` before `DROP ROLE`.
pub(crate) const HAS_DEPENDENCIES: &str = "SELECT EXISTS (SELECT 1 FROM pg_shdepend WHERE refclassid = 'pg_authid'::regclass \
     AND refobjid = $1 AND dbid IN (0, (SELECT oid FROM pg_database WHERE datname = current_database())))";

/// `DROP ROLE …`: the default revocation of a role that owns nothing and holds no privileges.
pub(crate) fn drop_role(username: &str) -> String {
    format!("DROP ROLE {};", escape_identifier(username))
}

/// The default revocation of a role with dependencies, in one transaction after its sessions are gone: become a
/// member (`REASSIGN OWNED` needs the rights of both roles, and a CREATEROLE admin is not a member of the roles it
/// creates), hand what the role owns to the admin, drop its remaining privileges, drop the role.
pub(crate) fn drop_role_and_owned(username: &str) -> String {
    let name = escape_identifier(username);
    format!(
        "GRANT {name} TO CURRENT_USER; REASSIGN OWNED BY {name} TO CURRENT_USER; DROP OWNED BY {name}; DROP ROLE {name};"
    )
}
