//! Roles: named recipes for the PostgreSQL login roles the broker creates.

use std::time::{Duration, SystemTime};

use postgres::Client;
use zeroize::Zeroizing;

use crate::credential::{
    generate_password, generate_username, scram_verifier, DEFAULT_SCRAM_ITERATIONS,
    MAX_USERNAME_LEN,
};
use crate::drop_role::{revoke_role, RevokeSettings};
use crate::error::{Error, ErrorKind};
use crate::lease::{pg_timestamp, LeasePolicy};
use crate::password::PasswordPolicy;
use crate::sql;
use crate::template::{Placeholder, Template, Values};
use crate::username::UsernameTemplate;

/// The creation SQL of [`Role::new`]: a login role with the password and expiry, and nothing else.
///
/// # Examples
///
/// A role that grants more starts from this statement and adds to it:
///
/// ```
/// use credbroker::{Role, DEFAULT_CREATION_SQL};
///
/// let reader = Role::new().creation_sql(format!(
///     r#"{DEFAULT_CREATION_SQL} GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{{{name}}}}";"#
/// ));
/// assert!(reader.get_creation_sql().starts_with("CREATE ROLE"));
/// assert_eq!(Role::new().get_creation_sql(), DEFAULT_CREATION_SQL);
/// ```
pub const DEFAULT_CREATION_SQL: &str =
    r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"#;

/// The longest role name [`Broker::write_role`](crate::Broker::write_role) accepts.
///
/// # Examples
///
/// Checking a role name that comes from configuration before handing it to the broker:
///
/// ```
/// use credbroker::MAX_ROLE_NAME_LEN;
///
/// fn usable(name: &str) -> bool {
///     (1..=MAX_ROLE_NAME_LEN).contains(&name.len())
///         && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
/// }
/// assert!(usable("orders-readonly"));
/// assert!(!usable(&"x".repeat(MAX_ROLE_NAME_LEN + 1)));
/// ```
pub const MAX_ROLE_NAME_LEN: usize = 32;

/// A role definition: how to create, renew and revoke the PostgreSQL login role behind each credential.
///
/// A role is built by value: each setter takes it and returns it changed. Its getters are named `get_*`
/// ([`get_group`](Role::get_group) beside the setter [`group`](Role::group)) because the setters hold the plain
/// names, as [`std::process::Command`] has `arg` and `get_args`; the names are part of the API and stay.
///
/// Templates are checked when the role is written: placeholders by the parser, the SQL by PostgreSQL (run once
/// in a transaction with sample values, then rolled back).
///
/// # Examples
///
/// ```
/// use credbroker::Role;
/// use std::time::Duration;
///
/// let readonly = Role::new()
///     .creation_sql(r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
///                      GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{name}}";"#)
///     .lease(Duration::from_secs(600), Duration::from_secs(3600));
/// assert!(readonly.get_revocation_sql().is_none());
/// ```
///
/// Writing it to a broker checks it against the server; from then on, credentials of the role can be issued:
///
/// ```no_run
/// # use credbroker::Role;
/// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
/// # let readonly = Role::new();
/// broker.write_role("readonly", readonly)?;
/// let creds = broker.creds("readonly")?;
/// # Ok::<(), credbroker::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a Role is built by value: each setter returns the changed role"]
pub struct Role {
    creation_sql: String,
    revocation_sql: Option<String>,
    renew_sql: Option<String>,
    lease: Option<(Duration, Duration)>,
    group: Option<String>,
    username_template: Option<String>,
    password_policy: Option<PasswordPolicy>,
    max_leases: Option<u32>,
}

impl Default for Role {
    fn default() -> Role {
        Role::new()
    }
}

