//! The in-memory lease table: leases by id, and an index of when each is next due for revocation.
//!
//! A lease is *due* at its expiry, or, after a failed revocation, at its next retry. The sweeper takes due
//! leases out of the index (marking them in flight) and puts failed ones back with a later due time; a lease
//! leaves the table only once its role is gone. Every operation is O(log n).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use crate::lease::Lease;
use crate::role::CompiledRole;

/// One lease and what the broker needs to renew and revoke it.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub lease: Lease,
    /// The role definition in force when the lease was issued; used when the role has since been deleted.
    pub role: Arc<CompiledRole>,
    /// When the lease is next due for revocation; `None` while a revocation is in flight.
    due: Option<SystemTime>,
}

impl Entry {
    pub(crate) fn new(lease: Lease, role: Arc<CompiledRole>) -> Entry {
        Entry {
            lease,
            role,
            due: None,
        }
    }

    /// Whether a revocation of this lease is running now.
    pub(crate) fn in_flight(&self) -> bool {
        self.due.is_none()
    }
}

/// A due lease handed to the sweeper.
#[derive(Debug, Clone)]
pub(crate) struct DueLease {
    pub id: Arc<str>,
    pub username: String,
    pub role: Arc<CompiledRole>,
    /// Failed revocations so far: 0 for a lease that just expired.
    pub attempts: u32,
}

#[derive(Debug, Default)]
pub(crate) struct LeaseTable {
    by_id: BTreeMap<Arc<str>, Entry>,
    due: BTreeSet<(SystemTime, Arc<str>)>,
}

