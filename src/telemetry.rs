//! Metrics through the `metrics` facade (feature `metrics`); without the feature every function here is empty.
//!
//! The names are listed in the crate documentation's "Metrics" section.
//!
//! `outcome` is `ok` or `error`. Everything is recorded with no lock of the broker held: counters as their
//! events are delivered, gauges after every change of the lease table and at each turn of the sweeper.

use std::time::Instant;

use crate::events::{Event, Stats};

/// When an operation started; `None` without the feature, so that no clock is read.
pub(crate) struct Started(#[cfg_attr(not(feature = "metrics"), allow(dead_code))] Option<Instant>);

/// The start of an operation to time.
pub(crate) fn start() -> Started {
    Started(cfg!(feature = "metrics").then(Instant::now))
}

/// Records the latency of a `creds` call for `role`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn creds_latency(role: &str, started: Started, ok: bool) {
    #[cfg(feature = "metrics")]
    if let Some(at) = started.0 {
        metrics::histogram!(
            "credbroker_creds_duration_seconds",
            "role" => role.to_owned(),
            "outcome" => outcome(ok)
        )
        .record(at.elapsed().as_secs_f64());
    }
}

/// Records the latency of a call into `histogram` (`RENEW`, `REVOKE`).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn latency(histogram: &'static str, started: Started, ok: bool) {
    #[cfg(feature = "metrics")]
    if let Some(at) = started.0 {
        metrics::histogram!(histogram, "outcome" => outcome(ok)).record(at.elapsed().as_secs_f64());
    }
}

/// The histogram of `renew` calls.
pub(crate) const RENEW: &str = "credbroker_renew_duration_seconds";
/// The histogram of `revoke` calls.
pub(crate) const REVOKE: &str = "credbroker_revoke_duration_seconds";

#[cfg(feature = "metrics")]
fn outcome(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "error"
    }
}

/// Counts a delivered event.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn event(event: &Event) {
    #[cfg(feature = "metrics")]
    {
        let role = |lease: &crate::Lease| lease.role().to_owned();
        match event {
            Event::Issued(e) => {
                metrics::counter!("credbroker_issued_total", "role" => role(&e.lease)).increment(1)
            }
            Event::Renewed(e) => {
                metrics::counter!("credbroker_renewed_total", "role" => role(&e.lease)).increment(1)
            }
            Event::Rotated(e) => {
                metrics::counter!("credbroker_rotated_total", "role" => role(&e.new)).increment(1)
            }
            Event::Revoked(e) => metrics::counter!(
                "credbroker_revoked_total",
                "role" => role(&e.lease),
                "cause" => e.cause.to_string()
            )
            .increment(1),
            Event::Expired(e) => {
                metrics::counter!("credbroker_expired_total", "role" => role(&e.lease)).increment(1)
            }
            Event::RevocationFailed(e) => metrics::counter!(
                "credbroker_revocation_failures_total",
                "role" => role(&e.lease)
            )
            .increment(1),
            Event::Adopted(e) => {
                metrics::counter!("credbroker_adopted_total", "role" => role(&e.lease)).increment(1)
            }
            Event::RoleDropped(e) => {
                metrics::counter!("credbroker_roles_dropped_total", "cause" => e.cause.to_string())
                    .increment(1)
            }
            Event::Lost(e) => {
                metrics::counter!("credbroker_lost_total", "role" => role(&e.lease)).increment(1)
            }
        }
    }
}

/// The roles whose `credbroker_leases` gauge has been set: set to zero when their last lease goes.
#[derive(Debug, Default)]
pub(crate) struct Gauges {
    #[cfg(feature = "metrics")]
    roles: parking_lot::Mutex<std::collections::BTreeSet<String>>,
}

impl Gauges {
    /// Whether the gauges are recorded at all (else the caller need not take `stats`).
    pub(crate) const ON: bool = cfg!(feature = "metrics");

    /// Sets the gauges from `stats`.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn set(&self, stats: &Stats) {
        #[cfg(feature = "metrics")]
        {
            let gone: Vec<String> = {
                let mut roles = self.roles.lock();
                let gone = roles
                    .iter()
                    .filter(|r| !stats.live.contains_key(*r))
                    .cloned()
                    .collect();
                roles.retain(|r| stats.live.contains_key(r));
                roles.extend(stats.live.keys().cloned());
                gone
            };
            for role in gone {
                metrics::gauge!("credbroker_leases", "role" => role).set(0.0);
            }
            for (role, live) in &stats.live {
                metrics::gauge!("credbroker_leases", "role" => role.clone()).set(*live as f64);
            }
            metrics::gauge!("credbroker_sweeper_lag_seconds").set(stats.sweeper_lag.as_secs_f64());
        }
    }
}