impl Role {
    /// A role whose credentials are plain login roles with a password and `VALID UNTIL`, no other privileges,
    /// revoked by the broker's default revocation, with the broker's lease durations.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{Role, DEFAULT_CREATION_SQL};
    ///
    /// let role = Role::new();
    /// assert_eq!(role.get_creation_sql(), DEFAULT_CREATION_SQL);
    /// assert_eq!(role.get_lease(), None); // the broker's durations
    /// assert_eq!(role, Role::default());
    /// ```
    pub fn new() -> Role {
        Role {
            creation_sql: DEFAULT_CREATION_SQL.to_owned(),
            revocation_sql: None,
            renew_sql: None,
            lease: None,
            group: None,
            username_template: None,
            password_policy: None,
            max_leases: None,
        }
    }

    /// Sets the SQL that creates a credential's role. It runs in one transaction; it must use `{{name}}`
    /// (or `{{username}}`) and may use `{{password}}` (a SCRAM-SHA-256 verifier, to be placed inside `'...'`)
    /// and `{{expiration}}` (a UTC timestamp with offset, inside `'...'`).
    ///
    /// # Examples
    ///
    /// A credential that may read every table of schema `public`:
    ///
    /// ```
    /// use credbroker::Role;
    ///
    /// let reader = Role::new().creation_sql(
    ///     r#"CREATE ROLE "{{name}}" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';
    ///        GRANT USAGE ON SCHEMA public TO "{{name}}";
    ///        GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{{name}}";"#,
    /// );
    /// assert!(reader.get_creation_sql().contains("GRANT SELECT"));
    /// ```
    pub fn creation_sql(mut self, sql: impl Into<String>) -> Role {
        self.creation_sql = sql.into();
        self
    }

    /// Sets the SQL that revokes a credential, run in one transaction after the broker has set the role
    /// `NOLOGIN` and ended its sessions. It may use only `{{name}}`, and must leave the role dropped. Without
    /// it, the broker's default revocation runs: `REASSIGN OWNED` to the owner role
    /// ([`BrokerBuilder::reassign_owned_to`](crate::BrokerBuilder::reassign_owned_to), by default
    /// [`DEFAULT_OWNER_ROLE`](crate::DEFAULT_OWNER_ROLE)), `DROP OWNED`, `DROP ROLE`.
    ///
    /// # Examples
    ///
    /// A credential whose objects go to a team role instead of the broker's owner role:
    ///
    /// ```
    /// use credbroker::Role;
    ///
    /// let role = Role::new().revocation_sql(
    ///     r#"REASSIGN OWNED BY "{{name}}" TO reporting; DROP OWNED BY "{{name}}"; DROP ROLE "{{name}}";"#,
    /// );
    /// assert!(role.get_revocation_sql().is_some());
    /// ```
    pub fn revocation_sql(mut self, sql: impl Into<String>) -> Role {
        self.revocation_sql = Some(sql.into());
        self
    }

    /// Sets the SQL that renews a credential; it may use `{{name}}` and `{{expiration}}`. Without it, the
    /// broker runs `ALTER ROLE ... VALID UNTIL`.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::Role;
    ///
    /// let role = Role::new().renew_sql(
    ///     r#"ALTER ROLE "{{name}}" VALID UNTIL '{{expiration}}'; ALTER ROLE "{{name}}" CONNECTION LIMIT 5;"#,
    /// );
    /// assert!(role.get_renew_sql().unwrap().contains("CONNECTION LIMIT"));
    /// ```
    pub fn renew_sql(mut self, sql: impl Into<String>) -> Role {
        self.renew_sql = Some(sql.into());
        self
    }

