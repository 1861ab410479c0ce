//! The `tokengate` command line: `run`, `check`, `token`, `demo`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use tokengate::ErrorChain;
use tokengate::config::{Config, ConfigError, ProcessEnv, SecretSource};
use tokengate::{Gateway, demo};

/// mimalloc: fewer instructions per request than glibc's malloc (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tokengate",
    version,
    about = "Authenticating reverse proxy and egress gateway"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum SandboxServer {
    /// The sandbox auth server (`POST /v2/auth`, docs/PROTOCOL.md).
    Auth {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// The agent id it accepts.
        #[arg(long)]
        agent: String,
        /// The agent's secret.
        #[arg(long, env = "SANDBOX_AGENT_SECRET", hide_env_values = true)]
        secret: String,
        /// Token lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        expires_in: u64,
        /// The HS256 key tokens are signed with, 64 hex characters (shared with the upstream).
        #[arg(long, env = "SANDBOX_JWT_KEY", hide_env_values = true)]
        jwt_key: String,
        /// Keep one active token per agent, as many providers do: issuing a token revokes the
        /// previous ones (the sandbox upstream refuses a token once it has seen a later one).
        #[arg(long)]
        single_active_token: bool,
    },
    /// The sandbox upstream: echoes requests carrying a valid sandbox token.
    Upstream {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: SocketAddr,
        /// The HS256 key tokens are verified with, 64 hex characters (shared with the auth server).
        #[arg(long, env = "SANDBOX_JWT_KEY", hide_env_values = true)]
        jwt_key: String,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Serve the proxy and the admin endpoints.
    Run {
        /// The configuration file.
        #[arg(long, env = "TOKENGATE_CONFIG", default_value = "./proxy.toml")]
        config: PathBuf,
    },
    /// Load, validate and resolve secrets; print a summary without secrets.
    Check {
        /// The configuration file.
        #[arg(long, env = "TOKENGATE_CONFIG", default_value = "./proxy.toml")]
        config: PathBuf,
    },
    /// Run one exchange for credential NAME and print expiry, age and logUUID.
    Token {
        /// The configuration file.
        #[arg(long, env = "TOKENGATE_CONFIG", default_value = "./proxy.toml")]
        config: PathBuf,
        /// The credential to exchange for.
        name: String,
        /// Also print the token itself.
        #[arg(long)]
        show: bool,
    },
    /// Run one sandbox server alone (for docker compose): `auth` or `upstream`.
    Sandbox {
        #[command(subcommand)]
        server: SandboxServer,
    },
    /// A built-in sandbox auth server and echo upstream with the proxy in front; Ctrl-C stops.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = demo::DEFAULT_LISTEN)]
        listen: SocketAddr,
    },
}

/// The tokio runtime: `TOKENGATE_RUNTIME=current-thread|multi-thread`, by default
/// current-thread when the process may use one CPU (e.g. pinned by `taskset` or a CPU limit of
/// one core), multi-thread otherwise. docs/BENCHMARKS.md has the measurements behind it.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let one_cpu = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let current = match std::env::var("TOKENGATE_RUNTIME").as_deref() {
        Ok("current-thread") => true,
        Ok("multi-thread") => false,
        _ => one_cpu,
    };
    if current {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokengate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run { config } => run(&config).await,
            Command::Check { config } => check(&config).await,
            Command::Token { config, name, show } => token(&config, &name, show).await,
            Command::Demo { listen } => demo::run(listen)
                .await
                .map_err(|e| ErrorChain(&e).to_string()),
            Command::Sandbox { server } => sandbox(server).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tokengate: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &Path) -> Result<Gateway, ConfigError> {
    let config = Config::load(path)?;
    Gateway::new(config, &path.display().to_string(), &ProcessEnv)
}

