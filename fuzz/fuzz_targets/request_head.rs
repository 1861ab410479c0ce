//! tokengate's server side reading request heads from arbitrary bytes, against the strict
//! RFC 9112 reading the differential test uses (`tests/strict`): it never panics, and it
//! accepts, refuses or waits exactly as the strict reading does, with the head ending at the
//! same byte and the body framed the same way.
#![no_main]

#[path = "../../tests/strict/mod.rs"]
mod strict;

use libfuzzer_sys::fuzz_target;
use strict::{Body, Verdict, strict_reading};
use tokengate::http1::request::{BodyFraming, read_request_head};

fuzz_target!(|bytes: &[u8]| {
    let strict = strict_reading(bytes);
    match (read_request_head(bytes), &strict) {
        (Err(_), Verdict::Refused(_)) | (Ok(None), Verdict::Incomplete) => {}
        (Ok(Some((method, uri, head_len, framing))), Verdict::Request { method: m, target, head_len: l, body }) => {
            assert_eq!(method.as_str(), m);
            assert_eq!(Some(uri), target.parse::<http::Uri>().ok());
            assert_eq!(head_len, *l, "the head ends where the strict reading ends it");
            let framing = match framing {
                BodyFraming::Empty => Body::None,
                BodyFraming::Length(n) => Body::Length(n),
                BodyFraming::Chunked => Body::Chunked,
            };
            assert_eq!(framing, *body, "the body is framed as the strict reading frames it");
        }
        (ours, _) => panic!(
            "{:?}: ours {ours:?}, strict {strict:?}",
            String::from_utf8_lossy(bytes)
        ),
    }
});
