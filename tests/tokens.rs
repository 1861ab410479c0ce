//! The token path end to end: the exchange, the cache, renewal, the 401 replay, backoff and
//! readiness, against the real sandbox auth server and upstream.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::raw::*;
use common::*;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use sha2::{Digest, Sha256};
use tokengate::auth::crypto::{CipherTextLayout, SignatureAlg};
use tokengate::sandbox::auth::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_cache_200_concurrent_requests_make_exactly_one_exchange() {
    // The requests start with the gateway, while its start-up exchange is still on its way (the
    // auth server takes 300 ms): they and the keeper share that one exchange.
    let h = Harness::with(Setup {
        wait_warm: false,
        auth_fault: Fault::Delay(Duration::from_millis(300)),
        ..Setup::default()
    })
    .await;
    let client = client();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = client.clone();
        let url = h.url(&format!("/cold/{i}"));
        tasks.spawn(async move { send(&client, get(&url)).await.0 });
    }
    let statuses: Vec<StatusCode> = tasks.join_all().await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(statuses.len(), 200);
    assert_eq!(h.auth.requests(), 1, "exchanges sent to the auth server");
    assert_eq!(h.auth.issued(), 1);
    assert_eq!(h.upstream.requests(), 200);
    assert_eq!(h.upstream.unauthorized(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_replays_a_10k_post_byte_for_byte_with_one_new_exchange() {
    let h = Harness::start().await;
    let client = client();
    h.warm(&client).await;
    assert_eq!(h.auth.requests(), 1);
    h.upstream.revoke_seen();

    let body: Vec<u8> = (0..10 * 1024).map(|_| rand::random::<u8>()).collect();
    let req = Request::post(h.url("/orders"))
        .header("content-type", "application/octet-stream")
        .body(full(body.clone()))
        .unwrap();
    let (status, _, echo) = send(&client, req).await;
    assert_eq!(status, StatusCode::OK, "{echo:?}");
    assert_eq!(
        json(&echo)["body_sha256"],
        hex::encode(Sha256::digest(&body))
    );

    let log = h.upstream.log();
    let posts: Vec<_> = log.iter().filter(|s| s.target == "POST /orders").collect();
    assert_eq!(posts.len(), 2, "one 401, one replay: {log:?}");
    assert_eq!(posts[0].status, 401);
    assert_eq!(posts[1].status, 200);
    assert_eq!(posts[0].body.as_ref(), body.as_slice());
    assert_eq!(
        posts[1].body.as_ref(),
        body.as_slice(),
        "replayed byte for byte"
    );
    assert_eq!(h.upstream.unauthorized(), 1);
    assert_eq!(h.auth.requests(), 2, "exactly one new exchange");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_always_answers_401_is_tried_twice_with_one_new_exchange() {
    let h = Harness::start().await;
    let client = client();
    h.warm(&client).await;
    let (exchanges, attempts) = (h.auth.requests(), h.upstream.requests());
    h.upstream.set_always_401(true);

    let (status, _, body) = send(&client, get(&h.url("/always"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        json(&body)["error"],
        "this upstream refuses everything",
        "the upstream's own 401"
    );
    assert_eq!(
        h.upstream.requests() - attempts,
        2,
        "exactly two upstream attempts"
    );
    assert_eq!(h.auth.requests() - exchanges, 1, "exactly one new exchange");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_on_a_revoked_token_share_one_exchange() {
    let h = Harness::start().await;
    let client = client();
    h.warm(&client).await;
    h.upstream.revoke_seen();

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let client = client.clone();
        let url = h.url(&format!("/revoked/{i}"));
        tasks.spawn(async move { send(&client, get(&url)).await.0 });
    }
    let statuses: Vec<StatusCode> = tasks.join_all().await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(h.auth.requests(), 2, "the warm-up and exactly one renewal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_second_tokens_renew_in_the_background_and_never_reach_upstream_expired() {
    let h = Harness::with(Setup {
        expires_in: 3,
        ..Setup::default()
    })
    .await;
    let client = client();
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    for i in 0..10 {
        interval.tick().await;
        let (status, _, body) = send(&client, get(&h.url(&format!("/tick/{i}")))).await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body:?}");
    }
    assert_eq!(
        h.upstream.expired_seen(),
        0,
        "the upstream saw an expired token"
    );
    assert_eq!(
        h.upstream.unauthorized(),
        0,
        "no request needed a 401 replay"
    );
    assert!(
        h.auth.issued() >= 2,
        "tokens were renewed: {}",
        h.auth.issued()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_renewal_fails_the_current_token_serves_until_it_expires() {
    let h = Harness::with(Setup {
        expires_in: 4,
        ..Setup::default()
    })
    .await;
    let client = client();
    let started = std::time::Instant::now();
    h.warm(&client).await;
    let token = h
        .gateway
        .credential("partner")
        .unwrap()
        .current()
        .await
        .unwrap();
    h.auth.set_fault(Fault::Garbage);

    // Renewal is due at about half the token's life; keep sending until well past that while
    // staying inside the token's usable life (at least 2.7 s of a 3-4 s token).
    let until = token.obtained_at() + Duration::from_millis(2500);
    let mut sent = 0;
    while std::time::Instant::now() < until {
        let (status, _, body) = send(&client, get(&h.url("/during"))).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "the current token keeps serving: {body:?}"
        );
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sent >= 10, "{sent} requests in {:?}", started.elapsed());
    assert!(h.auth.requests() >= 2, "a background renewal was attempted");
    assert_eq!(h.auth.issued(), 1);
    assert_eq!(h.upstream.expired_seen(), 0);

    // Once the token has really expired, requests need a new one, and the auth server is down.
    tokio::time::sleep_until((token.expires_at() + Duration::from_millis(200)).into()).await;
    let (status, headers, _) = send(&client, get(&h.url("/after"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-tokengate-error"], "auth_unavailable");
    assert_eq!(
        h.upstream.expired_seen(),
        0,
        "the expired token was never sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_signature_and_iv_ct_tag_layout_work_when_both_sides_agree() {
    for (signature, layout, extra) in [
        (
            SignatureAlg::HmacSha256,
            CipherTextLayout::IvTagCt,
            "signature = \"hmac-sha256\"",
        ),
        (
            SignatureAlg::Sha256,
            CipherTextLayout::IvCtTag,
            "cipher_text_layout = \"iv-ct-tag\"",
        ),
    ] {
        let h = Harness::with(Setup {
            agent_signature: signature,
            agent_layout: layout,
            credential_extra: extra.into(),
            ..Setup::default()
        })
        .await;
        let (status, _, body) = send(&client(), get(&h.url("/x"))).await;
        assert_eq!(status, StatusCode::OK, "{extra}: {body:?}");
        assert_eq!(h.auth.codes(), vec![0], "{extra}");
    }
    // And a mismatch is the server's code 84, reported as such.
    let h = Harness::with(Setup {
        agent_layout: CipherTextLayout::IvCtTag,
        ..Setup::default()
    })
    .await;
    let (status, _, body) = send(&client(), get(&h.url("/x"))).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(json(&body)["auth_code"], 84);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_body_over_max_replay_body_is_not_buffered_and_not_replayed() {
    let h = Harness::start().await;
    let client = client();
    h.warm(&client).await;
    h.upstream.revoke_seen();
    let (exchanges, attempts) = (h.auth.requests(), h.upstream.requests());

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed();
    let req = Request::post(h.url("/big")).body(body).unwrap();
    let response = tokio::spawn({
        let client = client.clone();
        async move { send(&client, req).await }
    });

    let first = vec![b'a'; 100 * 1024]; // already more than max_replay_body (64 KiB)
    tx.send(Ok(Frame::data(Bytes::from(first)))).await.unwrap();
    // The rest is held back until the upstream has received the first part: a proxy that
    // buffered the whole body would never forward it, and this wait would fail.
    let before = h.upstream.body_bytes();
    tokio::time::timeout(
        Duration::from_secs(10),
        h.upstream.wait_body_bytes(before + 100 * 1024),
    )
    .await
    .expect("the upstream received the body's start before its end was sent");
    tx.send(Ok(Frame::data(Bytes::from(vec![b'b'; 100 * 1024]))))
        .await
        .unwrap();
    drop(tx);

    let (status, _, _) = response.await.unwrap();
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "not replayable, so the 401 goes to the client"
    );
    assert_eq!(h.upstream.requests() - attempts, 1, "no replay");
    // The revoked token was dropped and the keeper fetches a new one without waiting for a
    // request: one exchange, whether it finishes before the next request or that request waits
    // for it.
    let (status, _, _) = send(&client, get(&h.url("/after"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.auth.requests(), exchanges + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_replay_body_is_not_replayed_even_when_it_arrives_with_its_head() {
    let h = Harness::with(Setup {
        max_replay_body: 16,
        ..Setup::default()
    })
    .await;
    let client = client();
    h.warm(&client).await;
    for (body, replayed) in [("0123456789abcdef", true), ("0123456789abcdefg", false)] {
        h.upstream.revoke_seen();
        let attempts = h.upstream.requests();
        // One write: head and body reach the proxy together.
        let (status, answer) = raw_request(
            h.proxy,
            &format!(
                "POST /whole HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
        .await;
        let (want, tries) = if replayed { (200, 2) } else { (401, 1) };
        assert_eq!(status, want, "{} bytes: {answer}", body.len());
        assert_eq!(
            h.upstream.requests() - attempts,
            tries,
            "{} bytes",
            body.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_code_10_gives_502_auth_rejected_with_code_and_log_uuid() {
    let h = Harness::with(Setup {
        agent_id: "integratorUnknown99".into(),
        ..Setup::default()
    })
    .await;
    let (status, headers, body) = send(&client(), get(&h.url("/x"))).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["x-tokengate-error"], "auth_rejected");
    assert_eq!(headers["content-type"], "application/json");
    let body = json(&body);
    assert_eq!(body["kind"], "auth_rejected");
    assert_eq!(body["auth_code"], 10);
    assert_eq!(body["auth_message"], "Agent code was not found or block");
    assert_eq!(body["auth_log_uuid"].as_str().unwrap().len(), 36, "{body}");
    assert_eq!(h.auth.codes(), vec![10]);
    assert_eq!(h.upstream.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_83_is_retried_once_with_a_fresh_nonce_then_reported() {
    let h = Harness::start().await;
    h.fail_auth(Fault::Code(83)).await;
    let (status, _, body) = send(&client(), get(&h.url("/x"))).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(json(&body)["auth_code"], 83);
    assert_eq!(h.new_exchanges(), 2, "one retry at once, then permanent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_garbage_and_unreachable_give_503_with_retry_after() {
    let h = Harness::start().await;
    h.fail_auth(Fault::Garbage).await;
    let (status, headers, body) = send(&client(), get(&h.url("/x"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-tokengate-error"], "auth_unavailable");
    assert!(headers.contains_key("retry-after"));
    assert!(
        !String::from_utf8_lossy(&body).contains("<html>"),
        "no upstream text in errors"
    );

    let mut h = Harness::start().await;
    h.stop_auth().await;
    h.refetch().await;
    let (status, headers, body) = send(&client(), get(&h.url("/x"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-tokengate-error"], "auth_unavailable");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(json(&body)["credential"], "partner");
    assert_eq!(h.upstream.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_code_10_answers_is_backed_off_40_requests_at_most_5_exchanges() {
    let h = Harness::start().await;
    h.fail_auth(Fault::Code(10)).await;
    let client = client();
    for i in 0..40 {
        let (status, headers, body) = send(&client, get(&h.url(&format!("/storm/{i}")))).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(
            json(&body)["auth_code"],
            10,
            "the last error, also during backoff"
        );
        let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=30).contains(&retry_after), "{retry_after}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exchanges = h.new_exchanges();
    assert!(
        (1..=5).contains(&exchanges),
        "{exchanges} exchanges for 40 requests"
    );
    assert_eq!(h.upstream.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_one_garbage_answer_the_token_comes_back_without_traffic() {
    let h = Harness::start().await;
    h.fail_auth(Fault::Garbage).await;
    let (status, _, _) = send(&client(), get(&h.url("/x"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    h.auth.set_fault(Fault::None);
    // The keeper tries again once the backoff has passed; no request asks it to.
    let upstream_before = h.upstream.requests();
    let (_, ready) = h.readyz_until(|_, body| body["status"] == "ready").await;
    assert_eq!(ready["status"], "ready");
    assert_eq!(
        h.new_exchanges(),
        2,
        "the failed one and the keeper's retry"
    );
    assert_eq!(
        h.upstream.requests(),
        upstream_before,
        "no traffic meanwhile"
    );
    let (status, _, body) = send(&client(), get(&h.url("/x"))).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(h.new_exchanges(), 2);
    assert!(!h.gateway.credential("partner").unwrap().backing_off());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_auth_server_gives_503_at_the_exchange_timeout() {
    let h = Harness::with(Setup {
        credential_extra: "timeout = \"300ms\"".into(),
        ..Setup::default()
    })
    .await;
    // Answered normally, but only after the timeout: without it the client would get 200.
    h.fail_auth(Fault::Delay(Duration::from_secs(2))).await;
    let (status, headers, body) = send(&client(), get(&h.url("/x"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(headers["x-tokengate-error"], "auth_unavailable");
    assert!(
        json(&body)["message"]
            .as_str()
            .unwrap()
            .contains("timed out")
    );
    assert_eq!(h.upstream.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_first_exchange_only_of_routed_credentials_never_for_traffic() {
    // The auth server holds its answers past the exchange's 2 s timeout, and `spare`, which no
    // route uses, points at a port where nothing listens.
    let h = Harness::with(Setup {
        wait_warm: false,
        auth_fault: Fault::Delay(Duration::from_secs(60)),
        credential_extra: "timeout = \"2s\"".into(),
        routes_before: r#"
[credentials.spare]
auth_url = "http://127.0.0.1:9/v2/auth"
agent_id = "spare01"
secret = { env = "PARTNER_SECRET" }
"#
        .into(),
        ..Setup::default()
    })
    .await;
    let client = client();
    let admin = |path: &str| format!("http://{}{path}", h.admin);
    let (status, _, _) = send(&client, get(&admin("/healthz"))).await;
    assert_eq!(status, StatusCode::OK, "alive at once");
    let (status, _, body) = send(&client, get(&admin("/readyz"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    let body = json(&body);
    assert_eq!(body["status"], "warming_up");
    assert_eq!(
        body["credentials"],
        serde_json::json!(["partner"]),
        "{body}"
    );

    // The provider does not answer in time: the pod becomes ready, degraded, and says why, so
    // that clients get tokengate's 503 auth_unavailable rather than a refused connection.
    let (status, body) = h
        .readyz_until(|s, _| s != StatusCode::SERVICE_UNAVAILABLE)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "degraded", "{body}");
    let error = body["credentials"]["partner"]["last_error"]
        .as_str()
        .unwrap();
    assert!(error.contains("timed out"), "{body}");
    assert!(body["credentials"].get("spare").is_none(), "{body}");

    // The provider recovers: the keeper's retry gets a token, with no request asking for it.
    h.auth.set_fault(Fault::None);
    let (status, body) = h.readyz_until(|_, b| b["status"] == "ready").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(h.upstream.requests(), 0, "no traffic at all");
    assert!(h.auth.issued() >= 1);
    let (_, _, body) = send(&client, get(&admin("/admin/credentials"))).await;
    assert_eq!(
        json(&body)["spare"]["exchanges"],
        0,
        "an unused credential is never fetched"
    );
}
