//! The fleet's shared token cache: replicas of tokengate share each credential's token through
//! Redis, so a fleet makes one exchange where each replica would make its own.
//!
//! Per credential, one [`Slot`] over four keys that share a hash tag (so Redis Cluster keeps
//! them on one node) and one channel:
//!
//! - `token`: a hash of the fleet generation `g`, the expiry `e` (Unix ms) and the sealed
//!   record `s`; it expires with the token;
//! - `lease`: who runs the exchange now (set if absent, with an expiry, so a dead holder's
//!   lease lapses);
//! - `generation`: the fleet's counter, one step per lease (and never below the time in ms, so
//!   it keeps rising across a restart of a Redis without persistence);
//! - `backoff`, `failures`: the shared backoff after a failed exchange, and its step;
//! - the channel announces `token G`, `invalidated G` and `failed`, so waiting replicas wake on
//!   a notification, not by polling.
//!
//! Every value is sealed with AES-256-GCM under `encryption_key`, with the credential's
//! identity, the generation and the expiry as associated data ([`seal`]): a dump of Redis
//! holds no token, and one credential's entry cannot stand in for another's. Each decision
//! (use the token, obey the backoff, take the lease, or wait) is one Lua script, so it is
//! atomic. Every operation is bounded by `timeout`; past it, or with Redis unreachable, the
//! caller acts alone ([`Unreachable`]) and the fleet is marked down until Redis answers again.
//! What a record holds, and when to use which step, is the token cache's business
//! ([`crate::auth::cache`]); this module only stores, seals and announces.

pub mod seal;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ProtocolVersion, PushInfo, PushKind, Script, Value};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use zeroize::Zeroizing;

use self::seal::SealingKey;
use crate::metrics::Metrics;

/// How often a fleet marked down tries Redis again.
pub const REJOIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The longest a replica waits for reconnection attempts between two commands; the commands
/// themselves stay bounded by `timeout`.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// How long the shared failure count outlives the last failure, so the backoff schedule
/// survives between failures but not forever.
const FAILURES_KEPT: Duration = Duration::from_secs(3600);

/// What a replica needs to reach the fleet's Redis.
pub struct FleetSettings {
    /// `redis://` or `rediss://` URL, without a password.
    pub url: String,
    /// The ACL user, if any.
    pub username: Option<String>,
    /// The password, if any.
    pub password: Option<SecretString>,
    /// Seals every value.
    pub key: SealingKey,
    /// Prepended to every key and channel.
    pub key_prefix: String,
    /// The deadline of one Redis operation.
    pub timeout: Duration,
}

/// Why the fleet cannot be set up.
#[derive(Debug, thiserror::Error)]
#[error("shared cache: {0}")]
pub struct FleetError(#[source] redis::RedisError);

/// Redis did not answer within `timeout`, or failed: this replica acts alone for this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the shared cache did not answer")]
pub struct Unreachable;

/// The connection to the fleet's Redis, shared by every credential's [`Slot`]. Cheap to clone.
#[derive(Clone)]
pub struct Fleet {
    inner: Arc<FleetInner>,
}

struct FleetInner {
    redis: ConnectionManager,
    key: SealingKey,
    prefix: String,
    timeout: Duration,
    /// This replica's name in leases (random per process).
    replica: String,
    /// Whether the last operation got an answer.
    up: AtomicBool,
    /// The slots listening on each channel.
    listeners: Arc<Mutex<HashMap<Vec<u8>, Weak<Signals>>>>,
    /// The probe that runs while Redis is down, if one does.
    probing: AtomicBool,
    metrics: Arc<Metrics>,
}

/// What a slot's channel has announced, for the token cache.
#[derive(Debug, Default)]
pub struct Signals {
    /// Woken on every announcement: replicas waiting for another's exchange.
    news: Notify,
    /// The newest generation announced as a token.
    announced: AtomicU64,
    /// The newest generation announced as invalidated.
    invalidated: AtomicU64,
    /// The keeper of the slot's credential, woken to act on an announcement.
    keeper: Mutex<Option<Arc<Notify>>>,
    /// Set when the fleet comes back after being down: the keeper converges on one token.
    rejoined: AtomicBool,
}

impl Signals {
    /// Ready at the next announcement (enable it before asking, not to miss one).
    pub fn news(&self) -> tokio::sync::futures::Notified<'_> {
        self.news.notified()
    }

    /// The newest fleet generation announced as a token.
    pub fn announced(&self) -> u64 {
        self.announced.load(Ordering::Relaxed)
    }

    /// The newest fleet generation announced as invalidated.
    pub fn invalidated(&self) -> u64 {
        self.invalidated.load(Ordering::Relaxed)
    }

    /// Whether the fleet came back since the last call.
    pub fn take_rejoined(&self) -> bool {
        self.rejoined.swap(false, Ordering::Relaxed)
    }

    fn wake_keeper(&self) {
        if let Some(keeper) = &*self.keeper.lock().unwrap_or_else(|e| e.into_inner()) {
            keeper.notify_one();
        }
    }
}

