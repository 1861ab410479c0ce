//! A token source in a fleet: how it obtains a token through the fleet's shared cache
//! ([`crate::fleet`]) instead of exchanging on its own, and how it follows the fleet's
//! announcements.
//!
//! Local first: the warm path never gets here. When the local token is missing, due for
//! renewal or refused by the upstream, one atomic step in Redis says what to do: use the
//! fleet's token, obey the fleet's backoff, or take the lease and run the one exchange for the
//! fleet (publishing its outcome); otherwise wait for the lease holder's announcement, at most
//! the lease time per round. With Redis unreachable, the source exchanges alone, as without a
//! fleet.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::cache::Inner;
use super::exchange::{AuthCode, AuthError};
use super::token::Token;
use crate::fleet::{Acquired, Slot, unix_ms};

/// How much longer than one exchange's `timeout` a lease lasts: room for the Redis steps
/// around the exchange.
pub const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// The least life a token read from the fleet must have left to be taken (one due for
/// renewal is still taken; its keeper renews it at once).
const MIN_SHARED_LIFE: Duration = Duration::from_secs(1);

/// What a source asks of the fleet.
#[derive(Debug, Clone, Copy)]
pub(super) struct Want {
    /// Only a token expiring after this (Unix ms).
    min_expires_ms: u64,
    /// Only a fleet generation above this one (tokens at or below it were refused or replaced).
    above: u64,
}

impl Want {
    /// Any token with some life left.
    pub(super) fn usable() -> Self {
        Self {
            min_expires_ms: unix_ms() + MIN_SHARED_LIFE.as_millis() as u64,
            above: 0,
        }
    }

    /// A token newer than `token`: a renewal, or one a later exchange in the fleet made.
    pub(super) fn newer_than(token: &Token) -> Self {
        Self::above(token.fleet_generation())
    }

    /// Any usable token of a fleet generation above `refused`.
    pub(super) fn above(refused: Option<u64>) -> Self {
        Self {
            above: refused.unwrap_or(0),
            ..Self::usable()
        }
    }
}

/// The sealed content of a failed exchange, for the fleet's backoff.
#[derive(serde::Serialize, serde::Deserialize)]
struct Failure {
    /// The auth code of a refusal; `None` for a transient failure.
    code: Option<i64>,
    /// The refusal's message, or the failure's description.
    message: String,
    /// The refusal's `logUUID`.
    log_uuid: Option<String>,
}

impl Failure {
    fn of(error: &AuthError) -> Self {
        match error {
            AuthError::Rejected {
                code,
                message,
                log_uuid,
            } => Self {
                code: Some(code.code()),
                message: message.clone(),
                log_uuid: log_uuid.clone(),
            },
            other => Self {
                code: None,
                message: crate::ErrorChain(other).to_string(),
                log_uuid: None,
            },
        }
    }

    fn into_error(self) -> AuthError {
        match self.code {
            Some(code) => AuthError::Rejected {
                code: AuthCode::from_code(code),
                message: self.message,
                log_uuid: self.log_uuid,
            },
            None => AuthError::Elsewhere(self.message),
        }
    }
}

impl Inner {
    /// How long a lease lasts: one exchange and the Redis steps around it.
    fn lease_time(&self) -> Duration {
        self.exchanger.timeout() + LEASE_MARGIN
    }

    /// A token as `want` asks: alone, this replica's own exchange; in a fleet, the fleet's
    /// token or the outcome of the one exchange the fleet runs (see the module docs).
    pub(super) async fn obtain(&self, want: Want) -> Result<Token, Arc<AuthError>> {
        let Some(slot) = &self.fleet else {
            return self.exchange().await;
        };
        let mut want = want;
        // Never a token this replica saw refused, or the fleet announced dropped.
        want.above = want
            .above
            .max(self.refused())
            .max(slot.signals().invalidated());
        let lease_time = self.lease_time();
        // Two lease times: a holder that died lets its lease lapse within the first.
        let deadline = Instant::now() + 2 * lease_time;
        loop {
            // Listening before asking, so an announcement between the two is not missed.
            let mut news = pin!(slot.signals().news());
            news.as_mut().enable();
            let acquired = slot
                .acquire(want.min_expires_ms, want.above, lease_time)
                .await;
            match acquired {
                Err(_) => return self.exchange().await,
                Ok(Acquired::Token {
                    generation, record, ..
                }) => match self.adopt(generation, &record) {
                    Some(token) => {
                        self.settled.store(true, Ordering::Relaxed);
                        self.backoff.succeeded();
                        tracing::info!(
                            credential = %self.name,
                            generation = token.generation(),
                            fleet_generation = generation,
                            "token read from the fleet"
                        );
                        return Ok(token);
                    }
                    None => want.above = want.above.max(generation),
                },
                Ok(Acquired::BackingOff {
                    record,
                    retry_after,
                }) => {
                    let error = Arc::new(failure_from(&record));
                    self.backoff
                        .adopt(error.clone(), retry_after, Instant::now());
                    self.settled.store(true, Ordering::Relaxed);
                    return Err(error);
                }
                Ok(Acquired::Lease(lease)) => {
                    self.backoff.continue_from(lease.failures);
                    let generation = lease.generation;
                    return match self.exchange().await {
                        Ok(token) => {
                            let (record, expires_ms) = token.to_record();
                            match slot.publish(lease, expires_ms, &record).await {
                                Ok(()) => Ok(token.published_as(generation)),
                                Err(_) => Ok(token),
                            }
                        }
                        Err(error) => {
                            let delay = match self.backoff.check(Instant::now()) {
                                Err(no) => no.retry_after,
                                Ok(()) => Duration::ZERO,
                            };
                            let record = Zeroizing::new(
                                serde_json::to_vec(&Failure::of(&error)).unwrap_or_default(),
                            );
                            let _ = slot.publish_failure(lease, &record, delay).await;
                            Err(error)
                        }
                    };
                }
                Ok(Acquired::Busy) => {
                    let now = Instant::now();
                    if now >= deadline {
                        tracing::warn!(
                            credential = %self.name,
                            "no token from the fleet within two lease times; exchanging alone"
                        );
                        return self.exchange().await;
                    }
                    let wait = (deadline - now).min(lease_time);
                    let _ = tokio::time::timeout(wait, news).await;
                }
            }
        }
    }

