//! Recovery: a crashed process's roles are dropped or adopted by the next start, a dead instance's expired
//! roles are dropped by the living, and shutdown keeps or revokes as asked.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, SystemTime};

use credbroker::testing::TestPostgres;
use credbroker::{Broker, BrokerBuilder, RecoveryMode, Role, ShutdownMode};

/// Set for the child process of the crash test: the connection string it issues credentials on.
const CHILD_CONNECTION: &str = "CREDBROKER_CRASH_CHILD_CONNECTION";

fn builder(pg: &TestPostgres, instance: &str) -> BrokerBuilder {
    Broker::builder()
        .connection(pg.connection_string())
        .instance_name(instance)
}

fn roles(broker: &Broker) {
    // The child aborts well within a second of issuing, before even a short lease ends.
    let short = Role::new().lease(Duration::from_secs(2), Duration::from_secs(2));
    let long = Role::new().lease(Duration::from_secs(8), Duration::from_secs(30));
    broker.write_role("short", short).unwrap();
    broker.write_role("long", long).unwrap();
}

/// The child of [`a_crashed_instances_roles_are_dropped_or_adopted_at_the_next_start`]: issues credentials,
/// prints them, and aborts without any cleanup.
#[test]
#[ignore = "run as a child process by the crash test"]
fn crash_child() {
    let connection = std::env::var(CHILD_CONNECTION).expect("run by the crash test");
    let broker = Broker::builder()
        .connection(connection)
        .instance_name("crashy")
        .build()
        .unwrap();
    roles(&broker);
    for role in ["short", "short", "short", "long", "long", "long"] {
        let creds = broker.creds(role).unwrap();
        println!("LEASE {role} {} {}", creds.lease_id(), creds.username());
    }
    std::process::abort();
}

#[test]
fn a_crashed_instances_roles_are_dropped_or_adopted_at_the_next_start() {
    let pg = TestPostgres::start().unwrap();
    // A role with a credential-like name but no marker: recovery must never touch it, expired as it is.
    pg.admin_client()
        .unwrap()
        .batch_execute(r#"CREATE ROLE "short-1-unmarked" LOGIN VALID UNTIL '2000-01-01'"#)
        .unwrap();
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_CONNECTION, pg.connection_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "the child aborted: {stdout}");
    let leases: Vec<(String, String, String)> = stdout
        .lines()
        // The harness prints `test crash_child ... ` on the first line's start.
        .filter_map(|l| l.split_once("LEASE ").map(|(_, rest)| rest))
        .map(|l| {
            let mut words = l.split(' ').map(str::to_owned);
            let mut next = || words.next().unwrap();
            (next(), next(), next())
        })
        .collect();
    assert_eq!(leases.len(), 6, "{stdout}");
    let of = |role: &str| -> BTreeSet<(String, String)> {
        leases
            .iter()
            .filter(|(r, _, _)| r == role)
            .map(|(_, id, user)| (id.clone(), user.clone()))
            .collect()
    };
    let (short, long) = (of("short"), of("long"));
    let all_users: BTreeSet<String> = leases.iter().map(|(_, _, u)| u.clone()).collect();
    let marked: BTreeSet<String> = common::marked_roles(&pg).into_iter().collect();
    assert_eq!(marked, all_users, "the crash left every role behind");

    // Let the short leases expire, then start the same instance again.
    std::thread::sleep(Duration::from_secs(3));
    let broker = builder(&pg, "crashy").build().unwrap();
    let marked: BTreeSet<String> = common::marked_roles(&pg).into_iter().collect();
    let long_users: BTreeSet<String> = long.iter().map(|(_, u)| u.clone()).collect();
    assert_eq!(marked, long_users, "build() dropped the expired roles");
    let adopted: BTreeSet<(String, String)> = broker
        .leases()
        .iter()
        .map(|l| (l.id().to_owned(), l.username().to_owned()))
        .collect();
    assert_eq!(adopted, long, "build() adopted the live leases");
    assert!(short.iter().all(|(id, _)| broker.lease(id).is_none()));
    assert_eq!(
        common::roles_with_prefix(&pg, "short-1-unmarked"),
        ["short-1-unmarked"],
        "an unmarked role is never touched"
    );

    // Adopted leases can be renewed and revoked by id (with the default SQL until the role is written again).
    let mut long = long.into_iter();
    let (renewed, _) = long.next().unwrap();
    let (revoked, revoked_user) = long.next().unwrap();
    let lease = broker
        .renew(&renewed, Some(Duration::from_secs(5)))
        .unwrap();
    let valid_until: Option<SystemTime> = pg
        .admin_client()
        .unwrap()
        .query_one(
            "SELECT rolvaliduntil FROM pg_roles WHERE rolname = $1",
            &[&lease.username()],
        )
        .unwrap()
        .get(0);
    assert_eq!(valid_until, Some(lease.expires_at()));
    broker.revoke(&revoked).unwrap();
    assert!(common::roles_with_prefix(&pg, &revoked_user).is_empty());

    // The sweeper drops the rest on time.
    assert!(
        common::eventually(Duration::from_secs(20), || broker.leases().is_empty()),
        "adopted leases are swept at their expiry"
    );
    assert!(
        common::marked_roles(&pg).is_empty(),
        "no marked role remains"
    );
}

