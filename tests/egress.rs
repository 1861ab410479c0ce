//! The egress gateway: `HTTP_PROXY` clients (curl, Python requests, a raw HTTP/1.0 client) and
//! CONNECT tunnels through the SSRF guard.

mod common;

use bytes::Bytes;
use common::raw::*;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_clients_curl_python_requests_and_http_1_0_reach_the_routed_host_only() {
    let h = Harness::with(Setup {
        route_extra: "host = \"api.example.com\"".into(),
        ..Setup::default()
    })
    .await;
    let proxy = format!("http://{}", h.proxy);
    let run = |program: &'static str, args: Vec<String>| async move {
        let out = tokio::process::Command::new(program)
            .args(&args)
            .output()
            .await
            .unwrap_or_else(|e| {
                panic!("{program} is needed by this test (.ci/run installs it): {e}")
            });
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };

    // curl -x: the token goes out; the client's plain-http URL names the routed host.
    let (ok, body) = run(
        "curl",
        vec![
            "-sS".into(),
            "-x".into(),
            proxy.clone(),
            "http://api.example.com/v1/curl".into(),
        ],
    )
    .await;
    assert!(ok, "{body}");
    assert!(
        json(&Bytes::from(body.clone()))["headers"]["authorization"]
            .as_str()
            .unwrap()
            .starts_with("Bearer ")
    );
    // A host no route covers: 403 no_route; never an open proxy.
    let (_, status) = run(
        "curl",
        vec![
            "-s".into(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "-x".into(),
            proxy.clone(),
            "http://elsewhere.example/".into(),
        ],
    )
    .await;
    assert_eq!(status, "403");

    // Python requests with HTTP_PROXY set, as a legacy app would run.
    let script = "import os, requests; r = requests.get('http://api.example.com/v1/python'); print(r.status_code, r.json()['path'], r.json()['headers']['authorization'][:9])";
    let out = tokio::process::Command::new("python3")
        .args(["-c", script])
        .env("HTTP_PROXY", &proxy)
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .await
        .expect("python3 is needed by this test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        "200 /v1/python Bearer ey",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An HTTP/1.0 client: absolute form, no Host header.
    let (status, head) = raw_request(
        h.proxy,
        "GET http://api.example.com/v1/old HTTP/1.0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{head}");
    assert!(head.starts_with("http/1.0 200"), "{head}");
    assert!(head.contains("bearer ey"), "{head}");
    assert_eq!(
        h.upstream.requests(),
        3,
        "curl, python and HTTP/1.0 reached the upstream; the 403 did not"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_only_to_listed_targets_whose_addresses_pass_the_ssrf_guard() {
    use std::collections::HashMap;
    use tokengate::upstream::ssrf::StaticResolver;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (echo, seen) = echo_server().await;
    let dns = StaticResolver(HashMap::from(
        [
            ("echo.test", "127.0.0.1"),
            ("metadata.test", "169.254.169.254"),
            ("internal.test", "10.1.2.3"),
            ("cgnat.test", "100.64.0.7"),
            ("mapped.test", "::ffff:127.0.0.1"),
            ("nat64.test", "64:ff9b::7f00:1"),
        ]
        .map(|(host, ip)| (host.to_owned(), vec![ip.parse().unwrap()])),
    ));
    let listed = ["echo", "metadata", "internal", "cgnat", "mapped", "nat64"]
        .map(|h| format!("\"{h}.test:{echo}\""))
        .join(", ");
    let h = Harness::with(Setup {
        forward: format!("tunnel_allow = [{listed}]\ntunnel_allow_addresses = [\"127.0.0.1/32\"]"),
        resolver: Some(std::sync::Arc::new(dns)),
        ..Setup::default()
    })
    .await;

    // A listed target on an allowed address: 200, then bytes go through untouched, both ways.
    let (head, mut tunnel) = connect(h.proxy, &format!("echo.test:{echo}")).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let payload = b"GET /x HTTP/1.1\r\nHost: echo.test\r\n\r\n";
    tunnel.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    tunnel.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        payload,
        "the tunnel is blind: nothing injected"
    );

    // Unlisted: 403 no_route. Listed but resolving to a denied class: 403 forbidden.
    let (head, mut refused) = connect(h.proxy, &format!("other.test:{echo}")).await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(head.contains("x-tokengate-error: no_route"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse().ok())
        .expect("a JSON body of known length");
    let mut body = vec![0u8; length];
    tokio::io::AsyncReadExt::read_exact(&mut refused, &mut body)
        .await
        .unwrap();
    assert_eq!(
        json(&Bytes::from(body))["message"],
        format!("CONNECT target `other.test:{echo}` is not listed in forward.tunnel_allow")
    );
    for host in ["metadata", "internal", "cgnat", "mapped", "nat64"] {
        let (head, _) = connect(h.proxy, &format!("{host}.test:{echo}")).await;
        assert!(head.starts_with("http/1.1 403"), "{host}: {head}");
        assert!(
            head.contains("x-tokengate-error: forbidden"),
            "{host}: {head}"
        );
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        payload.len(),
        "nothing else was dialled"
    );
    assert_eq!(h.new_exchanges(), 0, "tunnels need no token");
    drop(tunnel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_a_tunnel_reaches_the_upstream_without_a_token() {
    use std::collections::HashMap;
    use tokengate::upstream::ssrf::StaticResolver;

    let dns = StaticResolver(HashMap::from([(
        "upstream.test".to_owned(),
        vec!["127.0.0.1".parse().unwrap()],
    )]));
    let mut h = Harness::with(Setup {
        forward: "tunnel_allow_addresses = [\"127.0.0.1/32\"]".into(),
        resolver: Some(std::sync::Arc::new(dns)),
        ..Setup::default()
    })
    .await;
    let port = h.upstream_addr.port();
    let curl = |target: String| {
        let proxy = format!("http://{}", h.proxy);
        async move {
            tokio::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-p", "-x"])
                .arg(proxy)
                .arg(target)
                .output()
                .await
                .expect("curl is needed by this test (.ci/run installs it)")
        }
    };
    let target = format!("http://upstream.test:{port}/through-tunnel");
    // No tunnel_allow: CONNECT is refused (405), and curl reports the failed tunnel.
    let out = curl(target.clone()).await;
    assert!(!out.status.success());
    assert_eq!(h.upstream.requests(), 0);

    // Listed: curl speaks HTTP inside the tunnel; the upstream sees it without a token (401).
    let config = h.config_text.replace(
        "[forward]\n",
        &format!("[forward]\ntunnel_allow = [\"upstream.test:{port}\"]\n"),
    );
    h.gateway
        .reload(
            tokengate::Config::parse(&config, "test.toml").unwrap(),
            &h.env,
        )
        .unwrap();
    h.config_text = config;
    let out = curl(target).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    assert_eq!(h.upstream.unauthorized(), 1);
    assert_eq!(h.new_exchanges(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_from_a_client_outside_allowed_clients_is_refused_before_any_dial() {
    use std::collections::HashMap;
    use tokengate::upstream::ssrf::StaticResolver;

    let (echo, seen) = echo_server().await;
    let dns = StaticResolver(HashMap::from([(
        "echo.test".to_owned(),
        vec!["127.0.0.1".parse().unwrap()],
    )]));
    let h = Harness::with(Setup {
        server_extra: "allowed_clients = [\"10.0.0.0/8\"]".into(),
        forward: format!(
            "tunnel_allow = [\"echo.test:{echo}\"]\ntunnel_allow_addresses = [\"127.0.0.1/32\"]"
        ),
        resolver: Some(std::sync::Arc::new(dns)),
        ..Setup::default()
    })
    .await;
    // A listed target on an allowed address (the tunnel would open), but the client may not
    // use the proxy at all.
    let (head, _) = connect(h.proxy, &format!("echo.test:{echo}")).await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(head.contains("x-tokengate-error: forbidden"), "{head}");
    assert!(seen.lock().unwrap().is_empty(), "nothing went through");
}
