//! Operating the proxy: the admin API, metrics and reloads.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::raw::*;
use common::*;
use http::{Request, StatusCode};
use tokengate::sandbox::auth::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_routes_atomically_keeps_unchanged_tokens_and_refuses_bad_configs() {
    use tokengate::Config;
    let h = Harness::start().await;
    let client = client();
    h.warm(&client).await;
    assert_eq!(h.auth.requests(), 1);

    // A request in flight across the reload completes.
    let in_flight = tokio::spawn({
        let (client, url) = (client.clone(), h.url("/slow/700"));
        async move { send(&client, get(&url)).await.0 }
    });
    while h.upstream.requests() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Add a route in front; the credential is unchanged, so its token is kept.
    let added = h.config_text.replace(
        "[[routes]]",
        &format!(
            "[[routes]]\npath_prefix = \"/moved/\"\nupstream = \"http://{}/base\"\ncredential = \"partner\"\nstrip_prefix = true\n\n[[routes]]",
            h.upstream_addr
        ),
    );
    h.gateway
        .reload(Config::parse(&added, "test.toml").unwrap(), &h.env)
        .unwrap();
    let (status, _, echo) = send(&client, get(&h.url("/moved/x"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&echo)["path"], "/base/x", "the new route serves");
    assert_eq!(
        in_flight.await.unwrap(),
        StatusCode::OK,
        "the in-flight request finished"
    );
    assert_eq!(
        h.auth.requests(),
        1,
        "the unchanged credential kept its token"
    );

    // A bad config is refused, naming the problem; the running one keeps serving.
    let bad = added.replace(
        "credential = \"partner\"\nstrip_prefix",
        "credential = \"nope\"\nstrip_prefix",
    );
    let error = Config::parse(&bad, "test.toml").unwrap_err();
    assert_eq!(error.key, "routes[0].credential");
    let env_missing = BTreeMap::new();
    let error = h
        .gateway
        .reload(Config::parse(&added, "test.toml").unwrap(), &env_missing)
        .unwrap_err();
    assert_eq!(error.key, "credentials.partner.secret", "{error}");
    let (status, _, _) = send(&client, get(&h.url("/moved/x"))).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the previous configuration still serves"
    );

    // A changed credential gets a new token source, which exchanges again.
    let changed = added.replace("agent_id =", "refresh_before = \"1m\"\nagent_id =");
    h.gateway
        .reload(Config::parse(&changed, "test.toml").unwrap(), &h.env)
        .unwrap();
    let (status, _, _) = send(&client, get(&h.url("/x"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.auth.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_credentials_api_shows_state_and_refreshes_and_invalidates_without_tokens() {
    let h = Harness::start().await;
    let client = client();
    let admin = |path: &str| format!("http://{}{path}", h.admin);
    let post = |path: &str| Request::post(admin(path)).body(full(Bytes::new())).unwrap();

    // The start-up exchange made the token before any request.
    let (status, _, body) = send(&client, get(&admin("/admin/credentials"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["partner"]["state"], "valid");
    assert_eq!(json(&body)["partner"]["exchanges"], 1);
    let (status, _, body) = send(&client, get(&admin("/readyz"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["status"], "ready");

    let (status, _, body) = send(&client, post("/admin/credentials/partner/refresh")).await;
    assert_eq!(status, StatusCode::OK);
    let state = json(&body);
    assert_eq!(state["state"], "valid");
    assert_eq!(state["exchanges"], 2);
    assert_eq!(state["last_log_uuid"].as_str().unwrap().len(), 36);
    assert!(
        !String::from_utf8_lossy(&body).contains("eyJ"),
        "never a token: {state}"
    );
    assert_eq!(send(&client, get(&h.url("/x"))).await.0, StatusCode::OK);
    assert_eq!(
        h.new_exchanges(),
        1,
        "the refreshed token served the request"
    );

    // An invalidated token is fetched again at once, without waiting for a request.
    let (status, _, _) = send(&client, post("/admin/credentials/partner/invalidate")).await;
    assert_eq!(status, StatusCode::OK);
    let upstream_before = h.upstream.requests();
    h.readyz_until(|s, b| s == StatusCode::OK && b["status"] == "ready")
        .await;
    assert_eq!(
        h.new_exchanges(),
        2,
        "one new exchange after the invalidation"
    );
    assert_eq!(
        h.upstream.requests(),
        upstream_before,
        "no traffic meanwhile"
    );
    assert_eq!(send(&client, get(&h.url("/y"))).await.0, StatusCode::OK);
    assert_eq!(h.new_exchanges(), 2);

    // A refused refresh is reported like any auth error, and the state shows it.
    h.auth.set_fault(Fault::Code(10));
    let (status, headers, _) = send(&client, post("/admin/credentials/partner/refresh")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["x-tokengate-error"], "auth_rejected");
    let (_, _, body) = send(&client, get(&admin("/admin/credentials"))).await;
    let state = &json(&body)["partner"];
    assert_eq!(state["backing_off"], true);
    assert!(
        state["last_error"].as_str().unwrap().contains("code 10"),
        "{state}"
    );

    // Unknown names and paths say what exists.
    let (status, _, body) = send(&client, post("/admin/credentials/nope/refresh")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let body = json(&body);
    assert_eq!(body["kind"], "not_found");
    assert_eq!(body["credential"], "nope");
    assert_eq!(body["known"], serde_json::json!(["partner"]));
    assert_eq!(body["message"], "no credential `nope`; configured: partner");
    let (status, _, body) = send(&client, get(&admin("/admin/nothing"))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let message = json(&body)["message"].as_str().unwrap().to_owned();
    assert!(message.contains("`/admin/nothing`"), "{message}");
    assert!(message.contains("GET /readyz"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_retries_exchanges_and_token_state() {
    let h = Harness::start().await;
    let client = client();
    let metrics = || async {
        let (status, headers, body) =
            send(&client, get(&format!("http://{}/metrics", h.admin))).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        String::from_utf8(body.to_vec()).unwrap()
    };
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };

    // Three successes: a warm-up, one replayed after a revocation, and an absolute-form one.
    h.warm(&client).await;
    h.upstream.revoke_seen();
    assert_eq!(send(&client, get(&h.url("/again"))).await.0, StatusCode::OK);
    let (status, _) = raw_request(
        h.proxy,
        "GET http://unrouted.example/ HTTP/1.1\r\nHost: unrouted.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        status, 200,
        "the catch-all route has no host, so this is routed"
    );

    let text = metrics().await;
    assert_eq!(
        value(
            &text,
            r#"tokengate_requests_total{route="routes[0]",status="200"}"#
        ),
        3.0
    );
    assert_eq!(
        value(
            &text,
            r#"tokengate_upstream_retries_total{route="routes[0]"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"tokengate_token_exchanges_total{credential="partner",outcome="ok"}"#
        ),
        2.0
    );
    assert_eq!(
        value(&text, "tokengate_token_exchange_duration_seconds_count"),
        2.0
    );
    assert_eq!(
        value(&text, "tokengate_request_duration_seconds_count"),
        3.0
    );
    let expiry = value(
        &text,
        r#"tokengate_token_expiry_seconds{credential="partner"}"#,
    );
    assert!(expiry > 3500.0 && expiry <= 3600.0, "{expiry}");
    assert_eq!(
        value(
            &text,
            r#"tokengate_auth_backoff_active{credential="partner"}"#
        ),
        0.0
    );
    assert!(!text.contains("eyJ"), "never a token in metrics");

    // A refused exchange: counted as rejected, the backoff shows, and no token is held.
    h.fail_auth(Fault::Code(10)).await;
    assert_eq!(
        send(&client, get(&h.url("/refused"))).await.0,
        StatusCode::BAD_GATEWAY
    );
    let text = metrics().await;
    assert_eq!(
        value(
            &text,
            r#"tokengate_requests_total{route="routes[0]",status="502"}"#
        ),
        1.0
    );
    // The keeper may have tried once more since, if the backoff ran out.
    let rejected = value(
        &text,
        r#"tokengate_token_exchanges_total{credential="partner",outcome="rejected"}"#,
    );
    assert!((1.0..=2.0).contains(&rejected), "{rejected}");
    assert_eq!(
        value(
            &text,
            r#"tokengate_auth_backoff_active{credential="partner"}"#
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            r#"tokengate_token_expiry_seconds{credential="partner"}"#
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_no_route_matches_are_counted_under_route_none() {
    let h = Harness::with(Setup {
        route_extra: "host = \"api.example.com\"".into(),
        ..Setup::default()
    })
    .await;
    let client = client();
    assert_eq!(
        send(&client, get(&h.url("/x"))).await.0,
        StatusCode::NOT_FOUND
    );
    let (_, _, body) = send(&client, get(&format!("http://{}/metrics", h.admin))).await;
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(
        text.contains(r#"tokengate_requests_total{route="none",status="404"} 1"#),
        "{text}"
    );
}
