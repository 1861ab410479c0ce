//! `proxy.toml`: every key with its default, validation that names the file and the key, and
//! secret resolution from `{ env = … }` or `{ file = … }` (inline secrets are refused).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use secrecy::SecretString;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::auth::crypto::{CipherTextLayout, EncryptionKey, SignatureAlg};

/// The largest `max_replay_body` accepted, in bytes.
pub const MAX_REPLAY_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// The largest secret read from a file, in bytes.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// A configuration problem, naming the file, the key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {key}: {problem}")]
pub struct ConfigError {
    /// The configuration file (or `<inline>`).
    pub file: String,
    /// The key at fault, e.g. `routes[0].credential`.
    pub key: String,
    /// What is wrong with it.
    pub problem: String,
}

/// What to do with an `Authorization` header the client sent itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuthorization {
    /// Drop the client's header and inject the credential's token (the default).
    #[default]
    Replace,
    /// Forward the client's header as it is and inject nothing; no retry on 401.
    Keep,
    /// Refuse the request with 400 `bad_request`.
    Reject,
}

impl std::fmt::Display for ClientAuthorization {
    /// The config's spelling.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Replace => "replace",
            Self::Keep => "keep",
            Self::Reject => "reject",
        })
    }
}

/// The whole `proxy.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The proxy listener.
    #[serde(default)]
    pub server: ServerConfig,
    /// The admin listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// What egress (`HTTP_PROXY`) clients may do beyond routed requests: CONNECT tunnels.
    #[serde(default)]
    pub forward: ForwardConfig,
    /// Named credential sets.
    #[serde(default)]
    pub credentials: BTreeMap<String, CredentialConfig>,
    /// Routes, first match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Tokens shared with the other replicas of a fleet through Redis; absent, each replica
    /// keeps its own.
    #[serde(default)]
    pub shared_cache: Option<SharedCacheConfig>,
}

/// `[shared_cache]`: the replicas of a fleet share each credential's token through Redis, so
/// the fleet makes one exchange where each replica would make its own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedCacheConfig {
    /// `redis://host:port/db`, or `rediss://…` for TLS. No user or password in it: those go in
    /// `username` and `password`.
    pub url: String,
    /// The Redis ACL user, if any.
    #[serde(default)]
    pub username: Option<String>,
    /// The Redis password: `{ env = "VAR" }` or `{ file = "/path" }`.
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// Base64 of 32 bytes: every value kept in Redis is sealed with it (AES-256-GCM), so a
    /// dump of Redis holds no token. The same on every replica.
    pub encryption_key: SecretSource,
    /// Prepended to every key and channel tokengate uses. Default `tokengate:`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// The deadline of one Redis operation; past it this replica acts alone. Default 200 ms.
    #[serde(
        default = "default_shared_cache_timeout",
        deserialize_with = "duration"
    )]
    pub timeout: Duration,
}

fn default_key_prefix() -> String {
    "tokengate:".into()
}

fn default_shared_cache_timeout() -> Duration {
    Duration::from_millis(200)
}

/// The longest `shared_cache.timeout` accepted: past it, Redis would hold up cold requests
/// longer than an exchange would.
pub const MAX_SHARED_CACHE_TIMEOUT: Duration = Duration::from_secs(5);

/// What is wrong with `url` as the shared cache's Redis URL, if anything: a `redis://` or
/// `rediss://` URL with a host, and no user or password in it.
fn redis_url_problem(url: &str) -> Option<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Some("not a URL; write it like redis://127.0.0.1:6379/0".into());
    };
    if scheme != "redis" && scheme != "rediss" {
        return Some(format!("scheme `{scheme}` is not redis or rediss"));
    }
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    if authority.contains('@') {
        return Some(
            "carries a user or password; put them in shared_cache.username and \
             shared_cache.password (a secret reference) instead"
                .into(),
        );
    }
    if authority.is_empty() {
        return Some("has no host".into());
    }
    None
}

/// The secrets of `[shared_cache]`, resolved.
pub struct SharedCacheSecrets {
    /// The Redis password, if any.
    pub password: Option<SecretString>,
    /// The sealing key.
    pub key: crate::fleet::seal::SealingKey,
}

