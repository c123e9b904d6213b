//! Internals this crate's own benchmarks and measurement examples drive (feature `bench-internals`): the lease
//! table on its own, and the catalog queries of recovery and the orphan sweep. Not an API: hidden from the
//! documentation, and free to change in any release.

/// The query recovery runs to read every marked role (parameter: the marker role), for measurements of its cost
/// (`examples/catalog_cost.rs`).
///
/// # Examples
///
/// ```no_run
/// use credbroker::__bench::MARKED_ROLES_QUERY;
/// use credbroker::testing::TestPostgres;
/// use credbroker::DEFAULT_MARKER_ROLE;
///
/// let pg = TestPostgres::start()?;
/// let mut admin = pg.admin_client()?;
/// let started = std::time::Instant::now();
/// let rows = admin.query(MARKED_ROLES_QUERY, &[&DEFAULT_MARKER_ROLE])?;
/// println!("{} marked roles read in {:?}", rows.len(), started.elapsed());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub const MARKED_ROLES_QUERY: &str = crate::sql::MARKED_ROLES;

/// The orphan sweep's query (parameters: the marker role, and the seconds a role must be expired as `float8`),
/// for measurements of its cost (`examples/catalog_cost.rs`).
///
/// # Examples
///
/// ```no_run
/// use credbroker::__bench::ORPHAN_CANDIDATES_QUERY;
/// use credbroker::testing::TestPostgres;
/// use credbroker::DEFAULT_MARKER_ROLE;
///
/// let pg = TestPostgres::start()?;
/// let mut admin = pg.admin_client()?;
/// let started = std::time::Instant::now();
/// let rows = admin.query(ORPHAN_CANDIDATES_QUERY, &[&DEFAULT_MARKER_ROLE, &60.0f64])?;
/// println!("{} orphan candidates found in {:?}", rows.len(), started.elapsed());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub const ORPHAN_CANDIDATES_QUERY: &str = crate::sql::ORPHAN_CANDIDATES;

/// The broker's in-memory lease table on its own, for benchmarks: leases of one role, named by number.
///
/// Each lease `n` gets the id and username the broker would give it; operations go through the same code as the
/// broker's (`insert` parses the id and username as `creds` does).
///
/// # Examples
///
/// ```
/// use credbroker::__bench::LeaseTableBench;
/// use std::time::{Duration, SystemTime};
///
/// let now = SystemTime::now();
/// let mut table = LeaseTableBench::new();
/// for n in 0..1000 {
///     let lease = table.lease(n, now + Duration::from_secs(n as u64));
///     table.insert(lease);
/// }
/// let started = std::time::Instant::now();
/// let expired = table.expire(now + Duration::from_secs(500), usize::MAX);
/// println!("expired {expired} leases in {:?}", started.elapsed());
/// assert_eq!(table.len(), 1000 - expired);
/// ```
pub struct LeaseTableBench {
    table: crate::lease_table::LeaseTable,
    role: std::sync::Arc<crate::role::CompiledRole>,
}

impl Default for LeaseTableBench {
    fn default() -> LeaseTableBench {
        LeaseTableBench::new()
    }
}

impl LeaseTableBench {
    /// An empty table.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::__bench::LeaseTableBench;
    /// use std::time::{Duration, SystemTime};
    ///
    /// let table = LeaseTableBench::new();
    /// assert!(table.is_empty());
    /// ```
    #[must_use]
    pub fn new() -> LeaseTableBench {
        let day = std::time::Duration::from_secs(86_400);
        let policy = crate::lease::LeasePolicy {
            default: day,
            max: day,
        };
        let role = crate::role::CompiledRole::compile("bench", crate::Role::new(), policy)
            .unwrap_or_else(|_| unreachable!("\"bench\" is a valid role name"));
        LeaseTableBench {
            table: crate::lease_table::LeaseTable::default(),
            role: std::sync::Arc::new(role),
        }
    }