    /// Overrides the broker's lease durations for this role: the lease a credential gets (and a renewal without
    /// an increment adds), and the longest a lease may live from its issue, renewals included.
    ///
    /// The max may not exceed the broker's ([`BrokerBuilder::lease`](crate::BrokerBuilder::lease)):
    /// [`Broker::write_role`](crate::Broker::write_role) refuses such a role with
    /// [`ErrorKind::InvalidConfig`].
    ///
    /// # Examples
    ///
    /// Short leases for a batch job, renewable up to two hours:
    ///
    /// ```
    /// use credbroker::Role;
    /// use std::time::Duration;
    ///
    /// let batch = Role::new().lease(Duration::from_secs(15 * 60), Duration::from_secs(2 * 3600));
    /// assert_eq!(batch.get_lease(), Some((Duration::from_secs(900), Duration::from_secs(7200))));
    /// ```
    pub fn lease(mut self, default: Duration, max: Duration) -> Role {
        self.lease = Some((default, max));
        self
    }

    /// Makes every credential of this role act as the stable group role `group`: each is created a member of
    /// the group (`GRANT group TO credential`) with `ALTER ROLE credential SET role = 'group'`, so its sessions
    /// start as the group: `current_user` is the group, objects it creates are owned by the group and survive
    /// its revocation, and row-level-security policies, grants and `pg_hba.conf` `+group` lines name the group.
    /// Each credential is still a login role of its own, with its own password and expiry.
    ///
    /// At [`Broker::write_role`](crate::Broker::write_role) the group is created `NOLOGIN` if it does not exist;
    /// one that can log in or is a superuser is refused, as are the broker's own roles (the marker, the admin
    /// group, the reassign owner). The admin needs the right to grant the group (superuser, `CREATEROLE` on
    /// PostgreSQL 14–15, ADMIN OPTION on the group on 16+, which the admin has if it created the group).
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::Role;
    ///
    /// let orders = Role::new().group("orders");
    /// assert_eq!(orders.get_group(), Some("orders"));
    /// ```
    pub fn group(mut self, group: impl Into<String>) -> Role {
        self.group = Some(group.into());
        self
    }

    /// The group role the credentials act as, if one was set with [`Role::group`].
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::Role;
    ///
    /// assert_eq!(Role::new().get_group(), None);
    /// assert_eq!(Role::new().group("orders").get_group(), Some("orders"));
    /// ```
    #[must_use]
    pub fn get_group(&self) -> Option<&str> {
        self.group.as_deref()
    }

    /// Names the credentials with a template instead of the default `<role>-<unix time>-<16 random>`: fields
    /// `{{role}}`, `{{instance}}`, `{{unix_time}}`, `{{random N}}` (N ≥ 13), and filters `truncate N`,
    /// `lowercase` and `replace "a" "b"`; see [the syntax](crate::username). Checked at
    /// [`Broker::write_role`](crate::Broker::write_role): names must fit 63 bytes for this role and the broker's
    /// instance name, and keep a random part of at least 64 bits.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::Role;
    ///
    /// let role = Role::new().username_template(r#"app-{{instance | replace "/" "-" | truncate 20}}-{{random 16}}"#);
    /// ```
    pub fn username_template(mut self, template: impl Into<String>) -> Role {
        self.username_template = Some(template.into());
        self
    }

    /// Generates the credentials' passwords under `policy` instead of the default (32 characters of
    /// `[A-Za-z0-9-]`). Checked at [`Broker::write_role`](crate::Broker::write_role): under 128 bits of entropy,
    /// the role is refused.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{PasswordPolicy, Role};
    ///
    /// let role = Role::new().password_policy(
    ///     PasswordPolicy::new(30).charset("abcdefghijklmnopqrstuvwxyz", 1).charset("0123456789!#%", 2),
    /// );
    /// ```
    pub fn password_policy(mut self, policy: PasswordPolicy) -> Role {
        self.password_policy = Some(policy);
        self
    }

    /// The username template, if one was set with [`Role::username_template`].
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::Role;
    ///
    /// let role = Role::new().username_template("svc-{{role}}-{{random 16}}");
    /// assert_eq!(role.get_username_template(), Some("svc-{{role}}-{{random 16}}"));
    /// assert_eq!(Role::new().get_username_template(), None); // <role>-<unix time>-<16 random>
    /// ```
    #[must_use]
    pub fn get_username_template(&self) -> Option<&str> {
        self.username_template.as_deref()
    }