/// `[server]`: the proxy listener.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address. Default `127.0.0.1:8080`: loopback, since whoever reaches this port uses
    /// the credentials.
    pub listen: SocketAddr,
    /// Bytes of request body buffered so a request can be replayed after a 401. Default 65536.
    pub max_replay_body: usize,
    /// How long the upstream may take to answer (response head). Default 30 s.
    #[serde(deserialize_with = "duration")]
    pub request_timeout: Duration,
    /// How long a TCP connect to an upstream may take: 504 `upstream_timeout`. Default 5 s.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// How long a client may take to send its request headers; on HTTP/1.1 this also bounds
    /// how long a keep-alive connection may sit idle. Default 10 s.
    #[serde(deserialize_with = "duration")]
    pub header_read_timeout: Duration,
    /// The largest request body accepted, in bytes: 413 `body_too_large` (before any exchange or
    /// upstream dial when the length is declared). Default 16 MiB.
    pub max_request_body: u64,
    /// The longest wait for the next piece of a body: a client's stalled upload gets 408
    /// `client_timeout`; an upstream's stalled response is cut off; a plain HTTP/1 client that
    /// stops reading its response is cut off. Default 30 s.
    #[serde(deserialize_with = "duration")]
    pub body_idle_timeout: Duration,
    /// The most client connections served at once; further ones wait in the accept queue.
    /// Default 10000.
    pub max_connections: usize,
    /// The most requests in flight at once; past it requests are shed with 503 `overloaded`.
    /// Default 4096.
    pub max_concurrent_requests: usize,
    /// Networks (CIDRs) clients may connect from; others get 403 `forbidden`. Default: any
    /// (the default `listen` is loopback).
    #[serde(deserialize_with = "some_cidrs")]
    pub allowed_clients: Option<Vec<ipnet::IpNet>>,
    /// A shared client key every request must carry; it is removed before forwarding.
    pub require_header: Option<RequireHeader>,
    /// After SIGTERM, how long in-flight requests may finish before connections are closed.
    /// Default 30 s.
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Serve clients over TLS (and, with `client_ca_file`, require client certificates).
    pub tls: Option<ServerTls>,
}

/// `[server.tls]`: inbound TLS.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// The server's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// The server's private key (PEM).
    pub key_file: PathBuf,
    /// CAs whose client certificates are accepted; when set, clients without one are refused
    /// during the handshake (mTLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// `server.require_header`: a header name and the secret value clients must send.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequireHeader {
    /// The header, e.g. `x-tokengate-key`.
    pub name: String,
    /// Where its expected value comes from: `{ env = … }` or `{ file = … }`.
    pub value: SecretSource,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_replay_body: 64 * 1024,
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            max_request_body: 16 * 1024 * 1024,
            body_idle_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_concurrent_requests: 4096,
            allowed_clients: None,
            require_header: None,
            shutdown_grace: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// `[admin]`: health and readiness.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listen address for `/healthz` and `/readyz`. Default `127.0.0.1:9901`.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
        }
    }
}

/// `[forward]`: blind CONNECT tunnels for egress clients. They carry no token (the proxy cannot
/// see inside them), so each target must be listed, and every address it resolves to passes
/// the SSRF guard ([`crate::upstream::ssrf`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    /// `host:port` targets CONNECT may open a tunnel to (case-insensitive, exact). Default
    /// empty: CONNECT gets 405.
    pub tunnel_allow: Vec<String>,
    /// Address ranges a tunnel may reach although the guard denies them by default (loopback,
    /// private, link-local, CGNAT, reserved). Default empty.
    #[serde(deserialize_with = "cidrs")]
    pub tunnel_allow_addresses: Vec<ipnet::IpNet>,
    /// The most tunnels open at once; further CONNECTs get 503 `overloaded`. Default 1024.
    pub max_tunnels: usize,
    /// A tunnel with no bytes moving either way for this long is closed. Default 5 min.
    #[serde(deserialize_with = "duration")]
    pub tunnel_idle_timeout: Duration,
}

/// The default of `forward.max_tunnels`.
pub const DEFAULT_MAX_TUNNELS: usize = 1024;

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            tunnel_allow: Vec::new(),
            tunnel_allow_addresses: Vec::new(),
            max_tunnels: DEFAULT_MAX_TUNNELS,
            tunnel_idle_timeout: Duration::from_secs(300),
        }
    }
}

impl ForwardConfig {
    /// Whether `authority` (`host:port`, from a CONNECT) is a listed tunnel target.
    pub fn allows_tunnel(&self, authority: &str) -> bool {
        self.tunnel_allow
            .iter()
            .any(|t| t.eq_ignore_ascii_case(authority))
    }
}