/// The scripts, each one atomic decision over one credential's keys.
struct Scripts {
    acquire: Script,
    publish: Script,
    fail: Script,
    release: Script,
    invalidate: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        // KEYS token, backoff, lease, generation, failures; ARGV min expiry (ms), generation it
        // must be above, owner, lease time (ms), now (ms). A usable token, else the backoff,
        // else the lease. Generations are at least the time in ms, so they keep rising when a
        // Redis without persistence restarts empty.
        acquire: Script::new(
            r"
local t = redis.call('HMGET', KEYS[1], 'g', 'e', 's')
if t[1] and t[3] and tonumber(t[2]) > tonumber(ARGV[1]) and tonumber(t[1]) > tonumber(ARGV[2]) then
  return {'token', t[1], t[2], t[3]}
end
local b = redis.call('GET', KEYS[2])
if b then return {'backoff', b, redis.call('PTTL', KEYS[2])} end
if redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4]) then
  local g = math.max(tonumber(redis.call('GET', KEYS[4]) or '0') + 1, tonumber(ARGV[5]))
  redis.call('SET', KEYS[4], string.format('%d', g))
  return {'lease', string.format('%d', g), redis.call('GET', KEYS[5]) or '0'}
end
return {'busy'}
",
        ),
        // KEYS token, lease, backoff, failures; ARGV owner, generation, expiry (ms), sealed,
        // lifetime (ms), channel. A newer generation already stored is kept.
        publish: Script::new(
            r"
local g = tonumber(redis.call('HGET', KEYS[1], 'g') or '0')
if g <= tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'g', ARGV[2], 'e', ARGV[3], 's', ARGV[4])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('PUBLISH', ARGV[6], 'token ' .. ARGV[2])
end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return g <= tonumber(ARGV[2]) and 1 or 0
",
        ),
        // KEYS backoff, lease, failures; ARGV owner, sealed, delay (ms), channel, failures kept (ms).
        fail: Script::new(
            r"
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[4], 'failed')
return 1
",
        ),
        // KEYS lease; ARGV owner, channel.
        release: Script::new(
            r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'released')
end
return 1
",
        ),
        // KEYS token; ARGV generation, channel. Compare and delete.
        invalidate: Script::new(
            r"
if redis.call('HGET', KEYS[1], 'g') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'invalidated ' .. ARGV[1])
  return 1
end
return 0
",
        ),
    })
}

impl Fleet {
    /// Sets up the connection to `settings.url` (made at the first command, and made again
    /// whenever it breaks). Fails only on settings Redis cannot use.
    pub fn new(settings: FleetSettings, metrics: Arc<Metrics>) -> Result<Self, FleetError> {
        let info = redis::IntoConnectionInfo::into_connection_info(settings.url.as_str())
            .map_err(FleetError)?;
        let mut redis_settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        if let Some(user) = &settings.username {
            redis_settings = redis_settings.set_username(user);
        }
        if let Some(password) = &settings.password {
            redis_settings = redis_settings.set_password(password.expose_secret());
        }
        let info = info.set_redis_settings(redis_settings);
        let client = redis::Client::open(info).map_err(FleetError)?;
        let listeners: Arc<Mutex<HashMap<Vec<u8>, Weak<Signals>>>> = Arc::default();
        let dispatch = listeners.clone();
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(RECONNECT_MAX_DELAY)
            .set_push_sender(move |push: PushInfo| {
                announce(&dispatch, push);
                Ok::<(), std::convert::Infallible>(())
            })
            .set_automatic_resubscription();
        let redis = ConnectionManager::new_lazy_with_config(client, config).map_err(FleetError)?;
        Ok(Self {
            inner: Arc::new(FleetInner {
                redis,
                key: settings.key,
                prefix: settings.key_prefix,
                timeout: settings.timeout,
                replica: format!("{:016x}", rand::random::<u64>()),
                up: AtomicBool::new(true),
                listeners,
                probing: AtomicBool::new(false),
                metrics,
            }),
        })
    }

