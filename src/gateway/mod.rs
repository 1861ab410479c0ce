//! The gateway: what a config builds (token sources, routes, access policy), held as one
//! [`Live`] snapshot that a reload replaces in a single atomic store: the route table in
//! [`routes`], the access policy in [`access`].

pub mod access;
pub mod routes;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use self::access::AccessPolicy;
use self::routes::{Route, RouteSpec, Routes};
use crate::auth::cache::TokenSource;
use crate::auth::exchange::{ExchangeParams, Exchanger};
use crate::config::{Config, ConfigError, CredentialSecrets, SecretEnv, ServerConfig};
use crate::fleet::{Fleet, FleetSettings};
use crate::metrics::Metrics;
use crate::upstream::UpstreamClient;
use crate::upstream::pool::Pool;
use crate::upstream::ssrf::{Resolve, SystemResolver};
use crate::{tls, upstream};

/// Everything the request path reads from the configuration, as of one load.
pub struct Live {
    /// The configuration this was built from.
    pub config: Config,
    /// Who may use the proxy.
    pub access: AccessPolicy,
    /// The token source of each credential, by name.
    pub credentials: BTreeMap<String, TokenSource>,
    /// The route table.
    pub routes: Routes,
    /// The fleet's shared cache, if `[shared_cache]` is set.
    pub fleet: Option<Fleet>,
}

/// The longest gap between the first exchanges of two credentials at start (or when a reload
/// adds them): with many credentials the gap shrinks so that all start within
/// [`WARMUP_WINDOW`], and a restart does not send the provider a burst of exchanges.
pub const WARMUP_STEP: Duration = Duration::from_millis(100);
/// The window the first exchanges of all credentials start in, however many there are.
pub const WARMUP_WINDOW: Duration = Duration::from_secs(2);

impl Live {
    /// The credentials some route uses, by name: the ones readiness waits for.
    pub fn routed_credentials(&self) -> impl Iterator<Item = (&String, &TokenSource)> {
        self.credentials
            .iter()
            .filter(|(name, _)| self.config.is_routed(name))
    }
}

/// The current [`Live`] snapshot, shared by the stack, the admin API and reloads.
pub type SharedLive = Arc<ArcSwap<Live>>;

/// A built configuration, ready to serve and to reload.
pub struct Gateway {
    live: SharedLive,
    file: String,
    metrics: Arc<Metrics>,
    resolver: Arc<dyn Resolve>,
    /// Serving has started: tokens are kept warm from then on.
    started: AtomicBool,
}

impl Gateway {
    /// Resolves secrets, builds TLS clients, token sources and routes. `file` names the config
    /// in errors.
    pub fn new(config: Config, file: &str, env: &dyn SecretEnv) -> Result<Self, ConfigError> {
        if let Some(t) = &config.server.tls {
            tls::server_config(&t.cert_file, &t.key_file, t.client_ca_file.as_deref()).map_err(
                |e| ConfigError {
                    file: file.to_owned(),
                    key: "server.tls".into(),
                    problem: e.to_string(),
                },
            )?;
        }
        let metrics = Metrics::new();
        let live = build(config, file, env, None, &metrics)?;
        Ok(Self {
            live: Arc::new(ArcSwap::from_pointee(live)),
            file: file.to_owned(),
            metrics,
            resolver: Arc::new(SystemResolver),
            started: AtomicBool::new(false),
        })
    }

    /// Resolves tunnel targets with `resolver` instead of the system's (the seam tests use).
    /// Takes effect at the next start.
    pub fn with_resolver(mut self, resolver: Arc<dyn Resolve>) -> Self {
        self.resolver = resolver;
        self
    }

    /// The resolver for tunnel targets.
    pub fn resolver(&self) -> Arc<dyn Resolve> {
        self.resolver.clone()
    }

    /// Replaces the configuration at once, or not at all: on any error the current one keeps
    /// serving. Credentials whose settings and secrets are unchanged keep their token.
    /// `[server]` and `[admin]` settings are bound at start; changes to them wait for a restart.
    pub fn reload(&self, config: Config, env: &dyn SecretEnv) -> Result<(), ConfigError> {
        let old = self.live.load_full();
        let new = build(config, &self.file, env, Some(&old), &self.metrics)?;
        if restart_only_settings_differ(&old.config, &new.config) {
            tracing::warn!(file = %self.file, "[server] and [admin] changes apply on restart only");
        }
        let kept: Vec<String> = new
            .credentials
            .iter()
            .filter(|(name, source)| {
                old.credentials
                    .get(*name)
                    .is_some_and(|o| o.same_source(source))
            })
            .map(|(name, _)| name.clone())
            .collect();
        let (routes, credentials) = (new.routes.iter().count(), new.credentials.len());
        // Swap first, then say so: whoever reads the log line finds the new configuration.
        let new = Arc::new(new);
        self.live.store(new.clone());
        if self.started.load(Ordering::Relaxed) {
            keep_warm(&new);
        }
        tracing::info!(
            file = %self.file,
            routes,
            credentials,
            tokens_kept = ?kept,
            "configuration reloaded"
        );
        Ok(())
    }