    /// The password policy, if one was set with [`Role::password_policy`].
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::{PasswordPolicy, Role};
    ///
    /// let role = Role::new().password_policy(PasswordPolicy::new(40).charset("abcdefghijklmnopqrstuvwxyz", 0));
    /// assert_eq!(role.get_password_policy().map(PasswordPolicy::length), Some(40));
    /// assert!(Role::new().get_password_policy().is_none()); // 32 characters of [A-Za-z0-9-]
    /// ```
    #[must_use]
    pub fn get_password_policy(&self) -> Option<&PasswordPolicy> {
        self.password_policy.as_ref()
    }

    /// Caps this role's leases in the lease table (at least 1; default: no cap but the broker's
    /// [`max_leases`](crate::BrokerBuilder::max_leases)). Once `n` leases of the role are issued and not yet
    /// dropped, [`creds`](crate::Broker::creds) fails with [`ErrorKind::LeaseCap`] and creates nothing. A
    /// pool ([`RolePool`](crate::RolePool), sqlx, deadpool) holds two leases of its role for a moment while it
    /// rotates, so opening one for a role capped below 2 is refused. A rotation that meets the cap (other
    /// leases of the role fill it) is retried with backoff, and the pool's lease may end meanwhile: leave room.
    ///
    /// # Examples
    ///
    /// ```
    /// let role = credbroker::Role::new().max_leases(100);
    /// assert_eq!(role.get_max_leases(), Some(100));
    /// ```
    ///
    /// What a caller sees once the cap is reached:
    ///
    /// ```no_run
    /// use credbroker::{ErrorKind, Role};
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// broker.write_role("reports", Role::new().max_leases(100))?;
    /// match broker.creds("reports") {
    ///     Ok(creds) => println!("log in as {}", creds.username()),
    ///     Err(e) if e.kind() == ErrorKind::LeaseCap => eprintln!("too many reports running; try later: {e}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    pub fn max_leases(mut self, n: u32) -> Role {
        self.max_leases = Some(n);
        self
    }

    /// The role's cap on live leases, if it has one (set with [`Role::max_leases`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::Role;
    ///
    /// assert_eq!(Role::new().get_max_leases(), None);
    /// assert_eq!(Role::new().max_leases(5).get_max_leases(), Some(5));
    /// ```
    #[must_use]
    pub fn get_max_leases(&self) -> Option<u32> {
        self.max_leases
    }

    /// The creation SQL template.
    ///
    /// # Examples
    ///
    /// Reading back a role the broker holds:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// if let Some(role) = broker.role("readonly") {
    ///     println!("readonly creates its credentials with: {}", role.get_creation_sql());
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn get_creation_sql(&self) -> &str {
        &self.creation_sql
    }

    /// The revocation SQL template, if one was set with [`Role::revocation_sql`].
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::Role;
    ///
    /// assert_eq!(Role::new().get_revocation_sql(), None); // the broker's default revocation
    /// let role = Role::new().revocation_sql(r#"DROP OWNED BY "{{name}}"; DROP ROLE "{{name}}";"#);
    /// assert_eq!(role.get_revocation_sql(), Some(r#"DROP OWNED BY "{{name}}"; DROP ROLE "{{name}}";"#));
    /// ```
    #[must_use]
    pub fn get_revocation_sql(&self) -> Option<&str> {
        self.revocation_sql.as_deref()
    }

    /// The renew SQL template, if one was set with [`Role::renew_sql`].
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::Role;
    ///
    /// assert_eq!(Role::new().get_renew_sql(), None); // ALTER ROLE ... VALID UNTIL
    /// ```
    #[must_use]
    pub fn get_renew_sql(&self) -> Option<&str> {
        self.renew_sql.as_deref()
    }

    /// The role's own `(default, max)` lease durations, if it overrides the broker's (set with
    /// [`Role::lease`]).
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::Role;
    /// use std::time::Duration;
    ///
    /// let hour = Duration::from_secs(3600);
    /// assert_eq!(Role::new().get_lease(), None);
    /// assert_eq!(Role::new().lease(hour, 8 * hour).get_lease(), Some((hour, 8 * hour)));
    /// ```
    #[must_use]
    pub fn get_lease(&self) -> Option<(Duration, Duration)> {
        self.lease
    }
}

