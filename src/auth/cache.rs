//! The token cache: one moka entry per credential, cold misses coalesced into one exchange,
//! background renewal ahead of expiry, and invalidation only of the token a 401 was answered for.
//!
//! In front of moka sits a lock-free snapshot of the current token ([`TokenSource::warm`]): the
//! request path reads it with one atomic load, where a moka `get` costs about 30 times that
//! (`docs/BENCHMARKS.md`). moka stays the one place tokens are made: every insert into it also
//! sets the snapshot, and every removal clears it (a 401's only if it names the same token).

use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;
use tokio::task::AbortHandle;

use super::backoff::{Backoff, NoToken};
use super::exchange::{AuthError, Exchanger};
use super::token::Token;
use crate::metrics::Metrics;

/// The largest share of the renewal lead added as random jitter, so fleets do not renew in step.
pub const RENEW_JITTER_FRACTION: f64 = 0.1;

/// The token source of one credential. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    exchanger: Exchanger,
    refresh_before: Duration,
    cache: Cache<(), Arc<Token>>,
    /// The token moka holds, for reading without moka.
    current: ArcSwapOption<Token>,
    renewer: Mutex<Option<AbortHandle>>,
    backoff: Backoff,
    exchanges: AtomicU64,
    last_log_uuid: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

/// Entries live until the token stops being usable.
struct UntilUnusable;

impl Expiry<(), Arc<Token>> for UntilUnusable {
    fn expire_after_create(&self, _: &(), token: &Arc<Token>, now: Instant) -> Option<Duration> {
        Some(token.usable_until().saturating_duration_since(now))
    }

    // moka would keep the old deadline on update; a renewed token brings its own.
    fn expire_after_update(
        &self,
        _: &(),
        token: &Arc<Token>,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(token.usable_until().saturating_duration_since(now))
    }
}

