//! Limits and timeouts: what the proxy answers, or closes, when a client or an upstream goes
//! past one.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::raw::*;
use common::*;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

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
async fn each_request_on_a_pooled_connection_gets_its_own_deadline() {
    // One timer per upstream connection: set by its first request, it fires while the
    // connection idles in the pool, and must move to the next request's deadline rather than
    // cut that request short; and a later slow request still gets its 504.
    let h = Harness::with_server("request_timeout = \"400ms\"").await;
    let client = client();
    let (status, _, _) = send(&client, get(&h.url("/slow/10"))).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(600)).await; // the first deadline passes, idle
    for _ in 0..3 {
        let (status, _, body) = send(&client, get(&h.url("/slow/200"))).await;
        assert_eq!(status, StatusCode::OK, "{body:?}");
    }
    let (status, headers, _) = send(&client, get(&h.url("/slow/2000"))).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["x-tokengate-error"], "upstream_timeout");
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
async fn a_client_that_stops_reading_is_cut_off_at_body_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = Harness::with_server("body_idle_timeout = \"300ms\"").await;
    const SIZE: usize = 64 * 1024 * 1024; // far more than the sockets' buffers hold
    let mut stream = tokio::net::TcpStream::connect(h.proxy).await.unwrap();
    stream
        .write_all(format!("GET /bytes/{SIZE} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // Nothing is read for a while: the proxy's writes stall, and it gives up on the client.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut got))
        .await
        .expect("the proxy closed the connection");
    assert!(
        got.len() < SIZE,
        "the response was cut off, not delivered whole ({} bytes)",
        got.len()
    );
}
