//! Jittered backoff, shared by every retry path: revocation retries, a pool's renewal and rotation retries, the
//! admin pool's reconnects and the orphan sweep's schedule.
//!
//! After a server restart every broker of a fleet fails at the same moment; with plain doubling delays they
//! would all retry at the same moments too, each wave a burst of connections and logins on a server that is
//! just coming up. *Equal jitter* (half the delay fixed, half uniformly random) spreads the waves out while
//! keeping a floor, so a retry never comes at once after a failure.

use std::time::Duration;

/// The delay before retry number `attempt` (1-based): `first` doubled per earlier attempt, capped at `max`, then
/// equal jitter: uniformly random between half of that and all of it.
pub(crate) fn retry_delay(attempt: u32, first: Duration, max: Duration) -> Duration {
    let exponential = first
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(max);
    equal_jitter(exponential)
}

/// Uniformly random between half of `delay` and all of it.
pub(crate) fn equal_jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.5..=1.0))
}

/// Uniformly random between zero and `delay` (full jitter).
pub(crate) fn full_jitter(delay: Duration) -> Duration {
    delay.mul_f64(rand::random_range(0.0..=1.0))
}

/// A period spread by ±25% around `period`, so that instances started together do not stay in step.
pub(crate) fn spread(period: Duration) -> Duration {
    period.mul_f64(rand::random_range(0.75..=1.25))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_equal_jitter() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(300));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let d = retry_delay(1, first, max);
            assert!(d >= first / 2 && d <= first, "{d:?}");
            let fourth = retry_delay(4, first, max);
            assert!(
                fourth >= Duration::from_secs(4) && fourth <= Duration::from_secs(8),
                "{fourth:?}"
            );
            let capped = retry_delay(u32::MAX, first, max);
            assert!(capped >= max / 2 && capped <= max, "{capped:?}");
            seen.insert(d.as_millis());
            assert!(full_jitter(first) <= first);
            let s = spread(Duration::from_secs(60));
            assert!(
                s >= Duration::from_secs(45) && s <= Duration::from_secs(75),
                "{s:?}"
            );
        }
        assert!(seen.len() > 20, "delays are spread out: {seen:?}");
    }
}
