//! When requests may go: the client-side rate limit (evenly spaced slots, so that no window
//! of a minute holds more than the allowed number), and the wait before a retry (exponential
//! backoff with jitter, or what the server's `Retry-After` says).

use rand::Rng;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Hands out send times at least `60 s / requests_per_minute` apart.
pub struct RateLimiter {
    interval: Option<Duration>,
    next: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A limiter of `per_minute` requests a minute; 0 limits nothing.
    pub fn new(per_minute: u32) -> RateLimiter {
        let interval = (per_minute > 0).then(|| Duration::from_secs_f64(60.0 / f64::from(per_minute)));
        RateLimiter { interval, next: Mutex::new(None) }
    }

    /// Books the first free slot at or after `now` and returns it. Slots are `interval`
    /// apart, so any minute-long window holds at most `per_minute` of them.
    pub fn reserve(&self, now: Instant) -> Instant {
        let Some(interval) = self.interval else { return now };
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let slot = next.map_or(now, |n| n.max(now));
        *next = Some(slot + interval);
        slot
    }

    /// Waits for the next slot.
    pub fn acquire(&self) {
        let slot = self.reserve(Instant::now());
        let now = Instant::now();
        if slot > now {
            std::thread::sleep(slot - now);
        }
    }
}

/// The wait before retry number `retry` (0 for the first): `initial · 2^retry` capped at
/// `max`, of which a random half is taken off (so that clients that failed together do not
/// retry together). `unit` in [0, 1) is the random draw.
pub fn backoff_delay(retry: u32, initial: Duration, max: Duration, unit: f64) -> Duration {
    let full = initial.saturating_mul(1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX)).min(max);
    full.mul_f64(1.0 - 0.5 * unit.clamp(0.0, 1.0))
}

/// A random backoff for retry number `retry`.
pub(crate) fn jittered(retry: u32, initial: Duration, max: Duration) -> Duration {
    backoff_delay(retry, initial, max, rand::rng().random::<f64>())
}

/// The wait a `Retry-After` header asks for: seconds (`120`, `1.5`) or an HTTP date, measured
/// from `now`. Unreadable values give `None`; dates in the past give zero.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_takes_at_most_half() {
        let (i, m) = (Duration::from_millis(100), Duration::from_millis(1000));
        let full: Vec<u128> = (0..6).map(|r| backoff_delay(r, i, m, 0.0).as_millis()).collect();
        assert_eq!(full, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff_delay(2, i, m, 0.999_999).as_millis(), 200);
        assert_eq!(backoff_delay(40, i, m, 0.0), m, "no overflow on many retries");
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0.25 ", now), Some(Duration::from_millis(250)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }
}