    /// Whether Redis answered the last operation.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// Asks Redis for a `PONG` within `timeout` (for `tokengate check` and the rejoin probe).
    pub async fn ping(&self) -> Result<(), Unreachable> {
        let mut cmd = redis::cmd("PING");
        self.inner
            .run("ping", cmd.arg(&[] as &[u8]))
            .await
            .map(drop)
    }

    /// The slot of the credential `name`, whose identity (auth URL and agent) is `identity`:
    /// it listens on the credential's channel from now on.
    pub fn slot(&self, name: &str, identity: &str) -> Slot {
        let digest = Sha256::digest(identity.as_bytes());
        let tag = format!(
            "{}{{{name}:{}}}",
            self.inner.prefix,
            hex::encode(&digest[..8])
        );
        let keys = Keys {
            token: format!("{tag}:token"),
            lease: format!("{tag}:lease"),
            generation: format!("{tag}:generation"),
            backoff: format!("{tag}:backoff"),
            failures: format!("{tag}:failures"),
            channel: format!("{tag}:events"),
        };
        let signals = Arc::new(Signals::default());
        {
            let mut listeners = self
                .inner
                .listeners
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            // Slots of credentials a reload dropped listen no more.
            listeners.retain(|_, slot| slot.strong_count() > 0);
            listeners.insert(keys.channel.clone().into_bytes(), Arc::downgrade(&signals));
        }
        let fleet = Arc::downgrade(&self.inner);
        let channel = keys.channel.clone();
        tokio::spawn(async move {
            // Until it works, or the fleet is gone: the manager resubscribes by itself after a
            // reconnect.
            while let Some(mut redis) = fleet.upgrade().map(|f| f.redis.clone()) {
                match redis.subscribe(&channel).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::debug!(%error, channel, "shared cache: subscribe failed; retrying");
                        tokio::time::sleep(REJOIN_PROBE_INTERVAL).await;
                    }
                }
            }
        });
        Slot {
            fleet: self.inner.clone(),
            keys,
            identity: identity.to_owned(),
            signals,
        }
    }
}

/// Hands an announcement on a channel to the slot listening there.
fn announce(listeners: &Mutex<HashMap<Vec<u8>, Weak<Signals>>>, push: PushInfo) {
    if push.kind != PushKind::Message {
        return;
    }
    let [Value::BulkString(channel), Value::BulkString(message), ..] = push.data.as_slice() else {
        return;
    };
    let Some(signals) = listeners
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(channel)
        .and_then(Weak::upgrade)
    else {
        return;
    };
    let text = String::from_utf8_lossy(message);
    tracing::trace!(%text, "shared cache announcement");
    let number = |prefix: &str| {
        text.strip_prefix(prefix)
            .and_then(|n| n.parse::<u64>().ok())
    };
    if let Some(g) = number("token ") {
        signals.announced.fetch_max(g, Ordering::Relaxed);
        signals.wake_keeper();
    } else if let Some(g) = number("invalidated ") {
        signals.invalidated.fetch_max(g, Ordering::Relaxed);
        signals.wake_keeper();
    }
    signals.news.notify_waiters();
}

impl FleetInner {
    /// Runs `cmd` within `timeout`, counting it under `op`, and keeps the up/down state: the
    /// first failure after success and the first success after failure are logged once.
    async fn run(
        self: &Arc<Self>,
        op: &'static str,
        cmd: &redis::Cmd,
    ) -> Result<Value, Unreachable> {
        let mut redis = self.redis.clone();
        let answer = tokio::time::timeout(self.timeout, cmd.query_async::<Value>(&mut redis)).await;
        self.outcome(op, answer)
    }

    /// Runs `script` as [`Self::run`] runs a command.
    async fn invoke(
        self: &Arc<Self>,
        op: &'static str,
        script: &redis::ScriptInvocation<'_>,
    ) -> Result<Value, Unreachable> {
        let mut redis = self.redis.clone();
        let answer =
            tokio::time::timeout(self.timeout, script.invoke_async::<Value>(&mut redis)).await;
        self.outcome(op, answer)
    }