impl TokenSource {
    /// A source for credential `name`, renewing `refresh_before` ahead of expiry (plus jitter),
    /// backing off at most `max_backoff` between failed exchanges, recording into `metrics`.
    pub fn new(
        name: &str,
        exchanger: Exchanger,
        refresh_before: Duration,
        max_backoff: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                name: name.into(),
                exchanger,
                refresh_before,
                cache: Cache::builder()
                    .max_capacity(1)
                    .expire_after(UntilUnusable)
                    .build(),
                current: ArcSwapOption::empty(),
                renewer: Mutex::new(None),
                backoff: Backoff::new(max_backoff),
                exchanges: AtomicU64::new(0),
                last_log_uuid: Mutex::new(None),
                metrics,
            }),
        }
    }

    /// The credential's name.
    pub fn name(&self) -> &Arc<str> {
        &self.inner.name
    }

    /// A usable token: the cached one, or the result of the single exchange that all concurrent
    /// cold callers share. While the credential backs off after a failure, no exchange runs and
    /// the last error comes back at once.
    pub async fn token(&self) -> Result<Arc<Token>, NoToken> {
        if let Some(token) = self.inner.current.load_full()
            && Instant::now() < token.usable_until()
        {
            return Ok(token);
        }
        if let Some(token) = self.inner.cache.get(&()).await {
            return Ok(token);
        }
        let inner = &self.inner;
        inner.backoff.check(Instant::now())?;
        inner
            .cache
            .try_get_with((), async {
                let token = Arc::new(inner.exchange().await?);
                inner.schedule_renewal(&token);
                inner.current.store(Some(token.clone()));
                Ok::<_, Arc<AuthError>>(token)
            })
            .await
            .map_err(|error: Arc<Arc<AuthError>>| NoToken {
                retry_after: match inner.backoff.check(Instant::now()) {
                    Err(b) => b.retry_after,
                    Ok(()) => Duration::ZERO,
                },
                error: (*error).clone(),
            })
    }

    /// The current token's `Authorization` value and generation, if it is usable at `now`:
    /// the request path's warm lookup, with no await and no lock.
    pub fn warm(&self, now: Instant) -> Option<(HeaderValue, u64)> {
        let current = self.inner.current.load();
        let token = current.as_ref().filter(|t| now < t.usable_until())?;
        Some((token.header().clone(), token.generation()))
    }

    /// Whether exchanges are held back after a failure now.
    pub fn backing_off(&self) -> bool {
        self.inner.backoff.active(Instant::now())
    }

    /// The error of the last exchange, if it failed.
    pub fn last_error(&self) -> Option<Arc<AuthError>> {
        self.inner.backoff.last_error()
    }

    /// The cached token, if one is usable now. Never runs an exchange.
    pub async fn current(&self) -> Option<Arc<Token>> {
        self.inner.cache.get(&()).await
    }

    /// Drops the cached token if it is still generation `generation`: a later token, obtained
    /// meanwhile by a concurrent 401 or a renewal, is kept.
    pub async fn invalidate_if_current(&self, generation: u64) {
        let result = self
            .inner
            .cache
            .entry(())
            .and_compute_with(|entry| {
                let op = match entry {
                    Some(e) if e.value().generation() == generation => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
        self.inner.current.rcu(|current| match current {
            Some(t) if t.generation() == generation => None,
            other => other.clone(),
        });
        tracing::debug!(credential = %self.inner.name, generation, ?result, "invalidate if current");
    }

    /// Whether `other` is this very source (shares its cache).
    pub fn same_source(&self, other: &TokenSource) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Whether this source exchanges with exactly these secrets (compared in constant time).
    pub fn has_secrets(&self, secrets: &crate::config::CredentialSecrets) -> bool {
        self.inner
            .exchanger
            .has_secrets(&secrets.secret, &secrets.key)
    }

    /// How many exchanges this source has started.
    pub fn exchanges(&self) -> u64 {
        self.inner.exchanges.load(Ordering::Relaxed)
    }

    /// The auth server's `logUUID` from the last exchange that carried one.
    pub fn last_log_uuid(&self) -> Option<String> {
        self.inner
            .last_log_uuid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Runs an exchange now and makes its token current (admin `refresh`); the previous token
    /// is replaced at once.
    pub async fn refresh(&self) -> Result<Arc<Token>, Arc<AuthError>> {
        let token = Arc::new(self.inner.exchange().await?);
        self.inner.cache.insert((), token.clone()).await;
        self.inner.current.store(Some(token.clone()));
        self.inner.schedule_renewal(&token);
        Ok(token)
    }

    /// Drops the current token, whatever its generation (admin `invalidate`); the next request
    /// runs a cold exchange.
    pub async fn invalidate(&self) {
        self.inner.cache.invalidate(&()).await;
        self.inner.current.store(None);
        if let Some(task) = self
            .inner
            .renewer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }

    /// Runs one exchange outside the cache (for `tokengate token`).
    pub async fn exchange_once(&self) -> Result<Token, Arc<AuthError>> {
        self.inner.exchange().await
    }
}

impl Inner {
    /// Runs one exchange and records its outcome in the backoff.
    async fn exchange(&self) -> Result<Token, Arc<AuthError>> {
        self.exchanges.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.exchanger.exchange().await.map_err(Arc::new);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) if matches!(**e, AuthError::Rejected { .. }) => "rejected",
            Err(_) => "unavailable",
        };
        self.metrics
            .exchange(&self.name, outcome, started.elapsed());
        let log_uuid = match &result {
            Ok(token) => token.log_uuid(),
            Err(error) => error.log_uuid(),
        };
        if let Some(uuid) = log_uuid {
            *self.last_log_uuid.lock().unwrap_or_else(|e| e.into_inner()) = Some(uuid.to_owned());
        }
        match &result {
            Ok(token) => {
                self.backoff.succeeded();
                tracing::info!(
                credential = %self.name,
                generation = token.generation(),
                lifetime_s = token.lifetime().as_secs(),
                auth_log_uuid = token.log_uuid(),
                "token obtained"
                )
            }
            Err(error) => {
                let delay = self.backoff.failed(error.clone(), Instant::now());
                tracing::warn!(
                    credential = %self.name,
                    error = %crate::error::Chain(&**error),
                    auth_log_uuid = error.log_uuid(),
                    backoff_ms = delay.as_millis() as u64,
                    "token exchange failed"
                )
            }
        }
        result
    }

    /// When to renew `token`: `refresh_before` ahead of the end of its usable life, less jitter;
    /// at half its life when it lives less than twice `refresh_before`.
    fn renew_at(&self, token: &Token) -> Instant {
        let life = token.usable_until() - token.obtained_at();
        let lead = self.refresh_before.min(life / 2);
        let jitter = lead.mul_f64(rand::random::<f64>() * RENEW_JITTER_FRACTION);
        token.usable_until() - lead - jitter
    }

    /// Replaces the background renewal task with one that keeps `token` fresh.
    fn schedule_renewal(self: &Arc<Self>, token: &Arc<Token>) {
        let task = tokio::spawn(renew(Arc::downgrade(self), token.clone()));
        let previous = self
            .renewer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(task.abort_handle());
        if let Some(previous) = previous {
            previous.abort();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self
            .renewer
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

/// The renewal loop: before `token` runs out, exchange for a new one. On failure the current token
/// keeps serving; attempts follow the credential's backoff until the token is no longer usable,
/// then the cold path takes over (still under the same backoff).
async fn renew(source: Weak<Inner>, mut token: Arc<Token>) {
    loop {
        let Some(at) = source.upgrade().map(|s| s.renew_at(&token)) else {
            return;
        };
        tokio::time::sleep_until(at.into()).await;
        token = loop {
            let Some(inner) = source.upgrade() else {
                return;
            };
            match inner.exchange().await {
                Ok(fresh) => {
                    let fresh = Arc::new(fresh);
                    inner.cache.insert((), fresh.clone()).await;
                    inner.current.store(Some(fresh.clone()));
                    break fresh;
                }
                Err(_) => {
                    let now = Instant::now();
                    let wait = inner
                        .backoff
                        .check(now)
                        .err()
                        .map_or(Duration::ZERO, |b| b.retry_after);
                    if now + wait >= token.usable_until() {
                        tracing::warn!(credential = %inner.name, "renewal gave up; token lapses");
                        return;
                    }
                    drop(inner);
                    tokio::time::sleep(wait).await;
                }
            }
        };
    }
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("name", &self.inner.name)
            .field("exchanger", &self.inner.exchanger)
            .finish_non_exhaustive()
    }
}