    /// The lease `n` expiring at `expires_at`, as `creds` builds it before inserting it.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::__bench::LeaseTableBench;
    /// use std::time::{Duration, SystemTime};
    ///
    /// let table = LeaseTableBench::new();
    /// let lease = table.lease(7, SystemTime::now() + Duration::from_secs(60));
    /// assert!(lease.id().starts_with("postgresql/creds/bench/"));
    /// ```
    #[must_use]
    pub fn lease(&self, n: u128, expires_at: std::time::SystemTime) -> crate::Lease {
        let mut id = String::new();
        crate::credential::write_lease_id(&mut id, "bench", n);
        let issued = expires_at - std::time::Duration::from_secs(60);
        crate::Lease {
            id,
            role: "bench".into(),
            username: format!("bench-1764000000-{:016}", n % 10_000_000_000_000_000),
            issued_at: issued,
            expires_at,
            max_expires_at: expires_at + std::time::Duration::from_secs(3600),
            revocation_attempts: 0,
            last_error: None,
        }
    }

    /// Inserts a lease made by [`LeaseTableBench::lease`].
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::__bench::LeaseTableBench;
    /// use std::time::{Duration, SystemTime};
    ///
    /// let mut table = LeaseTableBench::new();
    /// let lease = table.lease(1, SystemTime::now() + Duration::from_secs(60));
    /// let id = lease.id().to_owned();
    /// table.insert(lease);
    /// assert!(table.contains(&id));
    /// ```
    pub fn insert(&mut self, lease: crate::Lease) {
        self.table.insert(lease, self.role.clone());
    }

    /// Whether lease `id` is in the table.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::__bench::LeaseTableBench;
    /// use std::time::{Duration, SystemTime};
    ///
    /// let mut table = LeaseTableBench::new();
    /// let lease = table.lease(1, SystemTime::now());
    /// assert!(!table.contains(lease.id()));
    /// ```
    #[must_use]
    pub fn contains(&self, id: &str) -> bool {
        self.table.get(id).is_some()
    }

    /// Moves lease `id`'s expiry, as `renew` does.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::__bench::LeaseTableBench;
    /// use std::time::{Duration, SystemTime};
    ///
    /// let mut table = LeaseTableBench::new();
    /// let now = SystemTime::now();
    /// let lease = table.lease(1, now);
    /// let id = lease.id().to_owned();
    /// table.insert(lease);
    /// assert!(table.renew(&id, now + Duration::from_secs(3600)));
    /// assert_eq!(table.expire(now, 10), 0); // no longer due
    /// ```
    pub fn renew(&mut self, id: &str, expires_at: std::time::SystemTime) -> bool {
        self.table.set_expiry(id, expires_at).is_some()
    }

    /// Claims up to `limit` leases due at `now` and removes them, as the sweeper does once their roles are
    /// dropped; returns how many.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::__bench::LeaseTableBench;
    /// use std::time::{Duration, SystemTime};
    ///
    /// let mut table = LeaseTableBench::new();
    /// let now = SystemTime::now();
    /// for n in 0..10 {
    ///     let lease = table.lease(n, now);
    ///     table.insert(lease);
    /// }
    /// assert_eq!(table.expire(now, 4), 4);
    /// assert_eq!(table.len(), 6);
    /// ```
    pub fn expire(&mut self, now: std::time::SystemTime, limit: usize) -> usize {
        let due = self.table.claim_due(now, limit);
        for lease in &due {
            self.table.remove(&lease.id);
        }
        due.len()
    }

    /// Removes lease `id`, as a revocation does.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::__bench::LeaseTableBench;
    /// use std::time::{Duration, SystemTime};
    ///
    /// let mut table = LeaseTableBench::new();
    /// let lease = table.lease(1, SystemTime::now() + Duration::from_secs(60));
    /// let id = lease.id().to_owned();
    /// table.insert(lease);
    /// assert!(table.remove(&id));
    /// assert!(!table.remove(&id));
    /// ```
    pub fn remove(&mut self, id: &str) -> bool {
        self.table.remove(id).is_some()
    }

    /// How many leases the table holds.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::__bench::LeaseTableBench;
    /// use std::time::{Duration, SystemTime};
    ///
    /// let mut table = LeaseTableBench::new();
    /// let lease = table.lease(1, SystemTime::now() + Duration::from_secs(60));
    /// table.insert(lease);
    /// assert_eq!(table.len(), 1);
    /// ```
    #[must_use]
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether the table is empty.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::__bench::LeaseTableBench;
    /// use std::time::{Duration, SystemTime};
    ///
    /// let table = LeaseTableBench::new();
    /// assert!(table.is_empty());
    /// ```
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.table.len() == 0
    }
}