async fn sandbox(server: SandboxServer) -> Result<(), String> {
    use tokengate::sandbox::{JwtKey, auth, upstream};
    let key = |hex: &str| JwtKey::from_hex(hex).ok_or("--jwt-key must be 64 hex characters");
    let bind = |addr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let handle = match server {
        SandboxServer::Auth {
            listen,
            agent,
            secret,
            expires_in,
            jwt_key,
            single_active_token,
        } => {
            let state = auth::AuthState::new(
                vec![auth::Agent::new(&agent, &secret)],
                key(&jwt_key)?,
                expires_in,
            );
            state.set_single_active_token(single_active_token);
            state
                .serve(bind(listen).await?)
                .map_err(|e| e.to_string())?
        }
        SandboxServer::Upstream { listen, jwt_key } => {
            let state = upstream::UpstreamState::new(key(&jwt_key)?);
            state
                .serve(bind(listen).await?)
                .map_err(|e| e.to_string())?
        }
    };
    tracing::info!(addr = %handle.addr(), "sandbox serving");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch signals: {e}"))?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

async fn run(path: &Path) -> Result<(), String> {
    use tokio::signal::unix::{SignalKind, signal};
    let gateway = load(path).map_err(|e| e.to_string())?;
    let warn = |gateway: &Gateway| {
        for warning in gateway
            .snapshot()
            .config
            .warnings(&path.display().to_string())
        {
            tracing::warn!(%warning, "configuration warning");
        }
    };
    warn(&gateway);
    let running = gateway
        .start()
        .await
        .map_err(|e| format!("{}: {}", path.display(), ErrorChain(&e)))?;
    let signals = |kind| signal(kind).map_err(|e| format!("cannot watch signals: {e}"));
    let (mut hangup, mut terminate, mut interrupt) = (
        signals(SignalKind::hangup())?,
        signals(SignalKind::terminate())?,
        signals(SignalKind::interrupt())?,
    );
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                match gateway.reload_from(path, &ProcessEnv) {
                    Ok(()) => warn(&gateway),
                    Err(error) => {
                        tracing::error!(%error, "reload refused; the running configuration keeps serving");
                    }
                }
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("shutting down; draining in-flight requests");
    running.shutdown().await;
    Ok(())
}

async fn check(path: &Path) -> Result<(), String> {
    let gateway = load(path).map_err(|e| e.to_string())?;
    let snapshot = gateway.snapshot();
    let c = &snapshot.config;
    let source = |s: &SecretSource| match s {
        SecretSource::Env(var) => format!("env {var}"),
        SecretSource::File(p) => format!("file {}", p.display()),
    };
    println!("{}: ok", path.display());
    for warning in c.warnings(&path.display().to_string()) {
        eprintln!("warning: {warning}");
    }
    println!(
        "server  listen {}  max_replay_body {}  request_timeout {}  header_read_timeout {}",
        c.server.listen,
        c.server.max_replay_body,
        humantime::format_duration(c.server.request_timeout),
        humantime::format_duration(c.server.header_read_timeout)
    );
    println!("admin   listen {}", c.admin.listen);
    for (name, cred) in &c.credentials {
        println!(
            "credential {name}  {}  agent {}  secret from {}  key {}  signature {}  layout {}  refresh_before {}  timeout {}  shared {}",
            cred.auth_url.0,
            cred.agent_id,
            source(&cred.secret),
            cred.encryption_key
                .as_ref()
                .map_or("SHA-256(secret)".into(), |k| format!("from {}", source(k))),
            cred.signature,
            cred.cipher_text_layout,
            humantime::format_duration(cred.refresh_before),
            humantime::format_duration(cred.timeout),
            c.shared_cache.is_some() && cred.shared,
        );
    }
    if let (Some(shared), Some(fleet)) = (&c.shared_cache, &snapshot.fleet) {
        // Said, not refused: a replica with Redis down still serves, alone.
        let answers = match fleet.ping().await {
            Ok(()) => "answers",
            Err(_) => "does NOT answer (replicas would act alone)",
        };
        println!(
            "shared_cache  {}  user {}  password {}  key from {}  prefix {}  timeout {}  redis {answers}",
            shared.url,
            shared.username.as_deref().unwrap_or("-"),
            shared
                .password
                .as_ref()
                .map_or("-".into(), |p| format!("from {}", source(p))),
            source(&shared.encryption_key),
            shared.key_prefix,
            humantime::format_duration(shared.timeout),
        );
    }
    for (i, r) in c.routes.iter().enumerate() {
        println!(
            "routes[{i}]  host {}  path_prefix {}  -> {}  credential {}  strip_prefix {}  client_authorization {}",
            r.host.as_deref().unwrap_or("*"),
            r.path_prefix,
            r.upstream.0,
            r.credential,
            r.strip_prefix,
            r.client_authorization,
        );
    }
    Ok(())
}

async fn token(path: &Path, name: &str, show: bool) -> Result<(), String> {
    let gateway = load(path).map_err(|e| e.to_string())?;
    let source = gateway.credential(name).ok_or_else(|| {
        format!(
            "{}: credentials.{name}: no such credential (defined: {})",
            path.display(),
            gateway.snapshot().config.credential_names()
        )
    })?;
    let auth_url = &gateway.snapshot().config.credentials[name].auth_url.0;
    let token = source.exchange_once().await.map_err(|e| {
        format!(
            "{}: credentials.{name}: the exchange with auth_url {auth_url} failed: {}",
            path.display(),
            ErrorChain(&*e)
        )
    })?;
    let now = Instant::now();
    println!("credential  {name}");
    println!(
        "expires_in  {}",
        humantime::format_duration(round(token.expires_at().saturating_duration_since(now)))
    );
    println!(
        "age         {}",
        humantime::format_duration(round(now - token.obtained_at()))
    );
    println!("log_uuid    {}", token.log_uuid().unwrap_or("-"));
    if show {
        println!("token       {}", token.expose());
    }
    Ok(())
}

fn round(d: std::time::Duration) -> std::time::Duration {
    std::time::Duration::from_millis(d.as_millis() as u64)
}