/// `[credentials.NAME]`: one agent's exchange settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialConfig {
    /// The auth endpoint, e.g. `https://auth.example.com/v2/auth`.
    pub auth_url: HttpUrl,
    /// The agent id sent as `x-agentid` and in the encrypted body.
    pub agent_id: String,
    /// Where the secret comes from: `{ env = "VAR" }` or `{ file = "/path" }`.
    pub secret: SecretSource,
    /// Base64 of a 32-byte AES key; default SHA-256(secret).
    #[serde(default)]
    pub encryption_key: Option<SecretSource>,
    /// `sha256` (default) or `hmac-sha256`.
    #[serde(default)]
    pub signature: SignatureAlg,
    /// `iv-tag-ct` (default) or `iv-ct-tag`.
    #[serde(default)]
    pub cipher_text_layout: CipherTextLayout,
    /// Renew this long before expiry, plus jitter (half the lifetime for short tokens). Default 5m.
    #[serde(default = "default_refresh_before", deserialize_with = "duration")]
    pub refresh_before: Duration,
    /// The deadline for one exchange. Default 5 s.
    #[serde(default = "default_exchange_timeout", deserialize_with = "duration")]
    pub timeout: Duration,
    /// The longest wait between failed exchanges (backoff starts at 1 s and doubles, with
    /// jitter). Default 30 s.
    #[serde(default = "default_max_backoff", deserialize_with = "duration")]
    pub max_backoff: Duration,
    /// Extra PEM roots trusted for this auth server.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Whether this credential's token is shared with the fleet when `[shared_cache]` is
    /// present. Default true; false keeps it to this replica.
    #[serde(default = "default_shared")]
    pub shared: bool,
}

fn default_shared() -> bool {
    true
}

/// Reads a duration written as humantime reads it (`"5s"`, `"250ms"`, `"1m 30s"`), with an
/// error that shows that form.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(DURATION_FORM)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime::parse_duration(v)
                .map_err(|e| E::custom(format!("`{v}` is not a duration ({e}); {DURATION_FORM}")))
        }
    }
    d.deserialize_str(V)
}

/// How a duration is written, for error messages.
const DURATION_FORM: &str =
    r#"write a duration as a string such as "5s", "250ms", "2m" or "1h 30m""#;

/// Reads a list of CIDR networks, with an error that says CIDR and shows the form.
fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ipnet::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|text| {
            text.parse().map_err(|_| {
                de::Error::custom(format!(
                    r#"`{text}` is not a CIDR network; write it like "10.0.0.0/8", "192.168.1.7/32" or "fd00::/8""#
                ))
            })
        })
        .collect()
}

/// [`cidrs`], for a list that may be absent.
fn some_cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<ipnet::IpNet>>, D::Error> {
    cidrs(d).map(Some)
}

fn default_refresh_before() -> Duration {
    Duration::from_secs(300)
}

fn default_exchange_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

/// `[[routes]]`: where matching requests go and with which credential.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix to match (plain prefix). Default `/`.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// Host to match, from `Host` or an absolute-form request; any host if unset.
    #[serde(default)]
    pub host: Option<String>,
    /// The upstream base URL, http or https.
    pub upstream: HttpUrl,
    /// The `[credentials.*]` entry whose token is injected.
    pub credential: String,
    /// Remove `path_prefix` before forwarding. Default false.
    #[serde(default)]
    pub strip_prefix: bool,
    /// `replace` (default), `keep` or `reject` a client's own `Authorization`.
    #[serde(default)]
    pub client_authorization: ClientAuthorization,
    /// Extra PEM roots trusted for this upstream.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_prefix() -> String {
    "/".into()
}

/// An absolute `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl(pub Uri);

impl<'de> Deserialize<'de> for HttpUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let uri: Uri = s
            .parse()
            .map_err(|e| de::Error::custom(format!("`{s}` is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http" | "https") if uri.authority().is_some() => Ok(Self(uri)),
            _ => Err(de::Error::custom(format!(
                "`{s}` must be an absolute http:// or https:// URL"
            ))),
        }
    }
}

/// Where a secret comes from. Inline values are refused so secrets stay out of config files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable.
    Env(String),
    /// A file (one trailing newline is dropped).
    File(PathBuf),
}

impl<'de> Deserialize<'de> for SecretSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretSource;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"{ env = "VAR" } or { file = "/path" }"#)
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<SecretSource, E> {
                Err(E::custom(
                    r#"inline secrets are refused; use { env = "VAR" } or { file = "/path" }"#,
                ))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretSource, A::Error> {
                let source = match map.next_key::<String>()?.as_deref() {
                    Some("env") => SecretSource::Env(map.next_value()?),
                    Some("file") => SecretSource::File(map.next_value()?),
                    Some(other) => {
                        return Err(de::Error::custom(format!(
                            "unknown key `{other}`; expected `env` or `file`"
                        )));
                    }
                    None => return Err(de::Error::custom("empty table; expected `env` or `file`")),
                };
                if map.next_key::<String>()?.is_some() {
                    return Err(de::Error::custom("give exactly one of `env` or `file`"));
                }
                Ok(source)
            }
        }
        d.deserialize_any(V)
    }
}