    /// The fleet's token of `fleet_generation` as a local token: the current one if it is that
    /// very token (one token, one local generation, so a 401 drops it wherever it is held),
    /// else one rebuilt from its `record`.
    fn adopt(&self, fleet_generation: u64, record: &[u8]) -> Option<Token> {
        if fleet_generation <= self.refused() {
            return None;
        }
        if let Some(current) = self.current.load_full()
            && current.fleet_generation() == Some(fleet_generation)
        {
            return Some(Token::clone(&current));
        }
        Token::from_record(record, self.exchanger.next_generation(), fleet_generation)
    }

    /// The newest fleet generation this replica dropped: never taken from the fleet again.
    pub(super) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Marks `token`'s fleet generation as refused here, before it is dropped, so a cold
    /// request meanwhile does not read it back from the fleet.
    pub(super) fn refuse(&self, token: &Token) {
        if let Some(generation) = token.fleet_generation() {
            self.refused.fetch_max(generation, Ordering::Relaxed);
        }
    }

    /// Deletes `token` from the fleet if it is still the fleet's (a 401 or the admin API):
    /// compare and delete, announced to the other replicas.
    pub(super) async fn invalidate_in_fleet(&self, token: &Token) {
        self.refuse(token);
        if let (Some(slot), Some(generation)) = (&self.fleet, token.fleet_generation()) {
            let deleted = slot.invalidate_if(generation).await;
            tracing::debug!(credential = %self.name, generation, ?deleted, "fleet invalidate if current");
        }
    }

    /// Acts on what the fleet announced since the last look: a newer token is taken, a dropped
    /// one is dropped here too, and after Redis comes back the fleet converges on one token.
    pub(super) async fn follow_fleet(&self) {
        let Some(slot) = &self.fleet else { return };
        let signals = slot.signals();
        let current = self.current.load_full();
        let current_generation = current.as_ref().and_then(|t| t.fleet_generation());
        if let Some(token) = &current
            && let Some(g) = current_generation
            && signals.invalidated() >= g
        {
            tracing::debug!(credential = %self.name, fleet_generation = g, "dropped by the fleet");
            self.drop_if_current(token.generation()).await;
            return;
        }
        let rejoined = signals.take_rejoined();
        let newer = signals.announced() > current_generation.unwrap_or(0);
        if !(rejoined || newer) {
            return;
        }
        tracing::debug!(credential = %self.name, rejoined, newer, "following the fleet");
        let Some(current) = current else { return };
        // A token of this replica's own (from an outage) gives way to any the fleet holds.
        let in_fleet = current.fleet_generation().is_some();
        match self.read_fleet(slot, Want::newer_than(&current)).await {
            Ok(Some(token)) => self.install(Arc::new(token)).await,
            // Back after an outage, and the fleet has none: offer this one.
            Ok(None) if rejoined && !in_fleet => self.offer(slot, &current).await,
            _ => {}
        }
    }

    /// The fleet's token as `want` asks, read without taking the lease.
    async fn read_fleet(
        &self,
        slot: &Slot,
        want: Want,
    ) -> Result<Option<Token>, crate::fleet::Unreachable> {
        let read = slot
            .read(want.min_expires_ms, want.above.max(self.refused()))
            .await?;
        Ok(read.and_then(|(generation, record)| self.adopt(generation, &record)))
    }

    /// Publishes `token`, obtained while the fleet was unreachable, if this replica gets the
    /// lease; otherwise takes what the fleet has, waiting for the lease holder at most one
    /// lease time.
    async fn offer(&self, slot: &Slot, token: &Arc<Token>) {
        let lease_time = self.lease_time();
        let deadline = Instant::now() + lease_time;
        loop {
            let mut news = pin!(slot.signals().news());
            news.as_mut().enable();
            let want = Want::above(Some(self.refused()));
            match slot
                .acquire(want.min_expires_ms, want.above, lease_time)
                .await
            {
                Ok(Acquired::Lease(lease)) => {
                    let (record, expires_ms) = token.to_record();
                    let generation = lease.generation;
                    if slot.publish(lease, expires_ms, &record).await.is_ok() {
                        let published = Token::clone(token).published_as(generation);
                        self.install(Arc::new(published)).await;
                    }
                    return;
                }
                Ok(Acquired::Token {
                    generation, record, ..
                }) => {
                    if let Some(theirs) = self.adopt(generation, &record) {
                        self.install(Arc::new(theirs)).await;
                    }
                    return;
                }
                Ok(Acquired::Busy) if Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(deadline.into(), news).await;
                }
                _ => return,
            }
        }
    }
}

/// The error a failure record stands for (a record that does not read: a generic one).
fn failure_from(record: &[u8]) -> AuthError {
    serde_json::from_slice::<Failure>(record).map_or_else(
        |_| AuthError::Elsewhere("unreadable failure record".into()),
        Failure::into_error,
    )
}