    fn outcome(
        self: &Arc<Self>,
        op: &'static str,
        answer: Result<redis::RedisResult<Value>, tokio::time::error::Elapsed>,
    ) -> Result<Value, Unreachable> {
        let (outcome, result) = match answer {
            Ok(Ok(value)) => ("ok", Ok(value)),
            Ok(Err(error)) => {
                tracing::debug!(op, %error, "shared cache operation failed");
                ("error", Err(Unreachable))
            }
            Err(_) => ("timeout", Err(Unreachable)),
        };
        self.metrics.shared_cache_operation(op, outcome);
        let up = result.is_ok();
        if self.up.swap(up, Ordering::Relaxed) != up {
            self.metrics.shared_cache_up(up);
            if up {
                tracing::info!("shared cache answers again; rejoining the fleet");
                self.rejoined();
            } else {
                tracing::warn!(
                    outcome,
                    "shared cache unreachable; this replica acts alone until it answers"
                );
                self.probe();
            }
        }
        result
    }

    /// Tells every slot's keeper the fleet is back, so each converges on the fleet's token.
    fn rejoined(&self) {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        for signals in listeners.values().filter_map(Weak::upgrade) {
            signals.rejoined.store(true, Ordering::Relaxed);
            signals.wake_keeper();
        }
    }

    /// Pings Redis every [`REJOIN_PROBE_INTERVAL`] while it is down, so the replica rejoins
    /// without waiting for a cold request.
    fn probe(self: &Arc<Self>) {
        if self.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        let fleet = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REJOIN_PROBE_INTERVAL).await;
                let Some(fleet) = fleet.upgrade() else { return };
                if fleet.up.load(Ordering::Relaxed) {
                    fleet.probing.store(false, Ordering::Relaxed);
                    return;
                }
                let mut ping = redis::cmd("PING");
                let _ = fleet.run("ping", ping.arg(&[] as &[u8])).await;
            }
        });
    }
}

/// The names of one credential's keys and channel.
#[derive(Debug, Clone)]
struct Keys {
    token: String,
    lease: String,
    generation: String,
    backoff: String,
    failures: String,
    channel: String,
}

/// One credential's place in the fleet's cache.
#[derive(Clone)]
pub struct Slot {
    fleet: Arc<FleetInner>,
    keys: Keys,
    identity: String,
    signals: Arc<Signals>,
}

/// What the fleet offers a replica that needs a token.
pub enum Acquired {
    /// A token usable past the expiry asked for: its generation and opened record (which
    /// holds its expiry).
    Token {
        /// The fleet generation it was published under.
        generation: u64,
        /// The record the publisher sealed.
        record: Zeroizing<Vec<u8>>,
    },
    /// The fleet backs off after a failed exchange: the record of the failure, and how long.
    BackingOff {
        /// The record the failing replica sealed.
        record: Zeroizing<Vec<u8>>,
        /// How long until an exchange may run.
        retry_after: Duration,
    },
    /// This replica holds the lease: it runs the exchange and publishes the outcome.
    Lease(Lease),
    /// Another replica holds the lease.
    Busy,
}

/// The right to run the exchange for the fleet, until its lease time runs out. Dropped
/// without being published (an exchange abandoned, e.g. by a client gone away), it is given
/// back at once, so the fleet does not wait for it to lapse.
#[derive(Debug)]
pub struct Lease {
    /// The fleet generation the token obtained under this lease is published as.
    pub generation: u64,
    /// The failed exchanges in a row before this one, fleet-wide: the backoff's step.
    pub failures: u32,
    /// Where to give it back; `None` once published.
    slot: Option<Slot>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { slot.release().await });
        }
    }
}

