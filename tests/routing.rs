//! Routes, client access and upstreams: matching and rewriting, `client_authorization`, allowed
//! clients and the shared key, inbound and outbound TLS, refused methods and redirects.

mod common;

use bytes::Bytes;
use common::raw::*;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_clients_holding_the_shared_key_get_through() {
    let outsider = Harness::with_server("allowed_clients = [\"10.0.0.0/8\", \"::1/128\"]").await;
    let (status, headers, _) = send(&client(), get(&outsider.url("/x"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(headers["x-tokengate-error"], "forbidden");
    assert_eq!(
        (outsider.new_exchanges(), outsider.upstream.requests()),
        (0, 0)
    );

    let h = Harness::with(Setup {
        server_extra: r#"
allowed_clients = ["127.0.0.0/8"]
require_header = { name = "x-tokengate-key", value = { env = "CLIENT_KEY" } }
"#
        .into(),
        env: vec![("CLIENT_KEY".into(), "client-key-7Hq2".into())],
        ..Setup::default()
    })
    .await;
    let with_key = |key: &str| {
        Request::get(h.url("/keyed"))
            .header("x-tokengate-key", key)
            .body(full(Bytes::new()))
            .unwrap()
    };
    let (status, _, _) = send(&client(), get(&h.url("/nokey"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = send(&client(), with_key("client-key-7Hq")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(h.new_exchanges(), 0, "refused before any exchange");
    let (status, _, echo) = send(&client(), with_key("client-key-7Hq2")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        json(&echo)["headers"].get("x-tokengate-key").is_none(),
        "the shared key is not forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_tls_with_client_certificates_refuses_clients_without_one() {
    let ca = tls::test_ca();
    let h = Harness::with(Setup {
        server_extra: format!(
            "tls = {{ cert_file = \"{}\", key_file = \"{}\", client_ca_file = \"{}\" }}",
            ca.server_cert_file.display(),
            ca.server_key_file.display(),
            ca.ca_file.display()
        ),
        ..Setup::default()
    })
    .await;
    let https = |with_cert: bool| {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(ca.client(with_cert))
            .https_only()
            .enable_all_versions()
            .build();
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build::<_, TestBody>(connector)
    };
    let url = format!("https://localhost:{}/over-tls", h.proxy.port());

    let response = https(true).request(get(&url)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let echo = response.into_body().collect().await.unwrap().to_bytes();
    assert!(
        json(&echo)["headers"]["authorization"]
            .as_str()
            .unwrap()
            .starts_with("Bearer ")
    );

    let refused = https(false).request(get(&url)).await;
    assert!(
        refused.is_err(),
        "a client without a certificate is refused in the handshake"
    );
    // Plain HTTP on the TLS port gets nowhere either.
    let plain = client().request(get(&h.url("/plain"))).await;
    assert!(plain.is_err() || plain.unwrap().status() != StatusCode::OK);
    assert_eq!(h.upstream.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_authorization_is_replaced_by_exactly_one_bearer() {
    let h = Harness::start().await;
    let req = Request::get(h.url("/me"))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .header("proxy-authorization", "Basic cHJveHk6cGFzcw==")
        .header("connection", "x-hop")
        .header("x-hop", "drop me")
        .header("x-kept", "keep me")
        .body(full(Bytes::new()))
        .unwrap();
    let (status, _, echo) = send(&client(), req).await;
    assert_eq!(status, StatusCode::OK);
    let echo = json(&echo);
    let auth = echo["headers"]["authorization"].as_str().unwrap();
    assert!(auth.starts_with("Bearer ey"), "{auth}");
    assert!(echo["headers"].get("proxy-authorization").is_none());
    assert!(echo["headers"].get("x-hop").is_none());
    assert_eq!(echo["headers"]["x-kept"], "keep me");
    let log = h.upstream.log();
    assert_eq!(log.last().unwrap().authorization_headers, 1);

    // `Connection: authorization` cannot remove the injected token.
    let req = Request::get(h.url("/me"))
        .header("connection", "authorization")
        .header("authorization", "Basic dXNlcjpwYXNz")
        .body(full(Bytes::new()))
        .unwrap();
    let (status, _, echo) = send(&client(), req).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        json(&echo)["headers"]["authorization"]
            .as_str()
            .unwrap()
            .starts_with("Bearer ")
    );
    assert_eq!(h.upstream.log().last().unwrap().authorization_headers, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_authorization_keep_and_reject() {
    let h = Harness::with(Setup {
        routes_before: r#"
[[routes]]
path_prefix = "/keep/"
upstream = "http://{upstream}"
credential = "partner"
client_authorization = "keep"

[[routes]]
path_prefix = "/reject/"
upstream = "http://{upstream}"
credential = "partner"
client_authorization = "reject"
"#
        .into(),
        ..Setup::default()
    })
    .await;
    let client = client();
    let with_auth = |path: &str| {
        Request::get(h.url(path))
            .header("authorization", "Bearer client-own")
            .body(full(Bytes::new()))
            .unwrap()
    };
    let (status, _, _) = send(&client, with_auth("/keep/x")).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the client's own token went through, untouched"
    );
    assert_eq!(
        h.upstream.requests(),
        1,
        "no replay when our token was not used"
    );
    assert_eq!(h.new_exchanges(), 0, "no exchange when nothing is injected");
    let (status, _, _) = send(&client, get(&h.url("/keep/x"))).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "keep still injects when the client sends none"
    );

    let (status, headers, _) = send(&client, with_auth("/reject/x")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(headers["x-tokengate-error"], "bad_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_match_host_and_prefix_and_rewrite_the_uri() {
    let h = Harness::with(Setup {
        routes_before: r#"
[[routes]]
host = "api.example.com"
path_prefix = "/v1/"
upstream = "http://{upstream}/base"
credential = "partner"
strip_prefix = true
"#
        .into(),
        route_extra: "host = \"localhost\"".into(),
        ..Setup::default()
    })
    .await;
    let client = client();
    let req = Request::get(h.url("/v1/items?id=7"))
        .header("host", "api.example.com")
        .body(full(Bytes::new()))
        .unwrap();
    let (status, _, echo) = send(&client, req).await;
    assert_eq!(status, StatusCode::OK);
    let echo = json(&echo);
    assert_eq!(echo["path"], "/base/items");
    assert_eq!(echo["query"], "id=7");
    assert_eq!(
        echo["headers"]["host"],
        h.upstream_addr.to_string(),
        "Host is the upstream's"
    );

    // Origin-form with an unknown host: 404 no_route.
    let req = Request::get(h.url("/v1/items"))
        .header("host", "other.example.com")
        .body(full(Bytes::new()))
        .unwrap();
    let (status, headers, body) = send(&client, req).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["x-tokengate-error"], "no_route");
    assert_eq!(json(&body)["kind"], "no_route");

    // Absolute-form (HTTP_PROXY use) naming a host no route covers: 403, never an open proxy.
    let (status, headers) = raw_request(
        h.proxy,
        "GET http://evil.example.net/steal HTTP/1.1\r\nHost: evil.example.net\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 403);
    assert!(headers.contains("x-tokengate-error: no_route"), "{headers}");
    assert_eq!(h.upstream.requests(), 1);

    // Absolute-form naming a routed host: forwarded with the token.
    let (status, _) = raw_request(
        h.proxy,
        "GET http://api.example.com/v1/ok HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_use_webpki_roots_plus_ca_file_and_refuse_unknown_certificates() {
    let ca = tls::test_ca();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let h = Harness::with(Setup {
        routes_before: format!(
            r#"
[[routes]]
path_prefix = "/trusted/"
upstream = "https://localhost:{port}"
credential = "partner"
ca_file = "{}"

[[routes]]
path_prefix = "/untrusted/"
upstream = "https://localhost:{port}"
credential = "partner"
"#,
            ca.ca_file.display()
        ),
        ..Setup::default()
    })
    .await;
    // The sandbox upstream, also served over TLS with a certificate from the test CA.
    let tls_upstream = h.upstream.serve_tls(listener, ca.server.clone()).unwrap();
    let client = client();

    let (status, _, echo) = send(&client, get(&h.url("/trusted/x"))).await;
    assert_eq!(status, StatusCode::OK, "{echo:?}");
    assert!(
        json(&echo)["headers"]["authorization"]
            .as_str()
            .unwrap()
            .starts_with("Bearer ")
    );
    assert_eq!(h.upstream.requests(), 1);

    let (status, headers, body) = send(&client, get(&h.url("/untrusted/x"))).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["x-tokengate-error"], "upstream_unreachable");
    assert!(!String::from_utf8_lossy(&body).contains("Bearer"));
    assert_eq!(
        h.upstream.requests(),
        1,
        "no request reached an upstream we do not trust"
    );

    // A revoked token over HTTPS (hyper's client, which consumes the request): the copy taken
    // before sending is replayed byte for byte.
    h.upstream.revoke_seen();
    let body = b"over tls, twice".to_vec();
    let req = Request::post(h.url("/trusted/orders"))
        .body(full(body.clone()))
        .unwrap();
    let (status, _, echo) = send(&client, req).await;
    assert_eq!(status, StatusCode::OK, "{echo:?}");
    let log = h.upstream.log();
    let posts: Vec<_> = log
        .iter()
        .filter(|s| s.target == "POST /trusted/orders")
        .collect();
    assert_eq!(posts.len(), 2, "one 401, one replay: {log:?}");
    assert_eq!((posts[0].status, posts[1].status), (401, 200));
    assert_eq!(posts[1].body.as_ref(), body.as_slice());
    drop(tls_upstream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_trace_get_405_and_redirects_are_passed_through() {
    let h = Harness::start().await;
    let (status, head) = raw_request(
        h.proxy,
        "CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405, "{head}");
    assert!(
        head.contains("x-tokengate-error: method_not_allowed"),
        "{head}"
    );
    assert!(
        head.contains("list the target (host:port) in forward.tunnel_allow"),
        "the answer names the setting that allows it: {head}"
    );
    let req = Request::builder()
        .method("TRACE")
        .uri(h.url("/x"))
        .body(full(Bytes::new()))
        .unwrap();
    let (status, _, body) = send(&client(), req).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        json(&body)["message"],
        "TRACE is never forwarded: it would echo the injected token"
    );
    assert_eq!(h.upstream.requests(), 0);
    assert_eq!(h.new_exchanges(), 0);

    let (status, headers, _) = send(&client(), get(&h.url("/redirect"))).await;
    assert_eq!(status, StatusCode::FOUND, "never followed");
    assert_eq!(headers["location"], "/elsewhere");
    assert_eq!(h.upstream.requests(), 1);
}
