//! The upstream client's reading of a response head on arbitrary bytes, against httparse's:
//! it never panics, refuses what httparse refuses, takes exactly the bytes httparse says the
//! head has, and passes on only well-formed header lines.
#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use tokengate::http1::client::read_response_head;

fuzz_target!(|input: (bool, &[u8])| {
    let (head_request, bytes) = input;
    let method = if head_request { Method::HEAD } else { Method::GET };
    let ours = read_response_head(bytes, &method);
    // httparse on the same bytes, skipping informational heads as the client does.
    let mut at = 0;
    let theirs = loop {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&bytes[at..]) {
            Ok(httparse::Status::Complete(n)) => match response.code {
                Some(101) => break Err(()),
                Some(code) if (100..200).contains(&code) => at += n,
                _ => break Ok(Some(at + n)),
            },
            Ok(httparse::Status::Partial) => break Ok(None),
            Err(_) => break Err(()),
        }
    };
    match (&ours, theirs) {
        (Ok(Some((_, taken, lines))), Ok(Some(n))) => {
            assert_eq!(*taken, n, "the head ends where httparse ends it");
            for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                assert!(line.ends_with(b"\r") && line.contains(&b':'), "{line:?}");
            }
        }
        (Ok(None), Ok(None)) => {}
        // Framing rules (lengths, codings) refuse heads httparse parses.
        (Err(_), Ok(Some(_))) => {}
        (Err(_), Err(())) => {}
        (ours, theirs) => panic!("ours {ours:?}, httparse's {theirs:?}"),
    }
});