impl Slot {
    /// One decision, atomically: a token the fleet holds that expires after `min_expires_ms`
    /// (Unix ms) and is of a generation above `above`; else the fleet's backoff; else the lease for
    /// `lease_for`; else [`Acquired::Busy`]. A token entry this replica cannot open (another
    /// key) is logged and skipped, as if absent; a backoff entry it cannot open makes it act
    /// alone ([`Unreachable`]).
    pub async fn acquire(
        &self,
        min_expires_ms: u64,
        above: u64,
        lease_for: Duration,
    ) -> Result<Acquired, Unreachable> {
        let mut above = above;
        // At most twice: once more after skipping an entry that does not open.
        for _ in 0..2 {
            let mut invocation = scripts().acquire.prepare_invoke();
            invocation
                .key(&self.keys.token)
                .key(&self.keys.backoff)
                .key(&self.keys.lease)
                .key(&self.keys.generation)
                .key(&self.keys.failures)
                .arg(min_expires_ms)
                .arg(above)
                .arg(&self.fleet.replica)
                .arg(lease_for.as_millis().max(1) as u64)
                .arg(unix_ms());
            let answer = self.fleet.invoke("acquire", &invocation).await?;
            let fields = match answer {
                Value::Array(fields) => fields,
                _ => return Err(Unreachable),
            };
            let word = |i: usize| match fields.get(i) {
                Some(Value::BulkString(b)) => Some(b.as_slice()),
                Some(Value::SimpleString(s)) => Some(s.as_bytes()),
                _ => None,
            };
            let number = |i: usize| match fields.get(i) {
                Some(Value::Int(n)) => u64::try_from(*n).ok(),
                _ => word(i).and_then(|w| std::str::from_utf8(w).ok()?.parse().ok()),
            };
            match word(0) {
                Some(b"token") => {
                    let (Some(generation), Some(expires_ms), Some(sealed)) =
                        (number(1), number(2), word(3))
                    else {
                        return Err(Unreachable);
                    };
                    match self.open_token(generation, expires_ms, sealed) {
                        Some(record) => {
                            return Ok(Acquired::Token { generation, record });
                        }
                        None => above = above.max(generation),
                    }
                }
                Some(b"backoff") => {
                    let retry_after = Duration::from_millis(number(2).unwrap_or(0));
                    match word(1).and_then(|sealed| self.open(b"backoff", sealed)) {
                        Some(record) => {
                            return Ok(Acquired::BackingOff {
                                record,
                                retry_after,
                            });
                        }
                        // Unreadable (another key): this replica acts alone, with its own backoff.
                        None => return Err(Unreachable),
                    }
                }
                Some(b"lease") => {
                    return Ok(Acquired::Lease(Lease {
                        generation: number(1).ok_or(Unreachable)?,
                        failures: number(2).unwrap_or(0).min(u64::from(u32::MAX)) as u32,
                        slot: Some(self.clone()),
                    }));
                }
                Some(b"busy") => return Ok(Acquired::Busy),
                _ => return Err(Unreachable),
            }
        }
        Ok(Acquired::Busy)
    }

    /// The fleet's token if it expires after `min_expires_ms` and its generation is above
    /// `above`: its generation and opened record. Takes no lease.
    pub async fn read(
        &self,
        min_expires_ms: u64,
        above: u64,
    ) -> Result<Option<(u64, Zeroizing<Vec<u8>>)>, Unreachable> {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(&self.keys.token).arg("g").arg("e").arg("s");
        let Value::Array(fields) = self.fleet.run("read", &cmd).await? else {
            return Err(Unreachable);
        };
        let bytes = |i: usize| match fields.get(i) {
            Some(Value::BulkString(b)) => Some(b.as_slice()),
            _ => None,
        };
        let number =
            |i: usize| bytes(i).and_then(|b| std::str::from_utf8(b).ok()?.parse::<u64>().ok());
        let (Some(generation), Some(expires_ms), Some(sealed)) = (number(0), number(1), bytes(2))
        else {
            return Ok(None);
        };
        if expires_ms <= min_expires_ms || generation <= above {
            return Ok(None);
        }
        Ok(self
            .open_token(generation, expires_ms, sealed)
            .map(|record| (generation, record)))
    }

    /// Publishes `record`, the token obtained under `lease`, expiring at `expires_ms` (Unix ms),
    /// and gives the lease back. A newer generation already published is kept.
    pub async fn publish(
        &self,
        mut lease: Lease,
        expires_ms: u64,
        record: &[u8],
    ) -> Result<(), Unreachable> {
        lease.slot = None;
        let sealed = self
            .fleet
            .key
            .seal(&self.token_aad(lease.generation, expires_ms), record);
        let lifetime = expires_ms.saturating_sub(unix_ms()).max(1);
        let mut invocation = scripts().publish.prepare_invoke();
        invocation
            .key(&self.keys.token)
            .key(&self.keys.lease)
            .key(&self.keys.backoff)
            .key(&self.keys.failures)
            .arg(&self.fleet.replica)
            .arg(lease.generation)
            .arg(expires_ms)
            .arg(sealed)
            .arg(lifetime)
            .arg(&self.keys.channel);
        self.fleet.invoke("publish", &invocation).await.map(drop)
    }

