//! Exchange backoff: after a failed exchange, new exchanges wait an exponentially growing,
//! jittered delay (1 s doubling up to `max_backoff`), and requests arriving meanwhile are answered
//! at once with the last error. A success resets it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::exchange::AuthError;

/// The first backoff delay, before jitter.
pub const BACKOFF_START: Duration = Duration::from_secs(1);

/// The backoff state of one credential.
#[derive(Debug)]
pub struct Backoff {
    max: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    until: Option<Instant>,
    last: Option<Arc<AuthError>>,
}

/// No token: the exchange failed, or the credential is backing off after a failure.
#[derive(Debug, Clone)]
pub struct NoToken {
    /// The error of the last exchange.
    pub error: Arc<AuthError>,
    /// How long until a new exchange may run (the client's `Retry-After`).
    pub retry_after: Duration,
}

impl Backoff {
    /// A backoff that never waits longer than `max`.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Err` while an exchange must not run yet.
    pub fn check(&self, now: Instant) -> Result<(), NoToken> {
        let state = self.state();
        match (state.until, &state.last) {
            (Some(until), Some(error)) if now < until => Err(NoToken {
                error: error.clone(),
                retry_after: until - now,
            }),
            _ => Ok(()),
        }
    }

    /// Records a failed exchange; returns the delay before the next one may run.
    pub fn failed(&self, error: Arc<AuthError>, now: Instant) -> Duration {
        let mut state = self.state();
        let base = BACKOFF_START
            .saturating_mul(1u32 << state.failures.min(20))
            .min(self.max);
        // Equal jitter: between half the base and the base.
        let delay = base / 2 + (base / 2).mul_f64(rand::random::<f64>());
        state.failures = state.failures.saturating_add(1);
        state.until = Some(now + delay);
        state.last = Some(error);
        delay
    }

    /// Takes the fleet's step: the next failure waits as the `failures`-th in a row would.
    pub fn continue_from(&self, failures: u32) {
        self.state().failures = failures;
    }

    /// Holds exchanges back for `retry_after` after `error`, which another replica's exchange
    /// met (the fleet's shared backoff), without taking a step of this replica's own.
    pub fn adopt(&self, error: Arc<AuthError>, retry_after: Duration, now: Instant) {
        let mut state = self.state();
        state.until = Some(now + retry_after);
        state.last = Some(error);
    }

    /// Records a successful exchange: the next failure starts from [`BACKOFF_START`] again.
    pub fn succeeded(&self) {
        *self.state() = State::default();
    }

    /// Whether exchanges are held back now.
    pub fn active(&self, now: Instant) -> bool {
        self.check(now).is_err()
    }

    /// The error of the last failed exchange, if the last exchange failed.
    pub fn last_error(&self) -> Option<Arc<AuthError>> {
        self.state().last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error() -> Arc<AuthError> {
        Arc::new(AuthError::Timeout(Duration::from_secs(5)))
    }

    #[test]
    fn delays_double_with_jitter_up_to_the_cap_and_reset_on_success() {
        let b = Backoff::new(Duration::from_secs(8));
        let now = Instant::now();
        assert!(b.check(now).is_ok());
        let mut bases = Vec::new();
        for _ in 0..6 {
            let d = b.failed(error(), now);
            bases.push(d);
        }
        for (d, base) in bases.iter().zip([1, 2, 4, 8, 8, 8]) {
            let base = Duration::from_secs(base);
            assert!(
                *d >= base / 2 && *d <= base,
                "{d:?} not within [{:?}, {base:?}]",
                base / 2
            );
        }
        let refused = b.check(now).unwrap_err();
        assert!(refused.retry_after <= Duration::from_secs(8));
        assert!(b.check(now + Duration::from_secs(9)).is_ok());
        b.succeeded();
        assert!(b.check(now).is_ok());
        assert!(b.failed(error(), now) <= BACKOFF_START);
    }
}