/// A role whose templates are parsed and whose lease policy is resolved against the broker's.
#[derive(Debug)]
pub(crate) struct CompiledRole {
    pub name: String,
    pub role: Role,
    pub creation: Template,
    pub revocation: Option<Template>,
    pub renew: Option<Template>,
    pub policy: LeasePolicy,
    username: Option<UsernameTemplate>,
}

impl CompiledRole {
    /// Checks the name and templates of `role` and resolves its lease durations within `broker_policy`.
    pub(crate) fn compile(
        name: &str,
        role: Role,
        broker_policy: LeasePolicy,
    ) -> Result<CompiledRole, Error> {
        check_role_name(name)?;
        if let Some(group) = &role.group {
            if group.is_empty() || group.len() > MAX_USERNAME_LEN || group.contains('\0') {
                return Err(Error::new(
                    ErrorKind::InvalidConfig,
                    format!(
                        "role {name:?}: group {group:?} must be 1–63 bytes long (PostgreSQL's limit for role \
                         names), without NUL"
                    ),
                ));
            }
        }
        let username = match &role.username_template {
            Some(source) => Some(UsernameTemplate::parse(source)?),
            None => None,
        };
        if let Some(policy) = &role.password_policy {
            policy.check(name)?;
        }
        if role.max_leases == Some(0) {
            return Err(Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "role {name:?}: max_leases is 0; give at least 1, or leave it unset for no cap"
                ),
            ));
        }
        use Placeholder::*;
        let creation = Template::parse(
            "creation SQL",
            &role.creation_sql,
            &[Name, Password, Expiration],
            &[Name],
        )?;
        let revocation = match &role.revocation_sql {
            Some(sql) => Some(Template::parse("revocation SQL", sql, &[Name], &[Name])?),
            None => None,
        };
        let renew = match &role.renew_sql {
            Some(sql) => Some(Template::parse(
                "renew SQL",
                sql,
                &[Name, Expiration],
                &[Name],
            )?),
            None => None,
        };
        let policy = match role.lease {
            None => broker_policy,
            Some((default, max)) => {
                let policy = LeasePolicy::new(default, max)?;
                if max > broker_policy.max {
                    return Err(Error::new(
                        ErrorKind::InvalidConfig,
                        format!(
                            "role {name:?}: its max lease ({}s) exceeds the broker's max lease ({}s); \
                             lower the role's max or raise the broker's with BrokerBuilder::lease",
                            max.as_secs(),
                            broker_policy.max.as_secs()
                        ),
                    ));
                }
                policy
            }
        };
        Ok(CompiledRole {
            name: name.to_owned(),
            role,
            creation,
            revocation,
            renew,
            policy,
            username,
        })
    }

    /// Checks what depends on the broker's instance name: that the username template's names fit.
    pub(crate) fn check_for_instance(&self, instance: &str) -> Result<(), Error> {
        match (&self.username, &self.role.username_template) {
            (Some(template), Some(source)) => template.check(source, &self.name, instance),
            _ => Ok(()),
        }
    }

    /// A fresh username for a credential of this role issued by instance `instance` at `now`.
    pub(crate) fn new_username(&self, instance: &str, now: SystemTime) -> Result<String, Error> {
        match &self.username {
            Some(template) => template.generate(&self.name, instance, now),
            None => generate_username(&self.name, now),
        }
    }

    /// A fresh password for a credential of this role.
    pub(crate) fn new_password(&self) -> Result<Zeroizing<String>, Error> {
        match &self.role.password_policy {
            Some(policy) => policy.generate(),
            None => generate_password(),
        }
    }
}