/// Looks up environment variables; a seam so tests and the demo need not mutate the process.
pub trait SecretEnv {
    /// The value of `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl SecretEnv for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl SecretEnv for BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

impl SecretSource {
    /// Reads the secret; the error names what is missing, never the value.
    fn resolve(&self, env: &dyn SecretEnv) -> Result<SecretString, String> {
        let value = match self {
            Self::Env(var) => env
                .var(var)
                .ok_or_else(|| format!("environment variable `{var}` is not set"))?,
            Self::File(path) => read_secret_file(path)?,
        };
        if value.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(SecretString::from(value))
    }
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let err = |e: std::io::Error| format!("cannot read `{}`: {e}", path.display());
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(err)?
        .take(MAX_SECRET_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(err)?;
    let trimmed = text.strip_suffix('\n').unwrap_or(&text);
    let trimmed = trimmed.strip_suffix('\r').unwrap_or(trimmed).to_owned();
    zeroize::Zeroize::zeroize(&mut text);
    Ok(trimmed)
}

/// A credential's resolved secret material.
#[derive(Debug)]
pub struct CredentialSecrets {
    /// The shared secret.
    pub secret: SecretString,
    /// The AES-256 key.
    pub key: EncryptionKey,
}

impl Config {
    /// Reads, parses and validates `path`. Relative file paths in it (secrets, CA and TLS
    /// files) are taken from the directory `path` is in, not from the working directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: "(file)".into(),
            problem: format!("cannot read: {e}"),
        })?;
        let mut config = Self::parse(&text, &file)?;
        config.anchor_paths(path.parent().unwrap_or(Path::new("")));
        Ok(config)
    }

    /// Makes every relative file path in the config relative to `base` instead.
    fn anchor_paths(&mut self, base: &Path) {
        let anchor = |path: &mut PathBuf| {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        };
        let anchor_secret = |source: &mut SecretSource| {
            if let SecretSource::File(path) = source {
                anchor(path);
            }
        };
        if let Some(tls) = &mut self.server.tls {
            anchor(&mut tls.cert_file);
            anchor(&mut tls.key_file);
            tls.client_ca_file.as_mut().map(anchor);
        }
        if let Some(required) = &mut self.server.require_header {
            anchor_secret(&mut required.value);
        }
        for credential in self.credentials.values_mut() {
            anchor_secret(&mut credential.secret);
            credential.encryption_key.as_mut().map(anchor_secret);
            credential.ca_file.as_mut().map(anchor);
        }
        for route in &mut self.routes {
            route.ca_file.as_mut().map(anchor);
        }
    }

    /// Whether some route uses credential `name`.
    pub fn is_routed(&self, name: &str) -> bool {
        self.routes.iter().any(|r| r.credential == name)
    }

    /// The defined credentials' names, for messages: `a, b`, or `none`.
    pub fn credential_names(&self) -> String {
        if self.credentials.is_empty() {
            return "none".into();
        }
        let names: Vec<&str> = self.credentials.keys().map(String::as_str).collect();
        names.join(", ")
    }

    /// What `check` and `run` warn about but accept: each credential no route uses.
    pub fn warnings(&self, file: &str) -> Vec<String> {
        self.credentials
            .keys()
            .filter(|name| !self.is_routed(name))
            .map(|name| {
                format!(
                    "{file}: credentials.{name}: no route uses this credential, so its token is \
                     never fetched; name it in a route's `credential`, or remove it"
                )
            })
            .collect()
    }

    /// Parses and validates TOML text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = match e.path().to_string() {
                p if p == "." => "(top level)".to_owned(),
                p => p,
            };
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| format!(" (line {})", text[..s.start].matches('\n').count() + 1))
                .unwrap_or_default();
            ConfigError {
                file: file.to_owned(),
                key,
                problem: format!("{}{line}", inner.message().trim_end()),
            }
        })?;
        config.validate(file)?;
        Ok(config)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |key: String, problem: String| ConfigError {
            file: file.to_owned(),
            key,
            problem,
        };
        if self.routes.is_empty() {
            return Err(err(
                "routes".into(),
                "no [[routes]] table, so every request would get 404 no_route; add one with \
                 `upstream` and `credential`"
                    .into(),
            ));
        }
        let (proxy, admin) = (self.server.listen, self.admin.listen);
        let overlap =
            proxy.ip() == admin.ip() || proxy.ip().is_unspecified() || admin.ip().is_unspecified();
        if proxy.port() != 0 && proxy.port() == admin.port() && overlap {
            return Err(err(
                "admin.listen".into(),
                format!(
                    "`{admin}` is also where server.listen (`{proxy}`) listens; give the admin \
                     API an address of its own (default 127.0.0.1:9901)"
                ),
            ));
        }
        if self.server.max_replay_body > MAX_REPLAY_BODY_LIMIT {
            return Err(err(
                "server.max_replay_body".into(),
                format!("must be at most {MAX_REPLAY_BODY_LIMIT} bytes"),
            ));
        }
        if self.server.max_replay_body as u64 > self.server.max_request_body {
            return Err(err(
                "server.max_replay_body".into(),
                "must not exceed server.max_request_body".into(),
            ));
        }
        if let Some(required) = &self.server.require_header
            && http::header::HeaderName::try_from(required.name.as_str()).is_err()
        {
            return Err(err(
                "server.require_header.name".into(),
                format!("`{}` is not a header name", required.name),
            ));
        }
        for (i, target) in self.forward.tunnel_allow.iter().enumerate() {
            let ok = target
                .parse::<http::uri::Authority>()
                .is_ok_and(|a| a.port_u16().is_some() && !target.contains('@'));
            if !ok {
                return Err(err(
                    format!("forward.tunnel_allow[{i}]"),
                    format!("`{target}` is not host:port"),
                ));
            }
        }
        for (key, n) in [
            ("forward.max_tunnels", self.forward.max_tunnels),
            ("server.max_connections", self.server.max_connections),
            (
                "server.max_concurrent_requests",
                self.server.max_concurrent_requests,
            ),
        ] {
            if n == 0 {
                return Err(err(key.into(), "must be at least 1".into()));
            }
        }
        for (key, d) in [
            ("server.request_timeout", self.server.request_timeout),
            ("server.connect_timeout", self.server.connect_timeout),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.body_idle_timeout", self.server.body_idle_timeout),
            (
                "forward.tunnel_idle_timeout",
                self.forward.tunnel_idle_timeout,
            ),
        ] {
            if d.is_zero() {
                return Err(err(key.into(), "must be greater than zero".into()));
            }
        }
        for (name, c) in &self.credentials {
            if c.timeout.is_zero() {
                return Err(err(
                    format!("credentials.{name}.timeout"),
                    "must be greater than zero".into(),
                ));
            }
            if c.max_backoff < crate::auth::backoff::BACKOFF_START {
                return Err(err(
                    format!("credentials.{name}.max_backoff"),
                    "must be at least 1s".into(),
                ));
            }
            if c.agent_id.is_empty() || http::HeaderValue::try_from(c.agent_id.as_str()).is_err() {
                return Err(err(
                    format!("credentials.{name}.agent_id"),
                    "must be a non-empty printable string".into(),
                ));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if !self.credentials.contains_key(&r.credential) {
                return Err(err(
                    format!("routes[{i}].credential"),
                    format!(
                        "unknown credential `{}` (defined: {})",
                        r.credential,
                        self.credential_names()
                    ),
                ));
            }
            if !r.path_prefix.starts_with('/') {
                return Err(err(
                    format!("routes[{i}].path_prefix"),
                    "must start with `/`".into(),
                ));
            }
            if let Some(host) = &r.host
                && (host.is_empty() || host.parse::<http::uri::Authority>().is_err())
            {
                return Err(err(
                    format!("routes[{i}].host"),
                    format!("`{host}` is not a host name"),
                ));
            }
            if r.upstream.0.query().is_some() {
                return Err(err(
                    format!("routes[{i}].upstream"),
                    "must not carry a query".into(),
                ));
            }
        }
        if let Some(shared) = &self.shared_cache {
            if let Some(problem) = redis_url_problem(&shared.url) {
                return Err(err("shared_cache.url".into(), problem));
            }
            if shared.timeout.is_zero() || shared.timeout > MAX_SHARED_CACHE_TIMEOUT {
                return Err(err(
                    "shared_cache.timeout".into(),
                    format!("must be above 0 and at most {MAX_SHARED_CACHE_TIMEOUT:?}"),
                ));
            }
            if shared.key_prefix.contains(['{', '}']) {
                return Err(err(
                    "shared_cache.key_prefix".into(),
                    "must not contain `{` or `}` (tokengate sets the hash tags itself)".into(),
                ));
            }
        }
        Ok(())
    }

    /// Resolves the secrets of `[shared_cache]`, if there is one.
    pub fn resolve_shared_cache(
        &self,
        env: &dyn SecretEnv,
        file: &str,
    ) -> Result<Option<SharedCacheSecrets>, ConfigError> {
        let Some(shared) = &self.shared_cache else {
            return Ok(None);
        };
        let err = |key: &str, problem: String| ConfigError {
            file: file.to_owned(),
            key: format!("shared_cache.{key}"),
            problem,
        };
        let password = match &shared.password {
            Some(source) => Some(source.resolve(env).map_err(|p| err("password", p))?),
            None => None,
        };
        let encoded = shared
            .encryption_key
            .resolve(env)
            .map_err(|p| err("encryption_key", p))?;
        let key = crate::fleet::seal::SealingKey::from_base64(
            secrecy::ExposeSecret::expose_secret(&encoded),
        )
        .ok_or_else(|| {
            err(
                "encryption_key",
                "must be base64 of exactly 32 bytes".into(),
            )
        })?;
        Ok(Some(SharedCacheSecrets { password, key }))
    }

    /// Resolves `server.require_header`'s value, if the key is set.
    pub fn resolve_client_key(
        &self,
        env: &dyn SecretEnv,
        file: &str,
    ) -> Result<Option<(http::header::HeaderName, SecretString)>, ConfigError> {
        let Some(required) = &self.server.require_header else {
            return Ok(None);
        };
        let err = |key: &str, problem: String| ConfigError {
            file: file.to_owned(),
            key: format!("server.require_header.{key}"),
            problem,
        };
        let name = http::header::HeaderName::try_from(required.name.as_str())
            .map_err(|_| err("name", "not a header name".into()))?;
        let value = required.value.resolve(env).map_err(|p| err("value", p))?;
        if http::HeaderValue::try_from(secrecy::ExposeSecret::expose_secret(&value)).is_err() {
            return Err(err("value", "not a valid header value".into()));
        }
        Ok(Some((name, value)))
    }

    /// Resolves the secret and key of credential `name`; errors name the key, never a value.
    pub fn resolve_secrets(
        &self,
        name: &str,
        env: &dyn SecretEnv,
        file: &str,
    ) -> Result<CredentialSecrets, ConfigError> {
        let err = |key: &str, problem: String| ConfigError {
            file: file.to_owned(),
            key: format!("credentials.{name}.{key}"),
            problem,
        };
        let c = self
            .credentials
            .get(name)
            .ok_or_else(|| err("", "no such credential".into()))?;
        let secret = c.secret.resolve(env).map_err(|p| err("secret", p))?;
        let key = match &c.encryption_key {
            None => EncryptionKey::derive(&secret),
            Some(source) => {
                let encoded = source.resolve(env).map_err(|p| err("encryption_key", p))?;
                EncryptionKey::from_base64(secrecy::ExposeSecret::expose_secret(&encoded))
                    .ok_or_else(|| {
                        err(
                            "encryption_key",
                            "must be base64 of exactly 32 bytes".into(),
                        )
                    })?
            }
        };
        Ok(CredentialSecrets { secret, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
[credentials.partner]
auth_url = "https://auth.example.com/v2/auth"
agent_id = "agent01"
secret = { env = "PARTNER_SECRET" }
[[routes]]
upstream = "https://api.example.com"
credential = "partner"
"#;

    fn problem(text: &str) -> ConfigError {
        Config::parse(text, "proxy.toml").unwrap_err()
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD, "proxy.toml").unwrap();
        assert_eq!(c.server.max_replay_body, 65536);
        assert_eq!(c.server.request_timeout, Duration::from_secs(30));
        let p = &c.credentials["partner"];
        assert_eq!(p.refresh_before, Duration::from_secs(300));
        assert_eq!(p.signature, SignatureAlg::Sha256);
        assert_eq!(c.routes[0].path_prefix, "/");
        assert_eq!(
            c.routes[0].client_authorization,
            ClientAuthorization::Replace
        );
    }

    #[test]
    fn shipped_proxy_toml_is_valid_and_uses_the_defaults() {
        let text = include_str!("../../proxy.toml");
        let c = Config::parse(text, "proxy.toml").unwrap();
        assert_eq!(c.server.listen, ServerConfig::default().listen);
        assert_eq!(c.admin.listen, AdminConfig::default().listen);
        assert_eq!(c.routes[0].credential, "partner");
        // Every commented key is a real key: uncommenting them all still parses.
        let uncommented = text
            .replace("# max_replay_body", "max_replay_body")
            .replace("# request_timeout", "request_timeout")
            .replace("# header_read_timeout", "header_read_timeout")
            .replace("# max_request_body", "max_request_body")
            .replace("# connect_timeout", "connect_timeout")
            .replace("# body_idle_timeout", "body_idle_timeout")
            .replace("# max_connections", "max_connections")
            .replace("# max_concurrent_requests", "max_concurrent_requests")
            .replace("# allowed_clients", "allowed_clients")
            .replace("# require_header", "require_header")
            .replace("# shutdown_grace", "shutdown_grace")
            .replace("# encryption_key", "encryption_key")
            .replace("# signature", "signature")
            .replace("# cipher_text_layout", "cipher_text_layout")
            .replace("# refresh_before", "refresh_before")
            .replace("# timeout", "timeout")
            .replace("# max_backoff", "max_backoff")
            .replace("# ca_file", "ca_file")
            .replace("# host", "host")
            .replace("# strip_prefix", "strip_prefix")
            .replace("# client_authorization", "client_authorization")
            .replace("# tunnel_allow", "tunnel_allow")
            .replace("# max_tunnels", "max_tunnels")
            .replace("# tunnel_idle_timeout", "tunnel_idle_timeout")
            .replace("# shared", "shared")
            .replace("# [shared_cache]", "[shared_cache]")
            .replace("# url", "url")
            .replace("# username", "username")
            .replace("# password", "password")
            .replace("# key_prefix", "key_prefix");
        let c = Config::parse(&uncommented, "proxy.toml").unwrap();
        let shared = c.shared_cache.as_ref().expect("[shared_cache] documented");
        assert_eq!(shared.key_prefix, default_key_prefix());
        assert_eq!(shared.timeout, default_shared_cache_timeout());
        assert!(c.credentials["partner"].shared);
        assert!(c.forward.allows_tunnel("GIT.example.com:443"));
        assert!(!c.forward.allows_tunnel("git.example.com:22"));
        assert_eq!(c.routes[0].host.as_deref(), Some("api.example.com"));
        assert!(c.credentials["partner"].encryption_key.is_some());
    }

    #[test]
    fn shipped_compose_config_is_valid() {
        let c = Config::parse(include_str!("../../deploy/compose/proxy.toml"), "compose").unwrap();
        assert_eq!(c.routes[0].host.as_deref(), Some("api.example.com"));
    }

    #[test]
    fn shipped_local_config_is_valid() {
        let c = Config::parse(include_str!("../../deploy/local/proxy.toml"), "local").unwrap();
        assert_eq!(c.routes.len(), 2);
        assert!(c.warnings("local").is_empty());
    }

    #[test]
    fn shipped_kubernetes_config_is_valid() {
        // The ConfigMap's `proxy.toml: |` block, de-indented.
        let manifest = include_str!("../../deploy/kubernetes/tokengate.yaml");
        let (_, rest) = manifest.split_once("proxy.toml: |\n").unwrap();
        let block = rest.split("\n---").next().unwrap();
        let text: String = block
            .lines()
            .map(|l| l.strip_prefix("    ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::parse(&text, "tokengate.yaml").unwrap();
        assert_eq!(c.routes[0].credential, "partner");
        assert!(c.warnings("tokengate.yaml").is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let e = problem(&GOOD.replace("credential = \"partner\"", "credential = \"nope\""));
        assert_eq!(e.key, "routes[0].credential");
        assert!(e.problem.contains("nope"), "{e}");
        assert!(
            e.to_string()
                .starts_with("proxy.toml: routes[0].credential: ")
        );

        let e = problem(&format!(
            "{GOOD}\n[forward]\ntunnel_allow = [\"a:1\", \"b\"]\n"
        ));
        assert_eq!(e.key, "forward.tunnel_allow[1]", "{e}");

        let e = problem(&GOOD.replace("https://api.example.com", "ftp://x"));
        assert_eq!(e.key, "routes[0].upstream", "{e}");

        let e = problem(&GOOD.replace("listen = \"127.0.0.1:0\"", "request_timeout = \"soon\""));
        assert_eq!(e.key, "server.request_timeout", "{e}");

        let e = problem(&GOOD.replace("{ env = \"PARTNER_SECRET\" }", "\"hunter2\""));
        assert_eq!(e.key, "credentials.partner.secret", "{e}");
        assert!(e.problem.contains("inline secrets are refused"), "{e}");
        assert!(!e.to_string().contains("hunter2"));

        let e = problem(&format!("{GOOD}\nbogus = 1\n"));
        assert!(e.problem.contains("bogus"), "{e}");
    }

    #[test]
    fn secrets_resolve_and_keys_must_be_32_bytes() {
        let env: BTreeMap<String, String> = [
            ("PARTNER_SECRET".into(), "s3cret".into()),
            ("SHORT_KEY".into(), "AAAA".into()),
        ]
        .into();
        let c = Config::parse(GOOD, "proxy.toml").unwrap();
        assert!(c.resolve_secrets("partner", &env, "proxy.toml").is_ok());

        let text = GOOD.replace(
            "secret = { env = \"PARTNER_SECRET\" }",
            "secret = { env = \"PARTNER_SECRET\" }\nencryption_key = { env = \"SHORT_KEY\" }",
        );
        let c = Config::parse(&text, "proxy.toml").unwrap();
        let e = c
            .resolve_secrets("partner", &env, "proxy.toml")
            .unwrap_err();
        assert_eq!(e.key, "credentials.partner.encryption_key");
        assert!(e.problem.contains("32 bytes"));

        let e = c
            .resolve_secrets("partner", &BTreeMap::new(), "proxy.toml")
            .unwrap_err();
        assert_eq!(e.key, "credentials.partner.secret");
        assert!(e.problem.contains("PARTNER_SECRET"));
    }

    #[test]
    fn a_config_without_routes_is_refused_empty_or_not() {
        for text in ["", "[server]\n", &GOOD[..GOOD.find("[[routes]]").unwrap()]] {
            let e = problem(text);
            assert_eq!(e.key, "routes", "{e}");
            assert!(e.problem.contains("no [[routes]] table"), "{e}");
        }
    }

    #[test]
    fn the_proxy_and_the_admin_api_need_addresses_of_their_own() {
        let on = |admin: &str| {
            GOOD.replace(
                "[server]",
                &format!("[admin]\nlisten = \"{admin}\"\n[server]"),
            )
        };
        let with_proxy = |text: String, proxy: &str| {
            text.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{proxy}\""))
        };
        for (proxy, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "0.0.0.0:8080"),
        ] {
            let e = problem(&with_proxy(on(admin), proxy));
            assert_eq!(e.key, "admin.listen", "{e}");
            assert!(e.problem.contains("server.listen"), "{e}");
        }
        for (proxy, admin) in [
            ("127.0.0.1:8080", "127.0.0.1:9901"),
            ("127.0.0.1:8080", "127.0.0.2:8080"),
            ("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            Config::parse(&with_proxy(on(admin), proxy), "proxy.toml").unwrap();
        }
    }

    #[test]
    fn duration_and_cidr_errors_show_the_right_form() {
        let e = problem(&GOOD.replace(
            "listen = \"127.0.0.1:0\"",
            "request_timeout = \"ten seconds\"",
        ));
        assert_eq!(e.key, "server.request_timeout");
        assert!(e.problem.contains("`ten seconds` is not a duration"), "{e}");
        assert!(e.problem.contains(r#""5s", "250ms""#), "{e}");
        let e = problem(&GOOD.replace("listen = \"127.0.0.1:0\"", "shutdown_grace = 30"));
        assert!(
            e.problem.contains(r#"such as "5s""#),
            "a bare number too: {e}"
        );

        let e = problem(&GOOD.replace(
            "listen = \"127.0.0.1:0\"",
            "allowed_clients = [\"10.0.0.0/8\", \"10.0.0.0/33\"]",
        ));
        assert_eq!(e.key, "server.allowed_clients");
        assert!(
            e.problem.contains("`10.0.0.0/33` is not a CIDR network"),
            "{e}"
        );
        let e = problem(&format!(
            "{GOOD}\n[forward]\ntunnel_allow_addresses = [\"10.1.2.3\"]\n"
        ));
        assert_eq!(e.key, "forward.tunnel_allow_addresses");
        assert!(e.problem.contains("CIDR"), "{e}");
    }

    #[test]
    fn a_credential_no_route_uses_is_a_warning() {
        let text = format!(
            "{GOOD}\n[credentials.spare]\nauth_url = \"https://a.example/v2/auth\"\n\
             agent_id = \"s\"\nsecret = {{ env = \"S\" }}\n"
        );
        let c = Config::parse(&text, "proxy.toml").unwrap();
        let warnings = c.warnings("proxy.toml");
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("proxy.toml: credentials.spare: no route uses this credential"),
            "{warnings:?}"
        );
        assert!(
            Config::parse(GOOD, "proxy.toml")
                .unwrap()
                .warnings("proxy.toml")
                .is_empty()
        );
    }

    #[test]
    fn relative_file_paths_are_read_from_the_config_files_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("secrets")).unwrap();
        std::fs::write(dir.path().join("secrets/partner"), "s3cret\n").unwrap();
        let text = GOOD
            .replace(
                "{ env = \"PARTNER_SECRET\" }",
                "{ file = \"secrets/partner\" }",
            )
            .replace(
                "credential = \"partner\"",
                "credential = \"partner\"\nca_file = \"ca.pem\"",
            );
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        // The working directory is not the config's; the paths still resolve there.
        let c = Config::load(&path).unwrap();
        assert_eq!(
            c.credentials["partner"].secret,
            SecretSource::File(dir.path().join("secrets/partner"))
        );
        assert_eq!(c.routes[0].ca_file, Some(dir.path().join("ca.pem")));
        let secrets = c
            .resolve_secrets("partner", &BTreeMap::new(), "proxy.toml")
            .unwrap();
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(&secrets.secret),
            "s3cret"
        );
        // Absolute paths stay as they are.
        let absolute = Config::parse(
            &GOOD.replace(
                "{ env = \"PARTNER_SECRET\" }",
                "{ file = \"/run/secrets/partner\" }",
            ),
            "proxy.toml",
        )
        .unwrap();
        let mut anchored = absolute;
        anchored.anchor_paths(dir.path());
        assert_eq!(
            anchored.credentials["partner"].secret,
            SecretSource::File("/run/secrets/partner".into())
        );
    }
}
