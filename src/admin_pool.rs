//! The admin pool's connections: how a new one logs in, and how a broker whose server is away (restarting, full,
//! failing over) waits for it to come back without piling up connection attempts.
//!
//! r2d2 opens connections in the background: a checkout that finds no idle connection asks for one more (up to
//! the pool's size), and an attempt that fails is retried, forever, until it succeeds. While the server is away,
//! every checkout that times out therefore leaves one more attempt behind, so a broker soon has its whole pool
//! size of attempts waiting, and when the server is back they all log in at once. A fleet of brokers restarting
//! together then asks for `pool_size` × instances connections, more than the server has, and the brokers that
//! lost the race wait until the others' idle connections time out. So while attempts are failing, checkouts
//! wait for the attempt already under way instead of asking for more ([`Reconnects`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use r2d2::{Pool, PooledConnection};

use crate::connection::Connection;
use crate::error::Error;

/// Whether the admin pool's connection attempts are failing, and the last failure. Set by [`SpreadReconnects`]
/// (r2d2 retries each failed attempt, so while this is set an attempt is under way) and cleared by
/// [`AdminManager::connect`] on success. Also how many checkouts are waiting: while one is, r2d2 has an attempt
/// under way for it, and background work (keeping a connection at rest, the failover probe) asks for no more.
#[derive(Debug, Default)]
pub(crate) struct Reconnects {
    failing: AtomicBool,
    last_error: Mutex<Option<String>>,
    waiting: AtomicUsize,
}

/// Counts a checkout as waiting while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Waiting<'a> {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How often a checkout waiting for a reconnect looks for the new connection.
const RECONNECT_POLL: Duration = Duration::from_millis(50);

impl Reconnects {
    fn failed(&self, error: &Error) {
        *self.last_error.lock() = Some(error.to_string());
        self.failing.store(true, Ordering::Release);
    }

    fn succeeded(&self) {
        self.failing.store(false, Ordering::Release);
    }

    fn failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// A connection from `pool` within `timeout`. While attempts are failing, only waits for one to succeed
    /// (taking an idle connection as soon as one appears) rather than asking r2d2 for another attempt; once
    /// they succeed again, a checkout as usual.
    pub(crate) fn checkout(
        &self,
        pool: &Pool<AdminManager>,
        timeout: Duration,
    ) -> Result<PooledConnection<AdminManager>, String> {
        if let Some(connection) = pool.try_get() {
            return Ok(connection);
        }
        let _waiting = Waiting::new(&self.waiting);
        let deadline = Instant::now() + timeout;
        while self.failing() {
            if let Some(connection) = pool.try_get() {
                return Ok(connection);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let last = self.last_error.lock().clone();
                return Err(format!(
                    "timed out waiting for connection{}",
                    last.map(|e| format!(": {e}")).unwrap_or_default()
                ));
            }
            std::thread::sleep(crate::backoff::equal_jitter(RECONNECT_POLL).min(left));
        }
        pool.get_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|e| e.to_string())
    }

    /// A new connection for background work, unless attempts are failing or a checkout is waiting (then the
    /// attempt under way will do, and the background work can wait for its next turn).
    pub(crate) fn new_connection(
        &self,
        pool: &Pool<AdminManager>,
    ) -> Option<PooledConnection<AdminManager>> {
        if self.failing() || self.waiting.load(Ordering::Acquire) > 0 {
            return None;
        }
        pool.get()
            .map_err(|e| log::debug!("could not open an idle admin connection: {e}"))
            .ok()
    }
}

/// The admin pool's connections: every new one logs in through [`Connection::connect`], so the password
/// provider is asked each time and the client certificate presented.
pub(crate) struct AdminManager {
    pub(crate) connection: Connection,
    pub(crate) reconnects: Arc<Reconnects>,
}

impl r2d2::ManageConnection for AdminManager {
    type Connection = postgres::Client;
    type Error = Error;

    fn connect(&self) -> Result<postgres::Client, Error> {
        let client = self.connection.connect()?;
        self.reconnects.succeeded();
        Ok(client)
    }

    fn is_valid(&self, client: &mut postgres::Client) -> Result<(), Error> {
        client.simple_query("").map(drop).map_err(|e| {
            Error::postgres(
                crate::error::ErrorKind::Connection,
                "an admin connection failed",
                e,
                &[],
            )
        })
    }

    fn has_broken(&self, client: &mut postgres::Client) -> bool {
        client.is_closed()
    }
}

/// The most a failed admin connection attempt adds to r2d2's delay before the next.
pub(crate) const RECONNECT_JITTER: Duration = Duration::from_secs(1);

/// The admin pool's handler of failed connection attempts. r2d2 retries a failed attempt in the background after
/// 200 ms, doubling up to half the connect timeout, with no jitter; it calls this handler on its worker thread
/// just before scheduling the retry, so sleeping here a random part of `max` (full jitter) spreads the
/// reconnects of a fleet whose server restarted, and of brokers refused with "too many clients". It also marks
/// the attempts failing, so checkouts wait for the retry instead of asking for more.
#[derive(Debug)]
pub(crate) struct SpreadReconnects {
    pub(crate) max: Duration,
    pub(crate) reconnects: Arc<Reconnects>,
}

impl r2d2::HandleError<Error> for SpreadReconnects {
    fn handle_error(&self, error: Error) {
        self.reconnects.failed(&error);
        log::warn!("could not open an admin connection ({error}); retrying");
        std::thread::sleep(crate::backoff::full_jitter(self.max));
    }
}
