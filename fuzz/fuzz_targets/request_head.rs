//! tokengate's own server side reading request heads from arbitrary bytes, against httparse's
//! reading of the same bytes: it never panics, never serves a head httparse refuses or has not
//! finished, and when it serves one, the head ends where httparse ends it, with the same method
//! and target, and the body is exactly the one `Content-Length` declares.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::front::read_request_head;

fuzz_target!(|bytes: &[u8]| {
    let Some((method, target, taken)) = read_request_head(bytes) else {
        return;
    };
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut request = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = request.parse(bytes) else {
        panic!("served a head httparse does not complete: {:?}", String::from_utf8_lossy(bytes));
    };
    assert_eq!(request.method, Some(method.as_str()));
    assert_eq!(http::Uri::try_from(request.path.unwrap_or_default()).ok(), Some(target));
    assert_eq!(request.version, Some(1), "only HTTP/1.1 is served");
    let lengths: Vec<&[u8]> = request
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value)
        .collect();
    assert!(lengths.len() <= 1, "served with {} Content-Length fields", lengths.len());
    assert!(
        request.headers.iter().all(|h| !h.name.eq_ignore_ascii_case("transfer-encoding")),
        "served with Transfer-Encoding"
    );
    // One length, or a list of equal ones (`5, 5`), as RFC 9110 §8.6 allows.
    let body: usize = lengths.first().map_or(0, |value| {
        let parts: Vec<usize> = std::str::from_utf8(value)
            .expect("a served length is ASCII")
            .split(',')
            .map(|part| part.trim().parse().expect("a served length is digits"))
            .collect();
        assert!(parts.windows(2).all(|w| w[0] == w[1]), "served differing lengths");
        parts[0]
    });
    assert_eq!(taken, head_len + body, "the request ends where its head and length say");
});
