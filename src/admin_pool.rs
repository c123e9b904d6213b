//! The admin pool's connections: how a new one logs in, and how a broker whose server is away (restarting, full,
//! failing over) waits for it to come back without piling up connection attempts.
//!
//! r2d2 opens connections in the background: a checkout that finds no idle connection asks for one more (up to
//! the pool's size), and an attempt that fails is retried, forever, until it succeeds. While the server is away,
//! every checkout that times out therefore leaves one more attempt behind, so a broker soon has its whole pool
//! size of attempts waiting, and when the server is back they all log in at once. A fleet of brokers restarting
//! together then asks for `pool_size` × instances connections, more than the server has, and the brokers that
//! lost the race wait until the others' idle connections time out. So a broker makes one connection attempt at
//! a time ([`Reconnects`]): while one is under way or failing (and so to be retried), a checkout waits for it
//! instead of asking for another. Opening connections one by one costs a burst of work at most a few logins'
//! time, once; and after a long outage, the pool comes back at r2d2's next retry of the failing attempt (its
//! delay doubles up to half the connect timeout, plus up to a second of jitter) rather than at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use r2d2::{Pool, PooledConnection};

use crate::connection::Connection;
use crate::error::Error;
use crate::failover::Failover;

/// The admin pool's connection attempts: how many are under way, whether the last one failed (r2d2 then retries
/// it), and the last failure; and how many checkouts wait for a connection.
#[derive(Debug, Default)]
pub(crate) struct Reconnects {
    attempts: Mutex<Attempts>,
    /// Notified whenever an attempt ends.
    ended: Condvar,
    last_error: Mutex<Option<String>>,
    waiting: AtomicUsize,
}

#[derive(Debug, Default)]
struct Attempts {
    running: usize,
    failing: bool,
}

impl Attempts {
    /// Whether an attempt is under way or to be retried: a checkout waits for it rather than ask for another.
    fn pending(&self) -> bool {
        self.running > 0 || self.failing
    }
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

/// The longest a waiting checkout goes without looking for an idle connection (one may be returned by another
/// thread while no attempt ends).
const IDLE_POLL: Duration = Duration::from_millis(50);
/// How long a checkout gives r2d2 to put a connection that was just opened into the pool, before asking for
/// another: r2d2 adds it right after `connect` returns.
const HANDOVER: Duration = Duration::from_millis(2);

impl Reconnects {
    fn started(&self) {
        self.attempts.lock().running += 1;
    }

    fn ended(&self, result: Result<(), &Error>) {
        if let Err(error) = result {
            *self.last_error.lock() = Some(error.to_string());
        }
        {
            let mut attempts = self.attempts.lock();
            attempts.running = attempts.running.saturating_sub(1);
            attempts.failing = result.is_err();
        }
        self.ended.notify_all();
    }

    fn pending(&self) -> bool {
        self.attempts.lock().pending()
    }

    /// A connection from `pool` within `timeout`: an idle one, else one that the attempt under way (or being
    /// retried) opens, else a new attempt.
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
        let mut waited = false;
        loop {
            {
                let mut attempts = self.attempts.lock();
                if !attempts.pending() {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    drop(attempts);
                    let last = self.last_error.lock().clone();
                    return Err(format!(
                        "timed out waiting for connection{}",
                        last.map(|e| format!(": {e}")).unwrap_or_default()
                    ));
                }
                self.ended.wait_for(&mut attempts, IDLE_POLL.min(left));
                waited = true;
            }
            if let Some(connection) = pool.try_get() {
                return Ok(connection);
            }
        }
        if waited {
            // An attempt just succeeded: r2d2 is putting its connection in the pool.
            std::thread::sleep(HANDOVER.min(deadline.saturating_duration_since(Instant::now())));
            if let Some(connection) = pool.try_get() {
                return Ok(connection);
            }
        }
        pool.get_timeout(deadline.saturating_duration_since(Instant::now()))
            .map_err(|e| e.to_string())
    }

    /// A new connection for background work, unless an attempt is under way or failing, or a checkout waits
    /// (then that attempt, or the checkout's, will do, and the background work can wait for its next turn).
    pub(crate) fn new_connection(
        &self,
        pool: &Pool<AdminManager>,
    ) -> Option<PooledConnection<AdminManager>> {
        if self.pending() || self.waiting.load(Ordering::Acquire) > 0 {
            return None;
        }
        pool.get()
            .map_err(|e| log::debug!("could not open an idle admin connection: {e}"))
            .ok()
    }
}

/// The admin pool's connections: every new one logs in through [`Connection::connect`], so the password
/// provider is asked each time and the client certificate presented, and its server identity is read to notice
/// a failover.
pub(crate) struct AdminManager {
    pub(crate) connection: Connection,
    pub(crate) reconnects: Arc<Reconnects>,
    pub(crate) failover: Arc<Failover>,
}

impl r2d2::ManageConnection for AdminManager {
    type Connection = postgres::Client;
    type Error = Error;

    fn connect(&self) -> Result<postgres::Client, Error> {
        self.reconnects.started();
        let result = self.connection.connect().map(|mut client| {
            self.failover.check_new(&mut client);
            client
        });
        self.reconnects.ended(result.as_ref().map(drop));
        result
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
/// 400 ms, doubling up to half the connect timeout, with no jitter; it calls this handler on its worker thread
/// just before scheduling the retry, so sleeping here a random part of `max` (full jitter) spreads the
/// reconnects of a fleet whose server restarted, and of brokers refused with "too many clients".
#[derive(Debug)]
pub(crate) struct SpreadReconnects {
    pub(crate) max: Duration,
}

impl r2d2::HandleError<Error> for SpreadReconnects {
    fn handle_error(&self, error: Error) {
        log::warn!("could not open an admin connection ({error}); retrying");
        std::thread::sleep(crate::backoff::full_jitter(self.max));
    }
}
