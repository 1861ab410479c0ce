//! `tokengate demo`: the sandbox auth server and echo upstream on ephemeral loopback ports, the
//! proxy in front of them, and the `curl` line to try.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;

use crate::config::{Config, ConfigError};
use crate::gateway::Gateway;
use crate::sandbox::Sandbox;
use crate::sandbox::auth::Agent;

/// Where the demo proxy listens unless `--listen` says otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The sandbox agent the demo credential uses.
pub const DEMO_AGENT: &str = "integratorDemo01";
/// Token lifetime granted by the demo's auth server, in seconds.
pub const DEMO_EXPIRES_IN: u64 = 3600;

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The sandbox's sockets could not be bound.
    #[error("cannot start the sandbox")]
    Sandbox(#[from] std::io::Error),
    /// The proxy could not start (its address is named).
    #[error(transparent)]
    Start(#[from] crate::server::StartError),
    /// The generated config was refused (a bug).
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// The demo's `proxy.toml`; its secret comes from the environment the demo builds.
fn demo_config(listen: SocketAddr, auth_url: &str, upstream: SocketAddr) -> String {
    format!(
        r#"
[server]
listen = "{listen}"

[admin]
listen = "127.0.0.1:0"

[credentials.sandbox]
auth_url = "{auth_url}"
agent_id = "{DEMO_AGENT}"
secret = {{ env = "TOKENGATE_DEMO_SECRET" }}

[[routes]]
upstream = "http://{upstream}"
credential = "sandbox"
"#
    )
}

/// Runs the demo until Ctrl-C.
pub async fn run(listen: SocketAddr) -> Result<(), DemoError> {
    let secret = hex::encode(rand::random::<[u8; 24]>());
    let sandbox = Sandbox::start(vec![Agent::new(DEMO_AGENT, &secret)], DEMO_EXPIRES_IN).await?;
    let config = Config::parse(
        &demo_config(listen, &sandbox.auth_url(), sandbox.upstream_addr()),
        "<demo>",
    )?;
    let env = BTreeMap::from([("TOKENGATE_DEMO_SECRET".to_owned(), secret)]);
    let gateway = Gateway::new(config, "<demo>", &env)?;
    let running = gateway.start().await?;
    let proxy = running.proxy_addr();

    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "tokengate demo\n\
         \x20 sandbox auth server  {}  (agent {DEMO_AGENT})\n\
         \x20 sandbox upstream     http://{}  (echoes what it receives, if the token is valid)\n\
         \x20 proxy                http://{proxy}\n\
         \x20 admin                http://{}/readyz\n\n\
         Try:\n\
         \x20 curl -s http://{proxy}/hello\n\n\
         The echo shows the Authorization header tokengate injected. Ctrl-C stops.",
        sandbox.auth_url(),
        sandbox.upstream_addr(),
        running.admin_addr(),
    );
    let _ = out.flush();
    drop(out);

    let _ = tokio::signal::ctrl_c().await;
    running.shutdown().await;
    Ok(())
}
