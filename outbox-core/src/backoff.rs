//! Exponential backoff with jitter.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff: the delay doubles with every failed attempt, from `base` up to `max`,
/// and half of it is random ("equal jitter") so relays that failed together do not retry together.
///
/// ```
/// use std::time::Duration;
/// use waybill_outbox_core::Backoff;
///
/// let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
/// let third = backoff.delay(3, &mut rand::rng());
/// assert!(third >= Duration::from_secs(2) && third <= Duration::from_secs(4));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

impl Backoff {
    /// A backoff from `base` (after the first failure) up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
        }
    }

    /// The delay after the `attempt`-th consecutive failure (1-based).
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        let full = self.base.saturating_mul(1 << doublings).min(self.max);
        let half = full / 2;
        let jitter_nanos = rng.random_range(0..=half.as_nanos().min(u128::from(u64::MAX)) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_jitter_and_stop_at_max() {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut rng = rand::rng();
        for attempt in 1..=40 {
            let full = Duration::from_millis(100)
                .saturating_mul(1 << (attempt - 1).min(31))
                .min(Duration::from_secs(1));
            let delay = backoff.delay(attempt, &mut rng);
            assert!(
                delay >= full / 2 && delay <= full,
                "attempt {attempt}: {delay:?}"
            );
        }
    }
}
