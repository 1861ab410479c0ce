//! No secret, derived key, cipherText plaintext or token may reach a log line (at trace level,
//! every crate included), an error body or a `Debug` output.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine;
use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use sha2::{Digest, Sha256};
use tokengate::sandbox::auth::Fault;

const CLIENT_KEY: &str = "client-key-Xr5wP0";

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_and_tokens_never_reach_logs_error_bodies_or_debug() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let key = Sha256::digest(SECRET.as_bytes());
    let key_b64 = base64::engine::general_purpose::STANDARD.encode(key);
    let mut outputs: Vec<String> = Vec::new();
    let mut tokens: Vec<String> = Vec::new();
    let client = client();

    // Cold exchange, a buffered POST, a revoke and replay, a stream, and HTTP/2; with an explicit
    // encryption_key so the key path runs too.
    let h = Harness::with(Setup {
        credential_extra: "encryption_key = { env = \"PARTNER_KEY\" }".into(),
        env: vec![("PARTNER_KEY".into(), key_b64.clone())],
        ..Setup::default()
    })
    .await;
    h.warm(&client).await;
    h.upstream.revoke_seen();
    let post = Request::post(h.url("/orders"))
        .body(full(Bytes::from_static(b"{\"n\":1}")))
        .unwrap();
    assert_eq!(send(&client, post).await.0, StatusCode::OK);
    let (_, _, big) = send(&client, get(&h.url("/bytes/300000"))).await;
    assert_eq!(big.len(), 300000);
    h.upstream.set_always_401(true);
    let (status, _, body) = send(&client, get(&h.url("/denied"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    outputs.push(String::from_utf8_lossy(&body).into());
    outputs.push(format!("{:?}", h.gateway));
    outputs.push(format!(
        "{:?}",
        h.gateway.credential("partner").unwrap().current().await
    ));
    tokens.extend(h.upstream.tokens());

    // Refusals, retries and outages: codes 10 and 83, an hmac signature the server does not
    // expect, garbage, and an unreachable auth server.
    let unknown = Harness::with(Setup {
        agent_id: "integratorUnknown99".into(),
        ..Setup::default()
    })
    .await;
    let hmac = Harness::with(Setup {
        credential_extra: "signature = \"hmac-sha256\"".into(),
        ..Setup::default()
    })
    .await;
    let mut faulty = Harness::start().await;
    // A shared client key, presented wrong and right.
    let keyed = Harness::with(Setup {
        server_extra: "require_header = { name = \"x-key\", value = { env = \"CLIENT_KEY\" } }"
            .into(),
        env: vec![("CLIENT_KEY".into(), CLIENT_KEY.into())],
        ..Setup::default()
    })
    .await;
    for key in [CLIENT_KEY, "wrong-key"] {
        let req = Request::get(keyed.url("/k"))
            .header("x-key", key)
            .body(full(Bytes::new()))
            .unwrap();
        let (_, headers, body) = send(&client, req).await;
        outputs.push(format!("{headers:?} {}", String::from_utf8_lossy(&body)));
    }
    outputs.push(format!("{:?}", keyed.gateway));
    for (harness, want) in [(&unknown, 502), (&hmac, 502)] {
        let (status, headers, body) = send(&client, get(&harness.url("/x"))).await;
        assert_eq!(status.as_u16(), want);
        outputs.push(format!("{headers:?} {}", String::from_utf8_lossy(&body)));
    }
    assert_eq!(hmac.auth.codes(), vec![83, 83]);
    faulty.fail_auth(Fault::Garbage).await;
    let (status, _, body) = send(&client, get(&faulty.url("/x"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    outputs.push(String::from_utf8_lossy(&body).into());
    faulty.stop_auth().await;
    faulty.refetch().await;
    let (status, _, body) = send(&client, get(&faulty.url("/x"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    outputs.push(String::from_utf8_lossy(&body).into());

    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).to_string();
    // The capture works and saw the interesting paths, so the checks below mean something.
    assert!(logs.contains("token obtained"), "capture is empty?");
    assert!(logs.contains("token exchange failed"));
    assert!(logs.contains("TRACE"), "trace level was captured");

    assert!(!tokens.is_empty());
    let plaintext = format!(r#"{{"agentId":"{AGENT}","secret":"{SECRET}"}}"#);
    let mut forbidden = vec![
        ("secret", SECRET.to_owned()),
        ("derived key (hex)", hex::encode(key)),
        ("derived key (base64)", key_b64),
        ("cipherText plaintext", plaintext),
        ("client key", CLIENT_KEY.to_owned()),
    ];
    for t in tokens {
        // The whole token, and its signature part alone (the claims are not secret).
        forbidden.push(("token signature", t.rsplit('.').next().unwrap().to_owned()));
        forbidden.push(("token", t));
    }
    for (what, value) in &forbidden {
        assert!(
            !logs.contains(value.as_str()),
            "the {what} reached the logs"
        );
        for out in &outputs {
            assert!(
                !out.contains(value.as_str()),
                "the {what} reached an output: {out}"
            );
        }
    }
    drop((h, unknown, hmac));
}
