//! End-to-end behaviour of the proxy against the real sandbox auth server and upstream.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use sha2::{Digest, Sha256};
use tokengate::auth::crypto::{CipherTextLayout, SignatureAlg};
use tokengate::sandbox::auth::Fault;
use tokengate::sandbox::upstream::pattern;

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
    assert_eq!(
        h.auth.requests(),
        exchanges,
        "no exchange for a request that cannot be replayed"
    );
    // The revoked token was dropped: the next request gets a fresh one.
    let (status, _, _) = send(&client, get(&h.url("/after"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h.auth.requests(), exchanges + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_of_unknown_length_reaches_an_http1_client_chunked_and_whole() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let h = Harness::start().await;
    let mut stream =
        tokio::io::BufReader::new(tokio::net::TcpStream::connect(h.proxy).await.unwrap());
    let exchange = async {
        for _ in 0..2 {
            // Twice on one connection: the chunked body ends where the next response begins.
            stream
                .get_mut()
                .write_all(b"GET /bytes/300000?unsized HTTP/1.1\r\nHost: a\r\n\r\n")
                .await
                .unwrap();
            let mut head = String::new();
            loop {
                let mut line = String::new();
                stream.read_line(&mut line).await.unwrap();
                head.push_str(&line.to_ascii_lowercase());
                if line == "\r\n" {
                    break;
                }
            }
            assert!(head.starts_with("http/1.1 200 ok\r\n"), "{head}");
            assert!(head.contains("transfer-encoding: chunked\r\n"), "{head}");
            assert!(!head.contains("content-length"), "{head}");
            let mut body = Vec::new();
            loop {
                let mut size = String::new();
                stream.read_line(&mut size).await.unwrap();
                let size = usize::from_str_radix(size.trim_end(), 16).unwrap();
                let mut chunk = vec![0; size + 2];
                stream.read_exact(&mut chunk).await.unwrap();
                assert_eq!(&chunk[size..], b"\r\n");
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
            assert_eq!(body, pattern(300_000));
        }
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .expect("both responses arrived, each framed to its end");
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
async fn chunked_upload_and_10_mib_download_arrive_intact() {
    let h = Harness::start().await;
    let client = client();

    let upload: Vec<u8> = (0..1024 * 1024 + 123)
        .map(|_| rand::random::<u8>())
        .collect();
    let chunks: Vec<Result<Frame<Bytes>, BoxError>> = upload
        .chunks(7919)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(tokio_stream::iter(chunks)).boxed();
    let req = Request::put(h.url("/upload")).body(body).unwrap();
    let (status, _, echo) = send(&client, req).await;
    assert_eq!(status, StatusCode::OK);
    let echo = json(&echo);
    assert_eq!(echo["body_bytes"], upload.len());
    assert_eq!(echo["body_sha256"], hex::encode(Sha256::digest(&upload)));
    assert_eq!(
        echo["headers"]["transfer-encoding"], "chunked",
        "streamed, not buffered"
    );

    let n = 10 * 1024 * 1024;
    let (status, headers, body) = send(&client, get(&h.url(&format!("/bytes/{n}")))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], n.to_string());
    assert_eq!(body.len(), n);
    assert_eq!(Sha256::digest(&body), Sha256::digest(pattern(n)));
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
async fn a_slow_upstream_gives_504_at_request_timeout() {
    let h = Harness::with_server("request_timeout = \"300ms\"").await;
    let (status, headers, body) = send(&client(), get(&h.url("/slow/2000"))).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body:?}");
    assert_eq!(headers["x-tokengate-error"], "upstream_timeout");
    // Within the timeout the same endpoint answers.
    let (status, _, _) = send(&client(), get(&h.url("/slow/10"))).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_completes_a_connect_gives_504_at_connect_timeout() {
    // A loopback listener that never accepts: once its accept queue is full, Linux drops new
    // SYNs, so a connect neither succeeds nor fails; it hangs.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let blackhole = socket.local_addr().unwrap();
    let _listener = socket.listen(1).unwrap();
    let mut queued = Vec::new();
    loop {
        let attempt = tokio::net::TcpStream::connect(blackhole);
        match tokio::time::timeout(Duration::from_millis(300), attempt).await {
            Ok(Ok(stream)) => queued.push(stream),
            _ => break, // this connect hung: the queue is full
        }
        assert!(queued.len() < 64, "the listener keeps accepting connects");
    }
    let h = Harness::with(Setup {
        server_extra: "connect_timeout = \"300ms\"".into(),
        routes_before: format!(
            "[[routes]]\npath_prefix = \"/blackhole/\"\nupstream = \"http://{blackhole}\"\ncredential = \"partner\"\n"
        ),
        ..Setup::default()
    })
    .await;
    let (status, headers, body) = send(&client(), get(&h.url("/blackhole/x"))).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body:?}");
    assert_eq!(headers["x-tokengate-error"], "upstream_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_at_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::with_server("header_read_timeout = \"500ms\"").await;
    let mut stream = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    stream
        .write_all(b"GET /bytes/10 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    // The response (head and 10-byte body) arrives, then the idle connection is closed.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the idle keep-alive connection was not closed"
    );
    assert!(String::from_utf8_lossy(&received).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_keep_alive_connection_outlives_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::with_server("header_read_timeout = \"500ms\"").await;
    let mut stream = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    // Requests 150 ms apart for three times the timeout: each wait is short, so the
    // connection stays open although it is much older than header_read_timeout.
    for i in 0..10 {
        stream
            .write_all(b"GET /bytes/10 HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        // The whole answer: its head and the 10-byte body.
        loop {
            let head_end = response.windows(4).position(|w| w == b"\r\n\r\n");
            if head_end.is_some_and(|end| response.len() >= end + 4 + 10) {
                break;
            }
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
                .await
                .expect("an answer")
                .unwrap();
            assert!(n > 0, "request {i}: the busy connection was closed");
            response.extend_from_slice(&buf[..n]);
        }
        assert!(
            String::from_utf8_lossy(&response).starts_with("HTTP/1.1 200"),
            "request {i}"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(h.upstream.requests(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_wait_until_one_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::with_server("max_connections = 1").await;
    let request = b"GET /bytes/1 HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut first = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    first.write_all(request).await.unwrap();
    let mut buf = [0u8; 1024];
    assert!(
        first.read(&mut buf).await.unwrap() > 0,
        "the first connection is served"
    );

    // The second connection is queued, not served, while the first stays open.
    let mut second = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    second.write_all(request).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(500), second.read(&mut buf)).await;
    assert!(early.is_err(), "served past max_connections");
    assert_eq!(h.upstream.requests(), 1);

    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf))
        .await
        .expect("served once the first connection closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_new_connections_waits_in_the_listen_backlog() {
    use tokengate::server::LISTEN_BACKLOG;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // 300 handshakes queued at once: past the 128 that tokio's and std's `bind` allow, which
    // would drop the SYNs beyond it and leave those clients retrying while the queue stays full.
    const BURST: usize = 300;
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if somaxconn <= BURST {
        eprintln!("skipped: net.core.somaxconn is {somaxconn}, which caps every backlog");
        return;
    }
    assert!(LISTEN_BACKLOG as usize > BURST);
    let h = Harness::with_server("max_connections = 1").await;
    // The one connection allowed is accepted and held: the proxy accepts nothing more, so every
    // further handshake completes only in the kernel's accept queue.
    let mut first = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    first
        .write_all(b"GET /bytes/1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    assert!(
        first.read(&mut buf).await.unwrap() > 0,
        "the first is served"
    );
    let burst =
        futures_util::future::join_all((0..BURST).map(|_| tokio::net::TcpStream::connect(h.proxy)));
    let connected = tokio::time::timeout(Duration::from_secs(10), burst)
        .await
        .expect("every handshake completed in the backlog");
    assert!(connected.iter().all(Result::is_ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_are_told_the_stream_window_and_header_limits() {
    use tokengate::server::{H2_MAX_HEADER_LIST, H2_STREAM_WINDOW, MAX_H2_STREAMS};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start().await;
    let mut stream = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    // Client preface and an empty SETTINGS frame (prior knowledge, as h2c clients do).
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    stream
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    // The server's first frame is its SETTINGS: 9-byte header, then 6-byte (id, value) pairs.
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(head[3], 4, "a SETTINGS frame");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.unwrap();
    let settings: BTreeMap<u16, u32> = payload
        .chunks(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect();
    assert_eq!(
        settings.get(&0x3),
        Some(&MAX_H2_STREAMS),
        "MAX_CONCURRENT_STREAMS: {settings:?}"
    );
    assert_eq!(
        settings.get(&0x4),
        Some(&H2_STREAM_WINDOW),
        "INITIAL_WINDOW_SIZE: {settings:?}"
    );
    assert_eq!(
        settings.get(&0x6),
        Some(&H2_MAX_HEADER_LIST),
        "MAX_HEADER_LIST_SIZE: {settings:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_disconnected_at_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::with_server("header_read_timeout = \"500ms\"").await;
    let mut stream = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    stream
        .write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .unwrap();
    let mut rest = Vec::new();
    // The server closes the connection; without the timeout this read would wait forever.
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("the proxy closed the slow connection")
        .ok();
    assert!(!String::from_utf8_lossy(&rest).contains("200 OK"));
    assert_eq!(h.upstream.requests(), 0);
    assert_eq!(h.new_exchanges(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_request_body_get_413_declared_ones_before_any_exchange() {
    let h = Harness::with_server("max_request_body = 100000").await;
    let client = client();
    // Only the head is sent: the declared length alone gets the 413. (The proxy answers without
    // reading a body and closes; body bytes still in flight could turn that close into a reset
    // that hides the answer from the client.)
    let (status, head) = raw_request(
        h.proxy,
        "POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: 100001\r\n\r\n",
    )
    .await;
    assert_eq!(status, 413, "{head}");
    assert!(head.contains("x-tokengate-error: body_too_large"), "{head}");
    assert_eq!(
        h.new_exchanges(),
        0,
        "no exchange for a body refused up front"
    );
    assert_eq!(h.upstream.requests(), 0, "no upstream dial");

    // A chunked body of unknown length is cut off where it crosses the limit. The client sees
    // the 413, or a reset if the proxy's close races its remaining writes; either way the
    // upstream never receives more than the limit.
    let chunks: Vec<Result<Frame<Bytes>, BoxError>> = (0..20)
        .map(|_| Ok(Frame::data(Bytes::from(vec![1u8; 10_000]))))
        .collect();
    let body = StreamBody::new(tokio_stream::iter(chunks)).boxed();
    if let Ok(response) = client
        .request(Request::post(h.url("/big")).body(body).unwrap())
        .await
    {
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(response.headers()["x-tokengate-error"], "body_too_large");
    }
    assert!(
        h.upstream.body_bytes() <= 100_000,
        "never more than the limit forwarded"
    );
    assert!(
        h.upstream.log().iter().all(|s| s.status != 200),
        "nothing was answered upstream as a success"
    );

    let req = Request::post(h.url("/ok"))
        .body(full(vec![0u8; 100_000]))
        .unwrap();
    assert_eq!(send(&client, req).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_body_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::with_server("body_idle_timeout = \"300ms\"").await;
    for (framing, start) in [
        ("content-length: 100", "0123456789".to_owned()),
        (
            "transfer-encoding: chunked",
            "a\r\n0123456789\r\n".to_owned(),
        ),
    ] {
        let mut stream = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
        let head = format!(
            "POST /slow-body HTTP/1.1\r\nhost: a\r\nconnection: close\r\n{framing}\r\n\r\n{start}"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
            .await
            .expect("the proxy answered the stalled upload")
            .unwrap();
        let out = String::from_utf8_lossy(&out).to_lowercase();
        assert!(out.starts_with("http/1.1 408"), "{framing}: {out}");
        assert!(out.contains("x-tokengate-error: client_timeout"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_too_many_headers_get_431() {
    let h = Harness::start().await;
    let big = format!(
        "GET /x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    let (status, _) = raw_request(h.proxy, &big).await;
    assert_eq!(status, 431);
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (status, _) = raw_request(
        h.proxy,
        &format!("GET /x HTTP/1.1\r\nHost: a\r\n{many}Connection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 431);
    assert_eq!(h.upstream.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_max_concurrent_requests_are_shed_with_503() {
    let h = Harness::with_server("max_concurrent_requests = 2").await;
    let client = client();
    let mut slow = Vec::new();
    for _ in 0..2 {
        let (client, url) = (client.clone(), h.url("/slow/1500"));
        slow.push(tokio::spawn(
            async move { send(&client, get(&url)).await.0 },
        ));
    }
    while h.upstream.requests() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, headers, body) = send(&client, get(&h.url("/third"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body:?}");
    assert_eq!(headers["x-tokengate-error"], "overloaded");
    assert_eq!(headers["retry-after"], "1");
    for task in slow {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(send(&client, get(&h.url("/after"))).await.0, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_never_reach_the_upstream_as_a_second_request() {
    let h = Harness::start().await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";

    // On a keep-alive connection that has carried bodies of both framings, so that the proxy
    // must follow each body to find the next head: a request that carries Content-Length
    // together with Transfer-Encoding (in either order) gets 400 and closes the connection.
    let len = 5 + smuggled.len();
    let clean = "POST /fixed HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
                 POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                 3;x=y\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n";
    for conflict in [
        format!("Content-Length: {len}\r\nTransfer-Encoding: chunked"),
        format!("Transfer-Encoding: chunked\r\nContent-Length: {len}"),
    ] {
        let wire =
            format!("{clean}POST /a HTTP/1.1\r\nHost: a\r\n{conflict}\r\n\r\n0\r\n\r\n{smuggled}");
        let (_, answers) = raw_request(h.proxy, &wire).await;
        let statuses: Vec<&str> = answers
            .split("http/1.1 ")
            .skip(1)
            .map(|a| &a[..3])
            .collect();
        assert_eq!(statuses, ["200", "200", "400"], "{answers}");
        assert!(
            answers.contains("x-tokengate-error: bad_request"),
            "{answers}"
        );
    }
    let targets: Vec<String> = h.upstream.log().into_iter().map(|s| s.target).collect();
    assert_eq!(
        targets,
        [
            "POST /fixed",
            "POST /chunked",
            "POST /fixed",
            "POST /chunked"
        ],
        "the conflicting request, and what it tried to smuggle, never reached the upstream"
    );

    let attempts = [
        // Two different Content-Lengths.
        format!(
            "POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 40\r\n\r\nhello{smuggled}"
        ),
        // Transfer-Encoding values that are not (only, or last) chunked.
        format!(
            "POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        format!(
            "POST /d HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        format!(
            "POST /e HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n0\r\n\r\n{smuggled}"
        ),
        // Stacked codings ending in chunked: refused by tokengate itself.
        format!(
            "POST /f HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{smuggled}"
        ),
    ];
    for attempt in &attempts {
        let (status, head) = raw_request(h.proxy, attempt).await;
        assert_eq!(status, 400, "{attempt:?} -> {head}");
    }
    let targets: Vec<String> = h.upstream.log().into_iter().map(|s| s.target).collect();
    assert!(
        targets.iter().all(|t| !t.contains("smuggled")),
        "a smuggled request reached the upstream: {targets:?}"
    );
    assert_eq!(h.upstream.requests(), 4, "only the clean ones: {targets:?}");
}

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
async fn http2_clients_are_served() {
    let h = Harness::start().await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<TestBody>();
    let req = Request::post(h.url("/h2"))
        .body(full(Bytes::from_static(b"over h2")))
        .unwrap();
    let response = client.request(req).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let echo = response.into_body().collect().await.unwrap().to_bytes();
    let echo = json(&echo);
    assert!(
        echo["headers"]["authorization"]
            .as_str()
            .unwrap()
            .starts_with("Bearer ")
    );
    assert_eq!(echo["body_bytes"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gives_502() {
    let h = Harness::with(Setup {
        routes_before: r#"
[[routes]]
path_prefix = "/dead/"
upstream = "http://127.0.0.1:9"
credential = "partner"
"#
        .into(),
        ..Setup::default()
    })
    .await;
    let client = client();
    let (status, headers, body) = send(&client, get(&h.url("/dead/x"))).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(headers["x-tokengate-error"], "upstream_unreachable");
    assert_eq!(json(&body)["kind"], "upstream_unreachable");
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

/// Sends raw HTTP/1.1 bytes and returns the status and the head as text.
async fn raw_request(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text.to_lowercase())
}

/// A TCP echo server on 127.0.0.1; returns its port and everything it received.
async fn echo_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    log.lock().unwrap().extend_from_slice(&buf[..n]);
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// Sends a CONNECT for `target` and reads the response head; the stream stays open.
async fn connect(proxy: std::net::SocketAddr, target: &str) -> (String, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        got.push(byte[0]);
    }
    (String::from_utf8_lossy(&got).to_lowercase(), stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_only_to_listed_targets_whose_addresses_pass_the_ssrf_guard() {
    use std::collections::HashMap;
    use tokengate::ssrf::StaticResolver;
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
    use tokengate::ssrf::StaticResolver;

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

/// Reads one HTTP/1.1 response with a `Content-Length` body from `stream`; returns the status
/// and the body.
async fn read_response(stream: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> (u16, Bytes) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let (mut status, mut length) = (0, 0);
    loop {
        let mut line = String::new();
        assert!(
            stream.read_line(&mut line).await.unwrap() > 0,
            "connection closed"
        );
        let line = line.trim_end().to_ascii_lowercase();
        if line.is_empty() {
            break;
        }
        if let Some(code) = line.strip_prefix("http/1.1 ") {
            status = code[..3].parse().unwrap();
        } else if let Some(n) = line.strip_prefix("content-length: ") {
            length = n.parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).await.unwrap();
    (status, body.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_hibernate_and_lose_nothing_when_they_wake() {
    use tokio::io::AsyncWriteExt;
    let h = Harness::start().await;
    let admin = client();
    let hibernating = || async {
        let (_, _, body) = send(&admin, get(&format!("http://{}/metrics", h.admin))).await;
        String::from_utf8(body.to_vec())
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("tokengate_connections_hibernating "))
            .expect("the gauge is exported")
            .parse::<u64>()
            .unwrap()
    };
    let until_hibernating = || async {
        tokio::time::timeout(Duration::from_secs(10), async {
            while hibernating().await != 1 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the idle connection hibernates");
    };
    let stream = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    let mut stream = tokio::io::BufReader::new(stream);
    stream
        .get_mut()
        .write_all(b"GET /bytes/10 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (status, body) = read_response(&mut stream).await;
    assert_eq!((status, &body[..]), (200, &pattern(10)[..]));
    until_hibernating().await;

    // It wakes for the next request. That one stays in flight across several hibernation
    // ticks, and its answer still arrives: a connection with a request in flight never
    // hibernates.
    stream
        .get_mut()
        .write_all(b"GET /slow/800 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (status, body) = read_response(&mut stream).await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["slept_ms"], 800);
    until_hibernating().await;

    // A head that stops halfway is kept while the client pauses, and completed.
    let w = stream.get_mut();
    w.write_all(b"GET /bytes/5 HTTP/1.1\r\nHo").await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    w.write_all(b"st: a\r\n\r\n").await.unwrap();
    let (status, body) = read_response(&mut stream).await;
    assert_eq!((status, &body[..]), (200, &pattern(5)[..]));

    // Pipelined requests, in one write, are all answered in order.
    stream
        .get_mut()
        .write_all(
            b"GET /bytes/3 HTTP/1.1\r\nHost: a\r\n\r\nGET /bytes/4 HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .unwrap();
    for n in [3, 4] {
        let (status, body) = read_response(&mut stream).await;
        assert_eq!((status, &body[..]), (200, &pattern(n)[..]));
    }
    until_hibernating().await;
    assert_eq!(h.upstream.requests(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keep_alive_connection_carries_every_kind_of_request_in_turn() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::start().await;
    let mut stream =
        tokio::io::BufReader::new(tokio::net::TcpStream::connect(h.proxy).await.unwrap());
    stream
        .get_mut()
        .write_all(b"GET /bytes/10 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let (status, body) = read_response(&mut stream).await;
    assert_eq!((status, &body[..]), (200, &pattern(10)[..]));

    // A body that comes after its head, then a chunked one: hyper's to read.
    stream
        .get_mut()
        .write_all(b"POST /late HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.get_mut().write_all(b"hello").await.unwrap();
    let (status, body) = read_response(&mut stream).await;
    assert_eq!((status, json(&body)["body_bytes"].as_u64()), (200, Some(5)));
    stream
        .get_mut()
        .write_all(
            b"POST /chunked HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        )
        .await
        .unwrap();
    let (status, body) = read_response(&mut stream).await;
    assert_eq!((status, json(&body)["body_bytes"].as_u64()), (200, Some(3)));

    // Past hyper's idle tick the connection is tokengate's again, and carries on.
    tokio::time::sleep(Duration::from_millis(800)).await;
    stream
        .get_mut()
        .write_all(b"POST /whole HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    let (status, body) = read_response(&mut stream).await;
    assert_eq!((status, json(&body)["body_bytes"].as_u64()), (200, Some(2)));

    // HEAD: the head alone. Then a request asking to close gets its answer and the close.
    stream
        .get_mut()
        .write_all(b"HEAD /bytes/7 HTTP/1.1\r\nHost: a\r\n\r\nGET /bytes/3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("closed after the request that asked")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest).to_lowercase();
    let (head, get) = rest.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("http/1.1 200 ok\r\n"), "{rest}");
    assert!(head.contains("\r\ndate: "), "{head}");
    assert!(
        get.starts_with("http/1.1 200 ok\r\n"),
        "HEAD had no body: {rest}"
    );
    assert!(get.contains("\r\nconnection: close\r\n"), "{get}");
    assert!(get.ends_with("\r\n\r\n\x00\x01\x02"), "{get:?}");
    assert_eq!(h.upstream.requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_that_never_sent_a_byte_or_idle_between_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut h =
        Harness::with_server("header_read_timeout = \"60s\"\nshutdown_grace = \"60s\"").await;
    let mut silent = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    let mut idle =
        tokio::io::BufReader::new(tokio::net::TcpStream::connect(h.proxy).await.unwrap());
    idle.get_mut()
        .write_all(b"GET /bytes/1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut idle).await.0, 200);
    let running = h.running.take().unwrap();
    // Neither connection has a request in flight: shutdown need not wait for them (it would
    // wait the whole 60 s grace, or the 60 s head timeout, if it did).
    tokio::time::timeout(Duration::from_secs(20), running.shutdown())
        .await
        .expect("shutdown waited on connections without requests");
    let mut buf = [0u8; 16];
    assert_eq!(silent.read(&mut buf).await.unwrap_or(0), 0, "closed");
    assert_eq!(idle.read(&mut buf).await.unwrap_or(0), 0, "closed");
}