impl CompiledRole {
    /// Runs the role's templates with sample values in a transaction that is rolled back, so SQL errors show
    /// when the role is written, not at the first `creds`. Also refuses a creation SQL that ends the transaction
    /// itself or creates a role of another name, and a revocation SQL that leaves the role in place.
    /// `group_exists` says whether the role's group (if it has one) exists already; if not, it is created in the
    /// rolled-back transaction for the trial.
    ///
    /// If another session creates the group during the trial, the trial runs once more, in a new transaction
    /// that sees that group; `ensure_credentials_group` then checks it as an existing one.
    pub(crate) fn try_on_server(
        &self,
        client: &mut Client,
        settings: &RevokeSettings,
        instance: &str,
        group_exists: bool,
    ) -> Result<(), Error> {
        match self.trial(client, settings, instance, group_exists)? {
            Trial::Done => Ok(()),
            Trial::GroupCreatedMeanwhile => {
                match self.trial(client, settings, instance, true)? {
                    Trial::Done => Ok(()),
                    // Unreachable: with `true` the trial creates no group.
                    Trial::GroupCreatedMeanwhile => Err(Error::new(
                        ErrorKind::Database,
                        format!(
                            "could not check role {:?}: its group kept changing; write it again",
                            self.name
                        ),
                    )),
                }
            }
        }
    }

    fn trial(
        &self,
        client: &mut Client,
        settings: &RevokeSettings,
        instance: &str,
        group_exists: bool,
    ) -> Result<Trial, Error> {
        let database = |e: postgres::Error| {
            let context = format!("could not check role {:?}", self.name);
            Error::postgres(ErrorKind::Database, context, e, &[])
        };
        let refuse = |what: String| {
            let message = format!("the {what} of role {:?}", self.name);
            Error::new(ErrorKind::TemplateRejected, message)
        };
        let username = self.new_username(instance, SystemTime::now())?;
        let password = self.new_password()?;
        let verifier = scram_verifier(&password, DEFAULT_SCRAM_ITERATIONS)?;
        let (_, expires, _) = self.policy.issue(SystemTime::now());
        let expiration = pg_timestamp(expires);
        let values = Values {
            name: &username,
            password: &verifier,
            expiration: &expiration,
        };
        let run = |tx: &mut postgres::Transaction<'_>, what: &str, sql: &str, secrets: &[&str]| {
            tx.batch_execute(sql).map_err(|e| {
                let context = format!(
                    "PostgreSQL rejected the {what} of role {:?} (tried with sample values and rolled back); \
                     fix the SQL",
                    self.name
                );
                Error::postgres(ErrorKind::TemplateRejected, context, e, secrets)
            })
        };
        let role_exists = |tx: &mut postgres::Transaction<'_>| -> Result<bool, Error> {
            Ok(tx
                .query_opt(sql::ROLE_OID, &[&username])
                .map_err(database)?
                .is_some())
        };

        let mut tx = client.transaction().map_err(database)?;
        let xid: i64 = tx
            .query_one(sql::CURRENT_XID, &[])
            .map_err(database)?
            .get(0);
        let creation = Zeroizing::new(self.creation.render(&values));
        run(&mut tx, "creation SQL", &creation, &[&verifier, &password])?;
        let xid_after: i64 = tx
            .query_one(sql::CURRENT_XID, &[])
            .map_err(database)?
            .get(0);
        if xid_after != xid {
            drop(tx);
            // The template committed: the sample role may exist for real. Remove it before refusing.
            if let Err(e) = revoke_role(client, settings, &username, self.revocation.as_ref()) {
                log::error!(
                    "could not remove sample role {username} left by a committing template: {e}"
                );
            }
            return Err(refuse(
                "creation SQL ends the transaction (COMMIT, ROLLBACK or END); remove those statements: \
                 the broker runs the SQL in its own transaction"
                    .into(),
            ));
        }
        if !role_exists(&mut tx)? {
            return Err(refuse(format!(
                "creation SQL did not create a role named {{{{name}}}}; create exactly that role, e.g. {}",
                DEFAULT_CREATION_SQL
            )));
        }
        if let Some(group) = &self.role.group {
            if !group_exists {
                // If another instance creates the group at this moment, ours fails (42710, or 23505 when we
                // waited on its uncommitted row): this transaction may not see theirs, so start over.
                match tx.batch_execute(&sql::create_group(group)) {
                    Ok(()) => {}
                    Err(e) if sql::is_duplicate_role(&e) => {
                        drop(tx);
                        return Ok(Trial::GroupCreatedMeanwhile);
                    }
                    Err(e) => return Err(database(e)),
                }
            }
            tx.batch_execute(&sql::join_group(group, &username))
                .map_err(|e| {
                    let context = format!(
                        "could not make a credential of role {:?} a member of its group {group:?}",
                        self.name
                    );
                    Error::postgres(ErrorKind::Permission, context, e, &[])
                })?;
        }
        if let Some(renew) = &self.renew {
            run(&mut tx, "renew SQL", &renew.render(&values), &[])?;
        }
        if let Some(revocation) = &self.revocation {
            run(&mut tx, "revocation SQL", &revocation.render(&values), &[])?;
            if role_exists(&mut tx)? {
                return Err(refuse(
                    "revocation SQL does not drop the role; include DROP ROLE \"{{name}}\"".into(),
                ));
            }
        }
        tx.rollback().map_err(database)?;
        Ok(Trial::Done)
    }
}

