//! The token cache: one moka entry per credential, cold misses coalesced into one exchange,
//! background renewal ahead of expiry, and invalidation only of the token a 401 was answered for.
//!
//! One background task per credential, its keeper ([`TokenSource::keep_warm`]), renews the
//! token ahead of expiry. For a credential a route uses it also fetches the first token without
//! waiting for traffic, fetches again at once after an invalidation, and keeps retrying under the
//! backoff through an outage, so readiness never waits on a request that cannot arrive.
//!
//! In front of moka sits a lock-free snapshot of the current token ([`TokenSource::warm`]): the
//! request path reads it with one atomic load, far cheaper than a moka `get`
//! (`docs/BENCHMARKS.md`). moka stays the one place tokens are made: every insert into it also
//! sets the snapshot, and every removal clears it (a 401's only if it names the same token).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::HeaderValue;

use moka::Expiry;
use moka::future::Cache;
use moka::ops::compute::Op;
use secrecy::SecretString;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::backoff::{Backoff, NoToken};
use super::crypto::EncryptionKey;
use super::exchange::{AuthError, Exchanger};
use super::shared::Want;
use super::token::Token;
use crate::fleet::Slot;
use crate::metrics::Metrics;

/// The largest share of the renewal lead added as random jitter, so fleets do not renew in step.
pub const RENEW_JITTER_FRACTION: f64 = 0.1;

/// The shortest pause of a keeper between two attempts to fetch a missing token.
const KEEPER_MIN_PAUSE: Duration = Duration::from_millis(100);

/// A credential as readiness sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// It holds a usable token.
    Ready,
    /// No exchange has answered yet since start or since the last invalidation.
    Warming,
    /// It holds no token and its last exchange failed; the keeper retries under the backoff.
    Failing,
}

/// The token source of one credential. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) name: Arc<str>,
    pub(super) exchanger: Exchanger,
    refresh_before: Duration,
    cache: Cache<(), Arc<Token>>,
    /// The token moka holds, for reading without moka.
    pub(super) current: ArcSwapOption<Token>,
    /// The keeper task, if one was started.
    keeper: Mutex<Option<AbortHandle>>,
    /// Tells the keeper the token was replaced or dropped, so it plans again.
    wake: Arc<Notify>,
    /// A route uses this credential: its keeper fetches without traffic and never gives up.
    kept_warm: AtomicBool,
    /// An exchange has answered (either way) since the keeper started or the last invalidation.
    pub(super) settled: AtomicBool,
    pub(super) backoff: Backoff,
    exchanges: AtomicU64,
    last_log_uuid: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
    /// The credential's place in the fleet's shared cache, if it shares its token.
    pub(super) fleet: Option<Slot>,
    /// The newest fleet generation dropped here ([`super::shared`]).
    pub(super) refused: AtomicU64,
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
    /// backing off at most `max_backoff` between failed exchanges, recording into `metrics`;
    /// sharing its token through `fleet`, if given ([`super::shared`]).
    pub fn new(
        name: &str,
        exchanger: Exchanger,
        refresh_before: Duration,
        max_backoff: Duration,
        metrics: Arc<Metrics>,
        fleet: Option<Slot>,
    ) -> Self {
        let wake = Arc::new(Notify::new());
        if let Some(slot) = &fleet {
            slot.wake_on_news(wake.clone());
        }
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
                keeper: Mutex::new(None),
                wake,
                kept_warm: AtomicBool::new(false),
                settled: AtomicBool::new(false),
                backoff: Backoff::new(max_backoff),
                exchanges: AtomicU64::new(0),
                last_log_uuid: Mutex::new(None),
                metrics,
                fleet,
                refused: AtomicU64::new(0),
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
                let token = Arc::new(inner.obtain(Want::usable()).await?);
                inner.current.store(Some(token.clone()));
                Ok::<_, Arc<AuthError>>(token)
            })
            .await
            .inspect(|_| self.ensure_keeper(Duration::ZERO))
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
    /// meanwhile by a concurrent 401 or a renewal, is kept. In a fleet, the fleet's copy goes
    /// too, if it is still that token.
    pub async fn invalidate_if_current(&self, generation: u64) {
        let current = self.inner.current.load_full();
        let refused = current.filter(|t| t.generation() == generation);
        if let Some(token) = &refused {
            self.inner.refuse(token);
        }
        self.inner.drop_if_current(generation).await;
        if let Some(token) = refused {
            self.inner.invalidate_in_fleet(&token).await;
        }
    }

    /// Whether `other` is this very source (shares its cache).
    pub fn same_source(&self, other: &TokenSource) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Whether this source exchanges with exactly these secrets (compared in constant time).
    pub fn has_secrets(&self, secret: &SecretString, key: &EncryptionKey) -> bool {
        self.inner.exchanger.has_secrets(secret, key)
    }

    /// Whether this source shares its token with a fleet (`[shared_cache]`).
    pub fn shared(&self) -> bool {
        self.inner.fleet.is_some()
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
        let current = self.inner.current.load_full();
        if let Some(token) = &current {
            self.inner.invalidate_in_fleet(token).await;
        }
        let refused = current.and_then(|t| t.fleet_generation());
        let token = Arc::new(self.inner.obtain(Want::above(refused)).await?);
        self.inner.install(token.clone()).await;
        self.ensure_keeper(Duration::ZERO);
        Ok(token)
    }

    /// Drops the current token, whatever its generation (admin `invalidate`). A credential a
    /// route uses fetches a new one at once; others wait for the next request.
    pub async fn invalidate(&self) {
        if let Some(token) = self.inner.current.load_full() {
            self.inner.invalidate_in_fleet(&token).await;
        }
        self.inner.settled.store(false, Ordering::Relaxed);
        self.inner.cache.invalidate(&()).await;
        self.inner.current.store(None);
        self.inner.wake.notify_one();
    }

    /// Marks this credential as one a route uses, and starts its keeper after `delay` if it
    /// has none: the token is fetched without waiting for traffic, fetched again right after
    /// an invalidation, and retried under the backoff until one is obtained.
    pub fn keep_warm(&self, delay: Duration) {
        self.inner.kept_warm.store(true, Ordering::Relaxed);
        self.ensure_keeper(delay);
    }

    /// Marks this credential as one no route uses any more: its keeper still renews a token
    /// it holds, but stops once the token lapses.
    pub fn stop_keeping_warm(&self) {
        self.inner.kept_warm.store(false, Ordering::Relaxed);
    }

    /// What readiness sees of this credential now.
    pub fn readiness(&self) -> Readiness {
        if self.inner.usable(Instant::now()).is_some() {
            Readiness::Ready
        } else if self.inner.settled.load(Ordering::Relaxed) {
            Readiness::Failing
        } else {
            Readiness::Warming
        }
    }

    /// Starts the keeper after `delay` unless one is running.
    fn ensure_keeper(&self, delay: Duration) {
        let mut keeper = self.inner.keeper.lock().unwrap_or_else(|e| e.into_inner());
        if keeper.as_ref().is_some_and(|task| !task.is_finished()) {
            return;
        }
        let task = tokio::spawn(keep(
            Arc::downgrade(&self.inner),
            self.inner.wake.clone(),
            delay,
        ));
        *keeper = Some(task.abort_handle());
    }

    /// Runs one exchange outside the cache (for `tokengate token`).
    pub async fn exchange_once(&self) -> Result<Token, Arc<AuthError>> {
        self.inner.exchange().await
    }
}

