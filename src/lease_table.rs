//! The in-memory lease table: leases by id, and an index of when each is next due for revocation.
//!
//! A lease is *due* at its expiry, or, after a failed revocation, at its next retry. The sweeper takes due
//! leases out of the index (marking them in flight) and puts failed ones back with a later due time; a lease
//! leaves the table only once its role is gone. Lookups by id are O(1); the due index is a binary min-heap
//! (adding is O(1) on average, as new items are due late; taking the earliest is O(log n)); only the prefix scan
//! reads the whole table.
//!
//! The due index is cleaned lazily: removing, renewing or claiming a lease only changes its entry, and the index
//! item it leaves behind goes stale (its time no longer matches the entry's) and is dropped when the sweeper
//! reaches it. So a removal touches the map only, and new items land at the heap's bottom, where they mostly
//! stay; stale items live at most until the time they name.
//!
//! Leases are stored compactly, because a busy fleet may hold a million: a lease id is
//! `postgresql/creds/<role>/<128 random bits>` and a username `<role>-<secs>-<16 random characters>`, so an entry
//! keeps the random parts and a shared pointer to its role, times as whole seconds, and no heap allocation of
//! its own (64 bytes). The public [`Lease`] is built from an entry when asked for. A username of another shape
//! (from a role's [username template](crate::Role::username_template)) is kept whole in a side map, so only
//! the roles that use templates pay for it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::credential::{parse_lease_id, write_lease_id, UsernameSuffix};
use crate::lease::Lease;
use crate::role::CompiledRole;

/// One lease and what the broker needs to renew and revoke it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// The role definition in force when the lease was issued; used when the role has since been deleted.
    pub role: Arc<CompiledRole>,
    user: UsernameSuffix,
    issued: u64,
    expires: u64,
    max_expires: u64,
    attempts: u32,
    /// When the lease is next due for revocation, in milliseconds since the epoch; [`IN_FLIGHT`] while a
    /// revocation runs.
    due: u64,
}

/// `Entry::due` of a lease whose revocation is running.
const IN_FLIGHT: u64 = 0;

impl Entry {
    /// The key and entry for `lease`, if its id is one this crate generated for `role` (it always is for leases
    /// it issued; recovery skips anything else), and its username if that is not of the default shape (it is
    /// then kept whole, beside the entry).
    fn new(lease: &Lease, role: Arc<CompiledRole>) -> Option<(u128, Entry, Option<Box<str>>)> {
        let (id_role, key) = parse_lease_id(&lease.id)?;
        if id_role != role.name || lease.role != role.name {
            return None;
        }
        let (user, whole) = match UsernameSuffix::parse(&role.name, &lease.username) {
            Some(user) => (user, None),
            None => (
                UsernameSuffix::ELSEWHERE,
                Some(lease.username.clone().into_boxed_str()),
            ),
        };
        let entry = Entry {
            user,
            role,
            issued: secs(lease.issued_at),
            expires: secs(lease.expires_at),
            max_expires: secs(lease.max_expires_at),
            attempts: lease.revocation_attempts,
            due: IN_FLIGHT,
        };
        Some((key, entry, whole))
    }

    /// Whether a revocation of this lease is running now.
    pub(crate) fn in_flight(&self) -> bool {
        self.due == IN_FLIGHT
    }

    fn id(&self, key: u128) -> String {
        let mut id = String::new();
        write_lease_id(&mut id, &self.role.name, key);
        id
    }