/// How a trial of a role's templates ended, when no error.
enum Trial {
    Done,
    /// Another session created the role's group while the trial tried to: run it again.
    GroupCreatedMeanwhile,
}

/// Role names are 1–32 characters of `[A-Za-z0-9_-]`: they become part of usernames and lease ids.
pub(crate) fn check_role_name(name: &str) -> Result<(), Error> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if name.is_empty() || name.len() > MAX_ROLE_NAME_LEN || !ok_chars {
        return Err(Error::new(
            ErrorKind::InvalidRoleName,
            format!(
                "invalid role name {name:?}: use 1 to {MAX_ROLE_NAME_LEN} characters of A-Z, a-z, 0-9, '_' and '-'"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> LeasePolicy {
        LeasePolicy::new(Duration::from_secs(3600), Duration::from_secs(86400)).unwrap()
    }

    #[test]
    fn role_names_are_checked() {
        for good in ["production", "a", "Read_Only-2", &"x".repeat(32)] {
            assert!(check_role_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "has space",
            "semi;colon",
            "quote\"",
            "ünïcode",
            "dot.name",
            &"x".repeat(33),
        ] {
            let err = check_role_name(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidRoleName, "{bad}");
        }
    }

    #[test]
    fn default_role_compiles() {
        let compiled = CompiledRole::compile("production", Role::new(), policy()).unwrap();
        assert!(compiled.revocation.is_none());
        assert_eq!(compiled.policy, policy());
    }

    #[test]
    fn role_lease_beyond_broker_max_is_refused() {
        let role = Role::new().lease(Duration::from_secs(60), Duration::from_secs(2 * 86400));
        let err = CompiledRole::compile("r", role, policy()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(
            err.to_string().contains("exceeds the broker's max lease"),
            "{err}"
        );
    }

    #[test]
    fn creation_sql_without_name_is_refused() {
        let role = Role::new().creation_sql("CREATE ROLE fixed LOGIN");
        let err = CompiledRole::compile("r", role, policy()).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
    }
}