    /// Reads `path` and reloads from it; see [`Gateway::reload`].
    pub fn reload_from(&self, path: &Path, env: &dyn SecretEnv) -> Result<(), ConfigError> {
        self.reload(Config::load(path)?, env)
    }

    /// Starts fetching and keeping the tokens of the credentials routes use, without waiting
    /// for traffic; reloads do the same for the credentials they add. Called when serving
    /// starts.
    pub fn keep_tokens_warm(&self) {
        self.started.store(true, Ordering::Relaxed);
        keep_warm(&self.live.load());
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// The handle the stack and the admin API read the current snapshot through.
    pub fn shared(&self) -> SharedLive {
        self.live.clone()
    }

    /// The process's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The token source of credential `name`, as currently configured.
    pub fn credential(&self, name: &str) -> Option<TokenSource> {
        self.live.load().credentials.get(name).cloned()
    }
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let live = self.live.load();
        f.debug_struct("Gateway")
            .field("file", &self.file)
            .field("access", &live.access)
            .field("credentials", &live.credentials)
            .field("routes", &live.routes)
            .finish()
    }
}

/// Starts the keepers of `live`'s routed credentials, spread over [`WARMUP_WINDOW`] (a keeper
/// already running keeps its pace), and lets the others' keepers end with their token.
fn keep_warm(live: &Live) {
    let step = warmup_step(live.routed_credentials().count());
    let mut delay = Duration::ZERO;
    for (name, source) in &live.credentials {
        if live.config.is_routed(name) {
            source.keep_warm(delay);
            delay += step;
        } else {
            source.stop_keeping_warm();
        }
    }
}

/// The gap between the first exchanges of `count` credentials: [`WARMUP_STEP`], or less so
/// that they all start within [`WARMUP_WINDOW`].
fn warmup_step(count: usize) -> Duration {
    let count = u32::try_from(count).unwrap_or(u32::MAX).max(1);
    WARMUP_STEP.min(WARMUP_WINDOW / count)
}

/// Whether `[server]` or `[admin]` differ in a setting a reload cannot apply (everything but
/// `allowed_clients` and `require_header`, which are part of the snapshot).
fn restart_only_settings_differ(a: &Config, b: &Config) -> bool {
    let bound_at_start = |s: &ServerConfig| ServerConfig {
        allowed_clients: None,
        require_header: None,
        ..s.clone()
    };
    bound_at_start(&a.server) != bound_at_start(&b.server)
        || a.admin != b.admin
        || a.forward.max_tunnels != b.forward.max_tunnels
}

/// The fleet's shared cache `config` asks for: the one of `previous` if its section is
/// unchanged, else a new connection.
fn fleet(
    config: &Config,
    file: &str,
    env: &dyn SecretEnv,
    previous: Option<&Live>,
    metrics: &Arc<Metrics>,
) -> Result<Option<Fleet>, ConfigError> {
    let (Some(section), Some(secrets)) = (
        &config.shared_cache,
        config.resolve_shared_cache(env, file)?,
    ) else {
        return Ok(None);
    };
    if let Some(p) = previous
        && p.config.shared_cache.as_ref() == Some(section)
        && let Some(fleet) = &p.fleet
    {
        return Ok(Some(fleet.clone()));
    }
    let settings = FleetSettings {
        url: section.url.clone(),
        username: section.username.clone(),
        password: secrets.password,
        key: secrets.key,
        key_prefix: section.key_prefix.clone(),
        timeout: section.timeout,
    };
    Fleet::new(settings, metrics.clone())
        .map(Some)
        .map_err(|e| ConfigError {
            file: file.to_owned(),
            key: "shared_cache.url".into(),
            problem: crate::ErrorChain(&e).to_string(),
        })
}