    /// The username, `whole` if it is kept beside the entry.
    fn username(&self, whole: Option<&str>) -> String {
        whole.map_or_else(|| self.user.username(&self.role.name), str::to_owned)
    }

    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }

    pub(crate) fn expires_at(&self) -> SystemTime {
        time(self.expires)
    }

    pub(crate) fn max_expires_at(&self) -> SystemTime {
        time(self.max_expires)
    }

    /// The public view of this entry.
    fn lease(&self, key: u128, last_error: Option<&str>, whole: Option<&str>) -> Lease {
        Lease {
            id: self.id(key),
            role: self.role.name.clone(),
            username: self.username(whole),
            issued_at: time(self.issued),
            expires_at: time(self.expires),
            max_expires_at: time(self.max_expires),
            revocation_attempts: self.attempts,
            last_error: last_error.map(str::to_owned),
        }
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn time(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Milliseconds since the epoch, at least 1 (0 is [`IN_FLIGHT`]).
fn millis(t: SystemTime) -> u64 {
    let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// A due lease handed to the sweeper.
#[derive(Debug, Clone)]
pub(crate) struct DueLease {
    pub id: String,
    pub username: String,
    pub role: Arc<CompiledRole>,
    /// Failed revocations so far: 0 for a lease that just expired.
    pub attempts: u32,
    /// When it was due (its end or its retry time), in milliseconds since the epoch; 0 if it was in flight.
    pub due: u64,
}

/// Hashes a lease key, 128 bits from the operating system's CSPRNG, by folding it to 64 bits: the bits are
/// uniform already, so the XOR of the two halves is too, and every bit hashbrown reads (the low ones pick the
/// bucket, the top seven the tag) is random. SipHash over them, the standard library's default, costs more than
/// the rest of an insert and buys nothing here: its keyed mixing defends against keys an attacker chooses to
/// collide (hash flooding), and the broker chooses these. (Recovery adopts keys read from role comments, which
/// only someone with ADMIN OPTION on the marker role can write: an admin, who can do worse than slow a map.)
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RandomKeyHasher(u64);

impl std::hash::Hasher for RandomKeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u128(&mut self, key: u128) {
        self.0 ^= (key as u64) ^ ((key >> 64) as u64);
    }

    /// Not used by `u128` keys; any other input is mixed byte by byte (FNV-1a) so the hasher stays correct.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A map keyed by lease keys, hashed with [`RandomKeyHasher`].
type KeyMap<V> = HashMap<u128, V, BuildHasherDefault<RandomKeyHasher>>;

/// The table. Keys are the lease ids' 128 random bits, so a hash map spreads them evenly; it finds a lease with one
/// or two cache misses where a B-tree of a million entries takes six.
#[derive(Debug, Default)]
pub(crate) struct LeaseTable {
    by_key: KeyMap<Entry>,
    /// When each lease is due, earliest first: a min-heap of (due, key), so that adding one (at every issue and
    /// renewal) is a push that rarely moves (issued leases are due later and later), where a B-tree of a million
    /// items walked five levels of nodes to insert in order. Items go stale instead of being removed (a lease
    /// removed, renewed or claimed) and are dropped when they reach the front.
    due: BinaryHeap<Reverse<(u64, u128)>>,
    /// The last revocation error of the few leases that have one, kept out of the entries to keep them small.
    errors: KeyMap<Box<str>>,
    /// The usernames not of the default shape (see [`UsernameSuffix::ELSEWHERE`]), whole.
    names: KeyMap<Box<str>>,
    /// How many leases each role has, for stats polled every second (counting a million entries takes ms).
    per_role: BTreeMap<String, usize>,
}

impl LeaseTable {
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// The key of lease `id`, if the table holds it.
    fn key(&self, id: &str) -> Option<u128> {
        let (role, key) = parse_lease_id(id)?;
        let entry = self.by_key.get(&key)?;
        (entry.role.name == role).then_some(key)
    }

    /// Adds a lease of `role`, due at its expiry. Returns whether it is now the earliest due (so the sweeper must
    /// wake), or `None` if the lease's id or username are not ones the broker generates for `role`.
    pub(crate) fn insert(&mut self, lease: Lease, role: Arc<CompiledRole>) -> Option<bool> {
        let (key, mut entry, whole) = Entry::new(&lease, role)?;
        match whole {
            Some(name) => {
                self.names.insert(key, name);
            }
            None => self.forget_name(key),
        }
        let due = millis(entry.expires_at());
        entry.due = due;
        match lease.last_error {
            Some(error) => {
                self.errors.insert(key, error.into_boxed_str());
            }
            None => self.forget_error(key),
        }
        self.count(&entry.role.name, true);
        // A replaced entry's index item goes stale and is skipped when reached.
        if let Some(replaced) = self.by_key.insert(key, entry) {
            self.count(&replaced.role.name, false);
        }
        Some(self.schedule(due, key))
    }

    /// Counts a lease of `role` in (`added`) or out.
    fn count(&mut self, role: &str, added: bool) {
        match self.per_role.get_mut(role) {
            Some(n) if added => *n += 1,
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.per_role.remove(role);
            }
            None if added => {
                self.per_role.insert(role.to_owned(), 1);
            }
            None => {}
        }
    }

    /// How many leases each role has (roles with none left out).
    pub(crate) fn per_role(&self) -> &BTreeMap<String, usize> {
        &self.per_role
    }

    /// How many leases have a failed revocation and wait for a retry.
    pub(crate) fn failing(&self) -> usize {
        self.errors.len()
    }

    /// Adds an index item; returns whether it is the earliest.
    fn schedule(&mut self, due: u64, key: u128) -> bool {
        self.due.push(Reverse((due, key)));
        self.due.peek().is_some_and(|first| first.0 == (due, key))
    }

    /// Whether an index item still describes its lease: the lease exists, is not in flight, and is due then.
    fn current(&self, (due, key): (u64, u128)) -> bool {
        self.by_key.get(&key).is_some_and(|e| e.due == due)
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Entry> {
        self.by_key.get(&self.key(id)?)
    }

    /// The public view of lease `id`.
    pub(crate) fn lease(&self, id: &str) -> Option<Lease> {
        let key = self.key(id)?;
        self.by_key.get(&key).map(|e| self.public(key, e))
    }

    fn public(&self, key: u128, entry: &Entry) -> Lease {
        entry.lease(
            key,
            self.errors.get(&key).map(|e| &**e),
            self.names.get(&key).map(|n| &**n),
        )
    }

    /// The username of lease `id`.
    pub(crate) fn username(&self, id: &str) -> Option<String> {
        let key = self.key(id)?;
        let entry = self.by_key.get(&key)?;
        Some(entry.username(self.names.get(&key).map(|n| &**n)))
    }

    /// Removes lease `id`; its index item, if any, goes stale.
    pub(crate) fn remove(&mut self, id: &str) -> Option<Entry> {
        let (role, key) = parse_lease_id(id)?;
        let std::collections::hash_map::Entry::Occupied(found) = self.by_key.entry(key) else {
            return None;
        };
        if found.get().role.name != role {
            return None;
        }
        let entry = found.remove();
        self.forget_error(key);
        self.forget_name(key);
        self.count(&entry.role.name, false);
        Some(entry)
    }

    /// Removes lease `id` and returns its public view, as it was.
    pub(crate) fn take(&mut self, id: &str) -> Option<Lease> {
        let key = self.key(id)?;
        let lease = self.by_key.get(&key).map(|e| self.public(key, e));
        self.remove(id);
        lease
    }

    /// Drops the last error of lease `key`; free when no lease has one, the usual case.
    fn forget_error(&mut self, key: u128) {
        if !self.errors.is_empty() {
            self.errors.remove(&key);
        }
    }

    /// Drops the whole username of lease `key`; free when no role uses a username template.
    fn forget_name(&mut self, key: u128) {
        if !self.names.is_empty() {
            self.names.remove(&key);
        }
    }

    /// Marks a lease in flight (its index item goes stale) and returns its key, its entry, and when it was due
    /// (`None` if it was already in flight), for the caller to reschedule or claim.
    fn unschedule(&mut self, id: &str) -> Option<(u128, &mut Entry, Option<u64>)> {
        let key = self.key(id)?;
        let entry = self.by_key.get_mut(&key)?;
        let was_due = std::mem::replace(&mut entry.due, IN_FLIGHT);
        Some((key, entry, (was_due != IN_FLIGHT).then_some(was_due)))
    }

    /// Moves the expiry of a lease that is not being revoked, earlier or later. Returns whether it is now the
    /// earliest due (so the sweeper must wake), or `None` if the lease is gone or in flight.
    pub(crate) fn set_expiry(&mut self, id: &str, expires_at: SystemTime) -> Option<bool> {
        let Some((key, entry, Some(was_due))) = self.unschedule(id) else {
            return None;
        };
        entry.expires = secs(expires_at);
        entry.due = millis(expires_at);
        let due = entry.due;
        if due == was_due {
            // Its index item is current again (a renewal capped at the lease's max, say): no second one.
            return Some(self.due.peek().is_some_and(|first| first.0 == (due, key)));
        }
        Some(self.schedule(due, key))
    }

    /// Hands a claimed lease back, due again at `at` (its attempts and error unchanged).
    pub(crate) fn reschedule(&mut self, id: &str, at: SystemTime) {
        if let Some((key, entry, _)) = self.unschedule(id) {
            entry.due = millis(at);
            let due = entry.due;
            self.schedule(due, key);
        }
    }

    /// Marks a lease in flight (so the sweeper leaves it alone) and returns what revoking it needs.
    pub(crate) fn claim(&mut self, id: &str) -> Option<DueLease> {
        let whole = self.key(id).and_then(|key| self.names.get(&key).cloned());
        let (key, entry, was_due) = self.unschedule(id)?;
        Some(due_lease(
            key,
            entry,
            was_due.unwrap_or(IN_FLIGHT),
            whole.as_deref(),
        ))
    }

    /// Takes index items from the front while `take(due)` says so, dropping stale ones, and claims the leases of
    /// up to `limit` current ones.
    fn claim_front(&mut self, limit: usize, take: impl Fn(u64) -> bool) -> Vec<DueLease> {
        let mut claimed = Vec::new();
        while claimed.len() < limit {
            let Some(&Reverse((due, key))) = self.due.peek() else {
                break;
            };
            if !take(due) {
                break;
            }
            self.due.pop();
            if self.current((due, key)) {
                if let Some(entry) = self.by_key.get_mut(&key) {
                    entry.due = IN_FLIGHT;
                    let whole = self.names.get(&key).map(|n| &**n);
                    claimed.push(due_lease(key, entry, due, whole));
                }
            }
        }
        claimed
    }

    /// Claims up to `limit` leases due at or before `now`, earliest first.
    pub(crate) fn claim_due(&mut self, now: SystemTime, limit: usize) -> Vec<DueLease> {
        let now = millis(now);
        self.claim_front(limit, |due| due <= now)
    }

    /// Claims up to `limit` leases that are not in flight, whenever they are due (for shutdown).
    pub(crate) fn claim_all(&mut self, limit: usize) -> Vec<DueLease> {
        self.claim_front(limit, |_| true)
    }

    /// Records a failed revocation and makes the lease due again at `retry_at`. Returns the attempt count.
    pub(crate) fn failed(&mut self, id: &str, error: String, retry_at: SystemTime) -> Option<u32> {
        let (key, entry, _) = self.unschedule(id)?;
        entry.attempts += 1;
        entry.due = millis(retry_at);
        let (attempts, due) = (entry.attempts, entry.due);
        self.errors.insert(key, error.into_boxed_str());
        self.schedule(due, key);
        Some(attempts)
    }

    /// When the earliest lease is due, if any lease is waiting. Drops stale index items from the front first.
    pub(crate) fn next_due(&mut self) -> Option<SystemTime> {
        while let Some(&Reverse(first)) = self.due.peek() {
            if self.current(first) {
                return Some(UNIX_EPOCH + Duration::from_millis(first.0));
            }
            self.due.pop();
        }
        None
    }

    /// Ids of the leases whose id starts with `prefix`, sorted. A scan of the whole table, without an allocation
    /// per lease.
    pub(crate) fn ids_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut buffer = String::with_capacity(96);
        let mut ids: Vec<String> = self
            .by_key
            .iter()
            .filter(|(key, entry)| {
                buffer.clear();
                write_lease_id(&mut buffer, &entry.role.name, **key);
                buffer.starts_with(prefix)
            })
            .map(|(key, entry)| entry.id(*key))
            .collect();
        ids.sort();
        ids
    }

    /// Every lease, sorted by id.
    pub(crate) fn leases(&self) -> Vec<Lease> {
        sorted(
            self.by_key
                .iter()
                .map(|(k, e)| self.public(*k, e))
                .collect(),
        )
    }

    /// Leases whose revocation has failed at least once, sorted by id.
    pub(crate) fn failed_leases(&self) -> Vec<Lease> {
        let failed = self.by_key.iter().filter(|(_, e)| e.attempts > 0);
        sorted(failed.map(|(k, e)| self.public(*k, e)).collect())
    }
}

fn due_lease(key: u128, entry: &Entry, due: u64, whole: Option<&str>) -> DueLease {
    DueLease {
        due,
        id: entry.id(key),
        username: entry.username(whole),
        role: entry.role.clone(),
        attempts: entry.attempts,
    }
}

fn sorted(mut leases: Vec<Lease>) -> Vec<Lease> {
    leases.sort_by(|a, b| a.id.cmp(&b.id));
    leases
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeasePolicy;
    use crate::role::Role;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn role(name: &str) -> Arc<CompiledRole> {
        let policy = LeasePolicy::new(Duration::from_secs(60), Duration::from_secs(600)).unwrap();
        Arc::new(CompiledRole::compile(name, Role::new(), policy).unwrap())
    }

    /// A lease of role `r` whose id ends in `n`, expiring at `expires`.
    fn lease_of(role_name: &str, n: u128, expires: u64) -> Lease {
        let mut id = String::new();
        write_lease_id(&mut id, role_name, n);
        Lease {
            id,
            role: role_name.into(),
            username: format!("{}-1000-{:016}", role_name.to_ascii_lowercase(), n),
            issued_at: at(0),
            expires_at: at(expires),
            max_expires_at: at(600),
            revocation_attempts: 0,
            last_error: None,
        }
    }

    fn lease(n: u128, expires: u64) -> Lease {
        lease_of("r", n, expires)
    }

    fn id(n: u128) -> String {
        lease(n, 0).id
    }

    /// Inserts lease `n` of role `r`; returns whether it is the earliest due.
    fn add(t: &mut LeaseTable, n: u128, expires: u64) -> bool {
        t.insert(lease(n, expires), role("r")).unwrap()
    }

    fn ids(due: Vec<DueLease>) -> Vec<String> {
        due.into_iter().map(|d| d.id).collect()
    }

    #[test]
    fn live_leases_are_counted_per_role_through_insert_replace_and_removal() {
        let mut t = LeaseTable::default();
        add(&mut t, 1, 10);
        add(&mut t, 2, 10);
        add(&mut t, 2, 20); // replaces lease 2
        t.insert(lease_of("other", 3, 10), role("other")).unwrap();
        let counts = |t: &LeaseTable| t.per_role().clone().into_iter().collect::<Vec<_>>();
        assert_eq!(counts(&t), [("other".to_owned(), 1), ("r".to_owned(), 2)]);
        assert_eq!(t.take(&id(1)).map(|l| l.expires_at), Some(at(10)));
        assert!(t.take(&id(1)).is_none());
        t.remove(&lease_of("other", 3, 10).id);
        assert_eq!(counts(&t), [("r".to_owned(), 1)]);
        t.failed(&id(2), "boom".into(), at(30));
        assert_eq!(t.failing(), 1);
        t.remove(&id(2));
        assert_eq!((counts(&t), t.failing()), (vec![], 0));
    }

    #[test]
    fn an_entry_gives_back_the_lease_it_was_made_from() {
        let lease = lease_of("Prod_1", 0xabc, 50);
        let mut t = LeaseTable::default();
        t.insert(lease.clone(), role("Prod_1")).unwrap();
        assert_eq!(t.lease(&lease.id).as_ref(), Some(&lease));
        assert_eq!(
            lease.id,
            "postgresql/creds/Prod_1/00000000-0000-0000-0000-000000000abc"
        );
        assert_eq!(lease.username, "prod_1-1000-0000000000002748");
        assert_eq!((lease.expires_at, lease.max_expires_at), (at(50), at(600)));
        // Ids this crate did not make are refused.
        let other = Lease {
            id: "postgresql/creds/Prod_1/xyz".into(),
            ..lease.clone()
        };
        assert!(t.insert(other, role("Prod_1")).is_none());
        // Usernames of another shape (from a username template) are kept whole, and forgotten with their lease.
        for user in ["someone-else", "prod_1-1000-UPPERCASE0000000"] {
            let other = Lease {
                username: user.into(),
                ..lease.clone()
            };
            t.insert(other.clone(), role("Prod_1")).unwrap();
            assert_eq!(t.lease(&lease.id).as_ref(), Some(&other));
            assert_eq!(t.username(&lease.id).as_deref(), Some(user));
            assert_eq!(
                t.claim(&lease.id).map(|d| d.username).as_deref(),
                Some(user)
            );
        }
        t.insert(lease.clone(), role("Prod_1")).unwrap();
        assert_eq!(t.lease(&lease.id).as_ref(), Some(&lease));
        assert!(
            t.names.is_empty(),
            "a default-shaped name replaces a kept one"
        );
        t.insert(
            Lease {
                username: "kept".into(),
                ..lease.clone()
            },
            role("Prod_1"),
        );
        t.remove(&lease.id);
        assert!(t.names.is_empty());
    }

    #[test]
    fn entries_stay_small() {
        // A million leases in a hash map of (u128, Entry) pairs: every byte here is a megabyte there.
        assert!(
            std::mem::size_of::<Entry>() <= 64,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn insert_reports_new_earliest() {
        let mut t = LeaseTable::default();
        assert!(add(&mut t, 1, 50));
        assert!(!add(&mut t, 2, 60));
        assert!(add(&mut t, 3, 10));
        assert_eq!(t.next_due(), Some(at(10)));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn lookups_need_the_whole_id() {
        let mut t = LeaseTable::default();
        add(&mut t, 1, 50);
        assert!(t.get(&id(1)).is_some());
        assert!(t.get(&id(1).replace("/r/", "/other/")).is_none());
        assert!(t.get("postgresql/creds/r/").is_none());
        assert!(t.get("").is_none());
    }

    #[test]
    fn claim_due_takes_expired_in_order_and_hides_them() {
        let mut t = LeaseTable::default();
        for (n, exp) in [(1, 30), (2, 10), (3, 20), (4, 100)] {
            add(&mut t, n, exp);
        }
        assert_eq!(ids(t.claim_due(at(30), 2)), [id(2), id(3)]);
        assert!(t.get(&id(2)).unwrap().in_flight());
        assert_eq!(ids(t.claim_due(at(30), 10)), [id(1)]);
        assert_eq!(t.next_due(), Some(at(100)));
        assert_eq!(
            t.len(),
            4,
            "claimed leases stay in the table until their role is gone"
        );
    }

    #[test]
    fn failed_revocation_is_due_again_with_its_error() {
        let mut t = LeaseTable::default();
        add(&mut t, 1, 10);
        assert_eq!(t.claim_due(at(10), 10).len(), 1);
        assert_eq!(t.failed(&id(1), "boom".into(), at(15)), Some(1));
        assert_eq!(t.next_due(), Some(at(15)));
        let lease = t.lease(&id(1)).unwrap();
        assert_eq!(
            (lease.revocation_attempts, lease.last_error.as_deref()),
            (1, Some("boom"))
        );
        assert_eq!(t.failed_leases(), vec![lease]);
        assert!(t.claim_due(at(14), 10).is_empty());
        assert_eq!(t.claim_due(at(15), 10).len(), 1);
    }

    #[test]
    fn set_expiry_moves_due_but_not_in_flight() {
        let mut t = LeaseTable::default();
        add(&mut t, 1, 10);
        add(&mut t, 2, 20);
        assert!(t.set_expiry(&id(1), at(40)).is_some());
        assert_eq!(t.next_due(), Some(at(20)));
        assert_eq!(t.get(&id(1)).unwrap().expires_at(), at(40));
        t.claim(&id(2));
        assert!(t.set_expiry(&id(2), at(50)).is_none());
        assert!(t.set_expiry(&id(9), at(50)).is_none());
    }

    #[test]
    fn renewals_to_the_same_end_add_no_index_items_and_keep_the_lease_due() {
        let mut t = LeaseTable::default();
        add(&mut t, 1, 10);
        add(&mut t, 2, 20);
        let items = t.due.len();
        for _ in 0..100 {
            assert_eq!(t.set_expiry(&id(2), at(20)), Some(false));
            assert_eq!(t.set_expiry(&id(1), at(10)), Some(true));
        }
        assert_eq!(t.due.len(), items);
        assert_eq!(ids(t.claim_due(at(20), 10)), [id(1), id(2)]);
        assert!(t.claim_due(at(100), 10).is_empty(), "each claimed once");
    }

    #[test]
    fn remove_prefix_and_claim_all() {
        let mut t = LeaseTable::default();
        t.insert(lease_of("p", 1, 10), role("p")).unwrap();
        t.insert(lease_of("p", 2, 10), role("p")).unwrap();
        t.insert(lease_of("px", 3, 10), role("px")).unwrap();
        t.insert(lease_of("q", 4, 10), role("q")).unwrap();
        let p = t.ids_with_prefix("postgresql/creds/p/");
        assert_eq!(p, [lease_of("p", 1, 0).id, lease_of("p", 2, 0).id]);
        assert_eq!(t.ids_with_prefix("postgresql/creds/p").len(), 3);
        assert!(t.remove(&p[0]).is_some());
        assert!(t.remove(&p[0]).is_none());
        assert_eq!(t.ids_with_prefix("postgresql/").len(), 3);
        assert_eq!(t.claim_all(2).len(), 2);
        assert_eq!(
            t.claim_all(10).len(),
            1,
            "claimed leases are not claimed again"
        );
        let sorted: Vec<String> = t.leases().into_iter().map(|l| l.id).collect();
        let mut expected = sorted.clone();
        expected.sort();
        assert_eq!(sorted, expected);
    }
}