impl Inner {
    /// Drops the cached token if it is still generation `generation`, and tells the keeper.
    pub(super) async fn drop_if_current(&self, generation: u64) {
        let result = self
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
        self.current.rcu(|current| match current {
            Some(t) if t.generation() == generation => None,
            other => other.clone(),
        });
        self.wake.notify_one();
        tracing::debug!(credential = %self.name, generation, ?result, "invalidate if current");
    }

    /// Runs one exchange and records its outcome in the backoff.
    pub(super) async fn exchange(&self) -> Result<Token, Arc<AuthError>> {
        self.exchanges.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.exchanger.exchange().await.map_err(Arc::new);
        self.settled.store(true, Ordering::Relaxed);
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
                    error = %crate::ErrorChain(&**error),
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

    /// Makes `token` the current one, in moka and in the snapshot, and tells the keeper.
    pub(super) async fn install(&self, token: Arc<Token>) {
        self.cache.insert((), token.clone()).await;
        self.current.store(Some(token));
        self.wake.notify_one();
    }

    /// Renews `token` if the backoff lets an exchange run at `now`; the pause before the next
    /// attempt, if there is to be one (`None` once a fresh token is installed).
    async fn renew(&self, token: &Token, now: Instant) -> Option<Duration> {
        if let Err(wait) = self.backoff.check(now) {
            return Some(wait.retry_after);
        }
        match self.obtain(Want::newer_than(token)).await {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                self.cache.insert((), fresh.clone()).await;
                self.current.store(Some(fresh));
                None
            }
            Err(_) => {
                let wait = self.backoff.check(Instant::now()).err();
                let wait = wait.map_or(KEEPER_MIN_PAUSE, |b| b.retry_after);
                if Instant::now() + wait >= token.usable_until() {
                    tracing::warn!(credential = %self.name, "renewal failed; the token lapses");
                }
                Some(wait)
            }
        }
    }

    /// The current token, if it is usable at `now`.
    fn usable(&self, now: Instant) -> Option<Arc<Token>> {
        self.current
            .load_full()
            .filter(|token| now < token.usable_until())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let keeper = self.keeper.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = keeper.take() {
            task.abort();
        }
    }
}

/// The keeper: renews the token before it runs out; on a failed renewal the current token keeps
/// serving and attempts follow the backoff. Without a usable token, a credential a route uses
/// runs the cold exchange (shared with any request waiting for it) and retries under the
/// backoff; any other credential's keeper ends there. `wake` makes it plan again at once (the
/// token was replaced or dropped). It holds its source weakly, so a source dropped by a reload
/// ends it.
async fn keep(source: Weak<Inner>, wake: Arc<Notify>, delay: Duration) {
    tokio::time::sleep(delay).await;
    // When to renew which token: planned once per token, so that its jitter is drawn once.
    let mut plan: Option<(u64, Instant)> = None;
    loop {
        let Some(inner) = source.upgrade() else {
            return;
        };
        inner.follow_fleet().await;
        let now = Instant::now();
        let pause = match inner.usable(now) {
            Some(token) => {
                let at = match plan {
                    Some((generation, at)) if generation == token.generation() => at,
                    _ => inner.renew_at(&token),
                };
                plan = Some((token.generation(), at));
                if now < at {
                    Some(at - now)
                } else {
                    inner.renew(&token, now).await
                }
            }
            None if !inner.kept_warm.load(Ordering::Relaxed) => return,
            None => {
                let cold = TokenSource {
                    inner: inner.clone(),
                };
                match cold.token().await {
                    Ok(_) => None,
                    Err(no) => Some(no.retry_after.max(KEEPER_MIN_PAUSE)),
                }
            }
        };
        drop(inner);
        if let Some(pause) = pause {
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = wake.notified() => {}
            }
        }
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