/// Builds a snapshot from `config`, reusing the token sources of `previous` whose settings and
/// secrets are unchanged.
fn build(
    config: Config,
    file: &str,
    env: &dyn SecretEnv,
    previous: Option<&Live>,
    metrics: &Arc<Metrics>,
) -> Result<Live, ConfigError> {
    let err = |key: String, problem: String| ConfigError {
        file: file.to_owned(),
        key,
        problem,
    };
    let fleet = fleet(&config, file, env, previous, metrics)?;
    let mut credentials = BTreeMap::new();
    for (name, c) in &config.credentials {
        let secrets = config.resolve_secrets(name, env, file)?;
        let unchanged = previous.and_then(|p| {
            let source = p.credentials.get(name)?;
            (p.config.credentials.get(name) == Some(c)
                && p.config.shared_cache == config.shared_cache
                && source.has_secrets(&secrets.secret, &secrets.key))
            .then(|| source.clone())
        });
        if let Some(source) = unchanged {
            credentials.insert(name.clone(), source);
            continue;
        }
        let CredentialSecrets { secret, key } = secrets;
        // The exchange's own deadline bounds its connect too.
        let connector = tls::connector(c.ca_file.as_deref(), c.timeout)
            .map_err(|e| err(format!("credentials.{name}.ca_file"), e.to_string()))?;
        let params = ExchangeParams {
            auth_url: c.auth_url.0.clone(),
            agent_id: c.agent_id.clone(),
            secret,
            key,
            signature: c.signature,
            layout: c.cipher_text_layout,
            timeout: c.timeout,
        };
        let exchanger = Exchanger::new(params, connector)
            .map_err(|e| err(format!("credentials.{name}.agent_id"), e.to_string()))?;
        // The credential's identity in the fleet: the same agent at the same auth server.
        let slot = fleet
            .as_ref()
            .filter(|_| c.shared)
            .map(|f| f.slot(name, &format!("{}\n{}", c.auth_url.0, c.agent_id)));
        credentials.insert(
            name.clone(),
            TokenSource::new(
                name,
                exchanger,
                c.refresh_before,
                c.max_backoff,
                metrics.clone(),
                slot,
            ),
        );
    }

    let access = AccessPolicy {
        allowed_clients: config.server.allowed_clients.clone().map(Into::into),
        required_header: config.resolve_client_key(env, file)?.map(Arc::new),
    };

    // One hyper-util client per set of TLS roots; one pool per plain-HTTP upstream host.
    let mut clients: HashMap<Option<PathBuf>, UpstreamClient> = HashMap::new();
    let mut pools: HashMap<http::uri::Authority, UpstreamClient> = HashMap::new();
    let mut routes = Vec::with_capacity(config.routes.len());
    for (i, r) in config.routes.iter().enumerate() {
        let plain = match (r.upstream.0.scheme_str(), r.upstream.0.authority()) {
            (Some("http"), Some(authority)) => Some(authority.clone()),
            _ => None,
        };
        let client = match (plain, clients.get(&r.ca_file)) {
            (Some(authority), _) => pools
                .entry(authority.clone())
                .or_insert_with(|| {
                    UpstreamClient::Plain(Pool::new(authority, config.server.connect_timeout))
                })
                .clone(),
            (None, Some(c)) => c.clone(),
            (None, None) => {
                let connector = tls::connector(r.ca_file.as_deref(), config.server.connect_timeout)
                    .map_err(|e| err(format!("routes[{i}].ca_file"), e.to_string()))?;
                let c = UpstreamClient::Tls(Arc::new(upstream::client(connector)));
                clients.insert(r.ca_file.clone(), c.clone());
                c
            }
        };
        let spec = RouteSpec {
            name: format!("routes[{i}]"),
            host: r.host.clone(),
            path_prefix: r.path_prefix.clone(),
            upstream: r.upstream.0.clone(),
            strip_prefix: r.strip_prefix,
            client_authorization: r.client_authorization,
            credential: credentials[&r.credential].clone(),
            client,
        };
        let route = Route::new(spec).ok_or_else(|| {
            err(
                format!("routes[{i}].upstream"),
                "must be an absolute URL".into(),
            )
        })?;
        routes.push(route);
    }
    Ok(Live {
        config,
        access,
        credentials,
        routes: Routes::new(routes),
        fleet,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[server]\nlisten = \"127.0.0.1:0\"\n";
    const ROUTE: &str = "[credentials.c]\nauth_url = \"http://127.0.0.1:9/v2/auth\"\n\
                         agent_id = \"a\"\nsecret = { env = \"S\" }\n\
                         [[routes]]\nupstream = \"http://127.0.0.1:9\"\ncredential = \"c\"\n";

    fn config(extra: &str) -> Config {
        Config::parse(&format!("{BASE}{extra}\n{ROUTE}"), "t.toml").unwrap()
    }

    #[test]
    fn first_exchanges_are_spread_but_all_start_within_the_window() {
        assert_eq!(warmup_step(1), WARMUP_STEP);
        assert_eq!(warmup_step(20), WARMUP_STEP);
        assert_eq!(warmup_step(100), Duration::from_millis(20));
        for count in [1, 2, 21, 1000, 100_000] {
            let last = warmup_step(count) * u32::try_from(count - 1).unwrap();
            assert!(last < WARMUP_WINDOW, "{count}: the last starts at {last:?}");
        }
    }

    #[test]
    fn only_settings_bound_at_start_count_as_restart_only() {
        let base = config("");
        assert!(!restart_only_settings_differ(&base, &config("")));
        assert!(!restart_only_settings_differ(
            &base,
            &config("allowed_clients = [\"10.0.0.0/8\"]\n")
        ));
        assert!(restart_only_settings_differ(
            &base,
            &config("request_timeout = \"5s\"\n")
        ));
        assert!(restart_only_settings_differ(
            &base,
            &config("[admin]\nlisten = \"127.0.0.1:1\"\n")
        ));
    }
}