#[test]
fn two_instances_sweep_their_own_and_a_dead_instances_roles_exactly_once() {
    common::logs::install();
    let pg = TestPostgres::start().unwrap();
    // A dead instance: it issued credentials and went away without revoking them.
    let dead = builder(&pg, "dead").build().unwrap();
    dead.write_role(
        "duo",
        Role::new().lease(Duration::from_secs(2), Duration::from_secs(60)),
    )
    .unwrap();
    let dead_users: Vec<String> = (0..8)
        .map(|_| dead.creds("duo").unwrap().username().to_owned())
        .collect();
    dead.shutdown(ShutdownMode::Keep).unwrap();
    // Under load, issuing 8 takes longer than a lease: the dead instance's own sweeper drops the first ones
    // before it stops. Those are not orphans; the rest are.
    let dead_users: Vec<String> = dead_users
        .into_iter()
        .filter(|user| !common::roles_with_prefix(&pg, user).is_empty())
        .collect();
    assert!(
        !dead_users.is_empty(),
        "the dead instance left no role behind: every lease expired before it stopped"
    );

    let live = |name: &str| {
        let broker = builder(&pg, name)
            .orphan_sweep_interval(Duration::from_secs(2))
            .build()
            .unwrap();
        broker
            .write_role(
                "duo",
                Role::new().lease(Duration::from_secs(1), Duration::from_secs(60)),
            )
            .unwrap();
        broker
    };
    let (a, b) = (live("a"), live("b"));
    std::thread::scope(|s| {
        for broker in [&a, &b] {
            s.spawn(move || {
                for _ in 0..15 {
                    let _ = broker.creds("duo").unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
    });
    assert!(
        common::eventually(Duration::from_secs(20), || {
            a.leases().is_empty() && b.leases().is_empty() && common::marked_roles(&pg).is_empty()
        }),
        "every lease swept, every dead role dropped: {:?}",
        common::marked_roles(&pg)
    );
    // The roles are gone a moment before the sweeper logs it; then give a second sweep the chance to run (and
    // to drop or log anything twice).
    let dropped = |user: &String| {
        let line = format!("orphan sweep: dropped expired role {user} ");
        common::logs::lines()
            .iter()
            .filter(|l| l.contains(&line))
            .count()
    };
    assert!(
        common::eventually(Duration::from_secs(15), || dead_users
            .iter()
            .all(|u| dropped(u) > 0)),
        "not every dead role's drop was logged:\n{}",
        common::logs::lines().join("\n")
    );
    std::thread::sleep(Duration::from_secs(3));
    let lines = common::logs::lines();
    for user in &dead_users {
        let drops = lines
            .iter()
            .filter(|l| l.contains(&format!("orphan sweep: dropped expired role {user} ")))
            .count();
        assert_eq!(
            drops,
            1,
            "{user} dropped exactly once:\n{}",
            lines.join("\n")
        );
    }
    let orphaned_live = lines
        .iter()
        // Other tests of this binary log too: only this test's live instances, "a" and "b", count.
        .filter(|l| {
            l.contains("orphan sweep: dropped")
                && (l.contains(" of instance a (") || l.contains(" of instance b ("))
        })
        .count();
    assert_eq!(orphaned_live, 0, "each live instance swept its own leases");
    // Other tests of this binary log too: look at the lines about this test's roles.
    let trouble: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("WARN") || l.starts_with("ERROR"))
        .filter(|l| l.contains("duo") || l.contains("orphan"))
        .collect();
    assert!(
        trouble.is_empty(),
        "no error from racing drops: {trouble:?}"
    );
}

#[test]
fn revoke_all_recovery_and_shutdown_modes() {
    let pg = TestPostgres::start().unwrap();
    let first = builder(&pg, "svc").build().unwrap();
    first.write_role("app", Role::new()).unwrap();
    let kept: Vec<String> = (0..3)
        .map(|_| first.creds("app").unwrap().username().to_owned())
        .collect();
    first.shutdown(ShutdownMode::Keep).unwrap();
    let mut expected = kept.clone();
    expected.sort();
    assert_eq!(common::marked_roles(&pg), expected, "Keep leaves the roles");

    // Another instance leaves live roles of "svc" alone.
    let other = builder(&pg, "other").build().unwrap();
    assert!(other.leases().is_empty());
    assert_eq!(common::marked_roles(&pg), expected);
    drop(other);

    // RevokeAll drops this instance's live roles at start.
    let second = builder(&pg, "svc")
        .recovery(RecoveryMode::RevokeAll)
        .build()
        .unwrap();
    assert!(second.leases().is_empty());
    assert!(common::marked_roles(&pg).is_empty());

    // Shutdown with Revoke drops everything this instance holds; so does Drop with that default.
    second.write_role("app", Role::new()).unwrap();
    for _ in 0..300 {
        let _ = second.creds("app").unwrap();
    }
    second
        .shutdown(ShutdownMode::Revoke {
            timeout: Duration::from_secs(30),
        })
        .unwrap();
    assert!(common::marked_roles(&pg).is_empty());
    let third = builder(&pg, "svc")
        .shutdown_mode(ShutdownMode::Revoke {
            timeout: Duration::from_secs(30),
        })
        .build()
        .unwrap();
    third.write_role("app", Role::new()).unwrap();
    let _ = third.creds("app").unwrap();
    drop(third);
    assert!(common::marked_roles(&pg).is_empty());
}

/// PostgreSQL 16+ lets a non-superuser `CREATEROLE` admin drop only roles it holds ADMIN OPTION on, and only a
/// role's creator gets that by itself: the broker grants every credential to the admin group with ADMIN OPTION,
/// so an instance whose admin is another non-superuser can still drop a dead instance's expired roles.
#[test]
fn a_dead_instances_roles_are_dropped_by_an_instance_with_another_non_superuser_admin() {
    common::logs::install();
    let pg = TestPostgres::start().unwrap();
    let mut admin = pg.admin_client().unwrap();
    admin
        .batch_execute(
            "CREATE ROLE alice LOGIN CREATEROLE PASSWORD 'alice-password-1';
             CREATE ROLE bob LOGIN CREATEROLE PASSWORD 'bob-password-1';
             GRANT pg_signal_backend TO alice, bob;
             CREATE ROLE app_owner NOLOGIN; GRANT app_owner TO alice, bob;
             GRANT CREATE ON SCHEMA public TO PUBLIC;",
        )
        .unwrap();
    let as_admin = |user: &str| {
        Broker::builder()
            .connection(common::connection_as(
                &pg,
                user,
                &format!("{user}-password-1"),
            ))
            .instance_name(user)
            .reassign_owned_to("app_owner")
    };

    // Alice's instance comes first (creating the marker role and the admin group), issues, and dies.
    let dead = as_admin("alice").build().unwrap();
    // Credentials may create tables through PUBLIC (as by default before PostgreSQL 15), not through a grant of
    // Alice's: Bob could not revoke that one (see "Admin rights" in docs/operations.md).
    // Long enough to log in once under load; leases start at a whole second.
    let short = Role::new().lease(Duration::from_secs(3), Duration::from_secs(60));
    dead.write_role("app", short).unwrap();
    let creds: Vec<_> = (0..4).map(|_| dead.creds("app").unwrap()).collect();
    common::create_table_as(&pg, &creds[0], "left_by_alice");
    let dead_users: Vec<String> = creds.iter().map(|c| c.username().to_owned()).collect();
    dead.shutdown(ShutdownMode::Keep).unwrap();
    // On PostgreSQL 16+ the admins are members of the marker role too (Alice as its creator, Bob by the grant
    // below): look at the credentials only.
    let left = || -> Vec<String> {
        common::marked_roles(&pg)
            .into_iter()
            .filter(|r| dead_users.contains(r))
            .collect()
    };
    assert_eq!(left().len(), 4);

    if pg.major_version().unwrap() >= 16 {
        // Pre-flight names both grants Bob needs, and creates nothing.
        let err = as_admin("bob").build().unwrap_err();
        assert_eq!(err.kind(), credbroker::ErrorKind::Permission);
        let message = err.to_string();
        for fix in [
            r#"`GRANT "credbroker_lease" TO "bob" WITH ADMIN OPTION;`"#,
            r#"`GRANT "credbroker_lease_admin" TO "bob";`"#,
        ] {
            assert!(message.contains(fix), "{fix} in {message}");
        }
        admin
            .batch_execute(
                "GRANT credbroker_lease TO bob WITH ADMIN OPTION; GRANT credbroker_lease_admin TO bob;",
            )
            .unwrap();
    }
    let live = as_admin("bob")
        .orphan_sweep_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    assert!(
        common::eventually(Duration::from_secs(20), || left().is_empty()),
        "Bob's sweeper drops Alice's expired roles: {:?}\n{}",
        left(),
        common::logs::lines().join("\n")
    );
    assert_eq!(
        common::table_owner(&pg, "postgres", "left_by_alice"),
        "app_owner"
    );
    let failures: Vec<String> = common::logs::lines()
        .into_iter()
        .filter(|l| l.contains("could not drop") && dead_users.iter().any(|u| l.contains(u)))
        .collect();
    assert!(failures.is_empty(), "{failures:?}");
    drop(live);
}