impl LeaseTable {
    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Adds a lease, due at its expiry. Returns whether it is now the earliest due, so the sweeper must wake.
    pub(crate) fn insert(&mut self, mut entry: Entry) -> bool {
        let id: Arc<str> = Arc::from(entry.lease.id.as_str());
        let due = entry.lease.expires_at;
        entry.due = Some(due);
        if let Some(old) = self.by_id.insert(id.clone(), entry) {
            if let Some(old_due) = old.due {
                self.due.remove(&(old_due, id.clone()));
            }
        }
        self.due.insert((due, id.clone()));
        self.due.first().is_some_and(|(_, first)| *first == id)
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Entry> {
        self.by_id.get(id)
    }

    pub(crate) fn remove(&mut self, id: &str) -> Option<Entry> {
        let (key, entry) = self.by_id.remove_entry(id)?;
        if let Some(due) = entry.due {
            self.due.remove(&(due, key));
        }
        Some(entry)
    }

    /// Takes a lease out of the due index (leaving it in flight) and returns its key, its entry, and when it was
    /// due (`None` if it was already in flight), for the caller to reschedule or claim.
    fn unschedule(&mut self, id: &str) -> Option<(Arc<str>, &mut Entry, Option<SystemTime>)> {
        let key = self.by_id.get_key_value(id)?.0.clone();
        let entry = self.by_id.get_mut(&key)?;
        let was_due = entry.due.take();
        if let Some(due) = was_due {
            self.due.remove(&(due, key.clone()));
        }
        Some((key, entry, was_due))
    }

    /// Moves the expiry of a lease that is not being revoked. Returns false if the lease is gone or in flight.
    pub(crate) fn set_expiry(&mut self, id: &str, expires_at: SystemTime) -> bool {
        let Some((key, entry, Some(_))) = self.unschedule(id) else {
            return false;
        };
        entry.due = Some(expires_at);
        entry.lease.expires_at = expires_at;
        self.due.insert((expires_at, key));
        true
    }

    /// Marks a lease in flight (so the sweeper leaves it alone) and returns what revoking it needs.
    pub(crate) fn claim(&mut self, id: &str) -> Option<DueLease> {
        let (key, entry, _) = self.unschedule(id)?;
        Some(DueLease {
            id: key,
            username: entry.lease.username.clone(),
            role: entry.role.clone(),
            attempts: entry.lease.revocation_attempts,
        })
    }

    /// Claims up to `limit` leases due at or before `now`, earliest first.
    pub(crate) fn claim_due(&mut self, now: SystemTime, limit: usize) -> Vec<DueLease> {
        let ids: Vec<Arc<str>> = self
            .due
            .iter()
            .take_while(|(due, _)| *due <= now)
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect();
        ids.iter().filter_map(|id| self.claim(id)).collect()
    }

    /// Claims up to `limit` leases that are not in flight, whenever they are due (for shutdown).
    pub(crate) fn claim_all(&mut self, limit: usize) -> Vec<DueLease> {
        let ids: Vec<Arc<str>> = self
            .due
            .iter()
            .take(limit)
            .map(|(_, id)| id.clone())
            .collect();
        ids.iter().filter_map(|id| self.claim(id)).collect()
    }

    /// Records a failed revocation and makes the lease due again at `retry_at`. Returns the attempt count.
    pub(crate) fn failed(&mut self, id: &str, error: String, retry_at: SystemTime) -> Option<u32> {
        let (key, entry, _) = self.unschedule(id)?;
        entry.lease.revocation_attempts += 1;
        entry.lease.last_error = Some(error);
        entry.due = Some(retry_at);
        let attempts = entry.lease.revocation_attempts;
        self.due.insert((retry_at, key));
        Some(attempts)
    }

    /// When the earliest lease is due, if any lease is waiting.
    pub(crate) fn next_due(&self) -> Option<SystemTime> {
        self.due.first().map(|(due, _)| *due)
    }

    /// Ids of the leases whose id starts with `prefix`, in order.
    pub(crate) fn ids_with_prefix(&self, prefix: &str) -> Vec<Arc<str>> {
        self.by_id
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(id, _)| id.starts_with(prefix))
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub(crate) fn leases(&self) -> Vec<Lease> {
        self.by_id.values().map(|e| e.lease.clone()).collect()
    }

    /// Leases whose revocation has failed at least once.
    pub(crate) fn failed_leases(&self) -> Vec<Lease> {
        let failed = self
            .by_id
            .values()
            .filter(|e| e.lease.revocation_attempts > 0);
        failed.map(|e| e.lease.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::LeasePolicy;
    use crate::role::Role;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn entry(id: &str, expires: u64) -> Entry {
        let policy = LeasePolicy::new(Duration::from_secs(60), Duration::from_secs(600)).unwrap();
        let role = Arc::new(CompiledRole::compile("r", Role::new(), policy).unwrap());
        Entry::new(
            Lease {
                id: id.to_owned(),
                role: "r".into(),
                username: format!("user-{id}"),
                issued_at: at(0),
                expires_at: at(expires),
                max_expires_at: at(600),
                revocation_attempts: 0,
                last_error: None,
            },
            role,
        )
    }

    #[test]
    fn insert_reports_new_earliest() {
        let mut t = LeaseTable::default();
        assert!(t.insert(entry("a", 50)));
        assert!(!t.insert(entry("b", 60)));
        assert!(t.insert(entry("c", 10)));
        assert_eq!(t.next_due(), Some(at(10)));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn claim_due_takes_expired_in_order_and_hides_them() {
        let mut t = LeaseTable::default();
        for (id, exp) in [("a", 30), ("b", 10), ("c", 20), ("d", 100)] {
            t.insert(entry(id, exp));
        }
        let due: Vec<_> = t
            .claim_due(at(30), 2)
            .into_iter()
            .map(|d| d.id.to_string())
            .collect();
        assert_eq!(due, ["b", "c"]);
        assert!(t.get("b").unwrap().in_flight());
        let due: Vec<_> = t
            .claim_due(at(30), 10)
            .into_iter()
            .map(|d| d.id.to_string())
            .collect();
        assert_eq!(due, ["a"]);
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
        t.insert(entry("a", 10));
        assert_eq!(t.claim_due(at(10), 10).len(), 1);
        assert_eq!(t.failed("a", "boom".into(), at(15)), Some(1));
        assert_eq!(t.next_due(), Some(at(15)));
        let lease = &t.get("a").unwrap().lease;
        assert_eq!(
            (lease.revocation_attempts, lease.last_error.as_deref()),
            (1, Some("boom"))
        );
        assert!(t.claim_due(at(14), 10).is_empty());
        assert_eq!(t.claim_due(at(15), 10).len(), 1);
    }

    #[test]
    fn set_expiry_moves_due_but_not_in_flight() {
        let mut t = LeaseTable::default();
        t.insert(entry("a", 10));
        t.insert(entry("b", 20));
        assert!(t.set_expiry("a", at(40)));
        assert_eq!(t.next_due(), Some(at(20)));
        assert_eq!(t.get("a").unwrap().lease.expires_at, at(40));
        t.claim("b");
        assert!(!t.set_expiry("b", at(50)));
        assert!(!t.set_expiry("zzz", at(50)));
    }

    #[test]
    fn remove_and_prefix() {
        let mut t = LeaseTable::default();
        for id in ["p/x/1", "p/x/2", "p/y/1", "q/x/1"] {
            t.insert(entry(id, 10));
        }
        let ids: Vec<_> = t
            .ids_with_prefix("p/x/")
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ids, ["p/x/1", "p/x/2"]);
        assert!(t.remove("p/x/1").is_some());
        assert!(t.remove("p/x/1").is_none());
        assert_eq!(t.ids_with_prefix("p/").len(), 2);
        assert_eq!(t.claim_due(at(10), 10).len(), 3);
    }
}
