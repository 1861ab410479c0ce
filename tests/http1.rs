//! HTTP/1 and HTTP/2 from clients: framing, smuggling attempts, keep-alive connections in
//! every state, and shutdown.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::raw::*;
use common::*;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use sha2::{Digest, Sha256};
use tokengate::sandbox::upstream::pattern;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunk_size_from_the_upstream_is_refused_and_its_connection_not_reused() {
    // `0x5` is not a chunk size: read leniently it would be a last chunk of size 0, and the
    // connection, with "hello…" still unread, would go back to the pool.
    let (h, connections) = through_scripted_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    let client = client();
    for i in 1..=2 {
        let response = client.request(get(&h.url("/scripted/x"))).await;
        let complete = match response {
            Ok(response) => response.into_body().collect().await.is_ok(),
            Err(_) => false,
        };
        assert!(
            !complete,
            "request {i}: a body framed wrongly is cut off, not ended"
        );
        assert_eq!(
            connections.load(std::sync::atomic::Ordering::SeqCst),
            i,
            "request {i}: the refused connection was not reused"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_requests_without_exactly_one_valid_host_get_400_and_the_connection_closes() {
    let h = Harness::start().await;
    let chunked = "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    for (why, request) in [
        ("no Host", "GET /a HTTP/1.1\r\n\r\n".to_owned()),
        (
            "no Host, absolute form",
            "GET http://api.example.com/a HTTP/1.1\r\n\r\n".into(),
        ),
        (
            "two equal Hosts",
            "GET /a HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n".into(),
        ),
        (
            "two Hosts",
            "GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(),
        ),
        ("userinfo", "GET /a HTTP/1.1\r\nHost: user@a\r\n\r\n".into()),
        // Chunked uploads are read by hyper, not by tokengate's own server side.
        ("no Host, chunked", format!("POST /a HTTP/1.1\r\n{chunked}")),
        (
            "two Hosts, chunked",
            format!("POST /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n{chunked}"),
        ),
        (
            "two Hosts, HTTP/1.0",
            "GET /a HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n".into(),
        ),
    ] {
        // raw_request reads until the proxy closes the connection.
        let (status, answer) =
            tokio::time::timeout(Duration::from_secs(10), raw_request(h.proxy, &request))
                .await
                .unwrap_or_else(|_| panic!("{why}: the connection was not closed"));
        assert_eq!(status, 400, "{why}: {answer}");
        assert!(
            answer.contains("x-tokengate-error: bad_request"),
            "{why}: {answer}"
        );
        assert!(answer.contains("host"), "{why}: {answer}");
    }
    assert_eq!(h.upstream.requests(), 0, "none was forwarded");
    // HTTP/1.0 may leave Host out.
    let (status, _) = raw_request(h.proxy, "GET /a HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_repeated_equal_lengths_reaches_the_client_with_one() {
    let (h, _) = through_scripted_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nContent-Length: 5, 5\r\n\r\nhello",
    )
    .await;
    let (status, answer) = raw_request(
        h.proxy,
        "GET /scripted/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer.matches("content-length").count(), 1, "{answer}");
    assert!(answer.contains("content-length: 5\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhello"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_reaches_the_upstream_whatever_the_method() {
    let h = Harness::start().await;
    for (method, framing) in [
        (
            "GET",
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        ("GET", "Content-Length: 5\r\n\r\nhello"),
        (
            "DELETE",
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
        ("OPTIONS", "Content-Length: 5\r\n\r\nhello"),
    ] {
        let (status, answer) = raw_request(
            h.proxy,
            &format!("{method} /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{framing}"),
        )
        .await;
        assert_eq!(status, 200, "{method} {framing:?}: {answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert!(
            body.contains("\"body_bytes\":5"),
            "{method} {framing:?}: the body was dropped: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused_after_any_body_hyper_accepts() {
    // The first body has what hyper accepts and the framing watch used to give up on: an
    // 8 KiB chunk extension and a zero-padded 20-digit size. The second request, on the same
    // connection, carries both Content-Length and Transfer-Encoding.
    let h = Harness::start().await;
    let extension = "x".repeat(8 * 1024);
    let first = format!(
        "POST /first HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
         5;{extension}\r\nhello\r\n00000000000000000005\r\nworld\r\n0\r\n\r\n"
    );
    let second = "POST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\
                  Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n";
    let (_, answer) = tokio::time::timeout(
        Duration::from_secs(10),
        raw_request(h.proxy, &format!("{first}{second}")),
    )
    .await
    .expect("the proxy closes the connection");
    let statuses: Vec<&str> = answer.split("http/1.1 ").skip(1).map(|r| &r[..3]).collect();
    assert_eq!(statuses, ["200", "400"], "{answer}");
    assert!(
        answer.contains("x-tokengate-error: bad_request"),
        "{answer}"
    );
    let log = h.upstream.log();
    assert!(
        log.iter().all(|seen| seen.target != "POST /second"),
        "the ambiguous request never reached the upstream: {log:?}"
    );
}

/// A harness whose route `/scripted/` leads to [`scripted_upstream`] answering `response`; the
/// upstream's count of accepted connections comes with it.
async fn through_scripted_upstream(
    response: &'static [u8],
) -> (Harness, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (upstream, connections) = scripted_upstream(response).await;
    let h = Harness::with(Setup {
        routes_before: format!(
            "[[routes]]\npath_prefix = \"/scripted/\"\nupstream = \"http://{upstream}\"\ncredential = \"partner\"\n"
        ),
        ..Setup::default()
    })
    .await;
    (h, connections)
}