    /// Publishes `record`, the failure of the exchange run under `lease`, as the fleet's
    /// backoff for `delay`, and gives the lease back.
    pub async fn publish_failure(
        &self,
        mut lease: Lease,
        record: &[u8],
        delay: Duration,
    ) -> Result<(), Unreachable> {
        lease.slot = None;
        let sealed = self.fleet.key.seal(&self.aad(b"backoff", &[]), record);
        let mut invocation = scripts().fail.prepare_invoke();
        invocation
            .key(&self.keys.backoff)
            .key(&self.keys.lease)
            .key(&self.keys.failures)
            .arg(&self.fleet.replica)
            .arg(sealed)
            .arg(delay.as_millis().max(1) as u64)
            .arg(&self.keys.channel)
            .arg(FAILURES_KEPT.as_millis() as u64);
        self.fleet.invoke("fail", &invocation).await.map(drop)
    }

    /// Gives this replica's lease back without publishing (a [`Lease`] dropped unpublished).
    async fn release(&self) {
        let mut invocation = scripts().release.prepare_invoke();
        invocation
            .key(&self.keys.lease)
            .arg(&self.fleet.replica)
            .arg(&self.keys.channel);
        let _ = self.fleet.invoke("release", &invocation).await;
    }

    /// Deletes the fleet's token if it is still generation `generation` (compare and delete,
    /// atomic), and announces it; whether it was.
    pub async fn invalidate_if(&self, generation: u64) -> Result<bool, Unreachable> {
        let mut invocation = scripts().invalidate.prepare_invoke();
        invocation
            .key(&self.keys.token)
            .arg(generation)
            .arg(&self.keys.channel);
        let answer = self.fleet.invoke("invalidate", &invocation).await?;
        Ok(matches!(answer, Value::Int(1)))
    }

    /// What the channel has announced.
    pub fn signals(&self) -> &Signals {
        &self.signals
    }

    /// Wakes `keeper` on every announcement that concerns the current token.
    pub fn wake_on_news(&self, keeper: Arc<Notify>) {
        *self
            .signals
            .keeper
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(keeper);
    }

    /// The associated data of a record of `kind`: the credential's identity, then `extra`.
    fn aad(&self, kind: &[u8], extra: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(self.identity.len() + kind.len() + extra.len() + 2);
        aad.extend_from_slice(self.identity.as_bytes());
        aad.push(0);
        aad.extend_from_slice(kind);
        aad.push(0);
        aad.extend_from_slice(extra);
        aad
    }

    /// A token record's associated data: identity, generation and expiry are bound to it.
    fn token_aad(&self, generation: u64, expires_ms: u64) -> Vec<u8> {
        let mut extra = [0u8; 16];
        extra[..8].copy_from_slice(&generation.to_be_bytes());
        extra[8..].copy_from_slice(&expires_ms.to_be_bytes());
        self.aad(b"token", &extra)
    }

    fn open_token(
        &self,
        generation: u64,
        expires_ms: u64,
        sealed: &[u8],
    ) -> Option<Zeroizing<Vec<u8>>> {
        let opened = self
            .fleet
            .key
            .open(&self.token_aad(generation, expires_ms), sealed);
        if opened.is_none() {
            tracing::warn!(
                key = self.keys.token,
                generation,
                "shared cache: a token entry does not open with this encryption_key (another \
                 key, or not tokengate's); treated as absent"
            );
        }
        opened
    }

    fn open(&self, kind: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let opened = self.fleet.key.open(&self.aad(kind, &[]), sealed);
        if opened.is_none() {
            tracing::warn!(
                key = self.keys.backoff,
                "shared cache: an entry does not open with this encryption_key; treated as absent"
            );
        }
        opened
    }
}

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("prefix", &self.inner.prefix)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("token_key", &self.keys.token)
            .finish_non_exhaustive()
    }
}
