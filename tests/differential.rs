//! tokengate's reading of request heads against a strict RFC 9112 reading ([`strict`]) on the
//! same bytes: well-formed requests, each mangled byte by byte, and random splices of them.
//! They must agree on accept, refuse or wait, and on where the head ends and how the body is
//! framed (so on where the message ends). httparse frames the lines for both, as it does for
//! hyper, so the head grammar is hyper's; the framing and `Host` rules are RFC 9112's.

mod strict;

use strict::{Body, Verdict, strict_reading};
use tokengate::http1::request::{BodyFraming, read_request_head};

/// What tokengate's server side makes of `bytes`, in the strict reading's terms.
fn ours(bytes: &[u8]) -> Verdict {
    match read_request_head(bytes) {
        Err(_) => Verdict::Refused("tokengate refuses"),
        Ok(None) => Verdict::Incomplete,
        Ok(Some((method, uri, head_len, framing))) => Verdict::Request {
            method: method.to_string(),
            target: uri.to_string(),
            head_len,
            body: match framing {
                BodyFraming::Empty => Body::None,
                BodyFraming::Length(n) => Body::Length(n),
                BodyFraming::Chunked => Body::Chunked,
            },
        },
    }
}

/// Whether two verdicts agree: refusals agree whatever their reasons; requests agree on
/// method, head length and framing, and on the target as a URI.
fn agree(ours: &Verdict, strict: &Verdict) -> bool {
    match (ours, strict) {
        (Verdict::Refused(_), Verdict::Refused(_)) | (Verdict::Incomplete, Verdict::Incomplete) => {
            true
        }
        (
            Verdict::Request {
                method: m1,
                target: t1,
                head_len: l1,
                body: b1,
            },
            Verdict::Request {
                method: m2,
                target: t2,
                head_len: l2,
                body: b2,
            },
        ) => {
            m1 == m2
                && l1 == l2
                && b1 == b2
                && t2.parse::<http::Uri>().is_ok_and(|u| u.to_string() == *t1)
        }
        _ => false,
    }
}

const SEEDS: &[&[u8]] = &[
    b"GET /a?b=c HTTP/1.1\r\nHost: api.example.com\r\nAccept: */*\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a:8080\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET http://api.example.com/x HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET http://api.example.com/old HTTP/1.0\r\n\r\n",
    b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: api.example.com:443\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
    b"PUT /u HTTP/1.1\r\nHost: [::1]:80\r\nContent-Length: 2, 2\r\nConnection: close\r\n\r\nhi",
    b"HEAD / HTTP/1.1\nHost: a\nExpect: 100-continue\n\n",
];

/// The bytes a mangling puts in: each has a meaning somewhere in a head.
const MANGLES: &[u8] = b" \t\r\n:,;0a/*@[]\"\x00\x7f\xff";

/// Each seed with one byte replaced, inserted or removed, at every position.
fn single_mangles() -> Vec<Vec<u8>> {
    let mut cases = Vec::new();
    for seed in SEEDS {
        for at in 0..seed.len() {
            let mut removed = seed.to_vec();
            removed.remove(at);
            cases.push(removed);
            for &b in MANGLES {
                let mut replaced = seed.to_vec();
                replaced[at] = b;
                cases.push(replaced);
                let mut inserted = seed.to_vec();
                inserted.insert(at, b);
                cases.push(inserted);
            }
        }
    }
    cases
}

/// Random splices of seed lines and mangle bytes, from a fixed seed (the same cases each run).
fn random_splices(count: usize) -> Vec<Vec<u8>> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let lines: Vec<&[u8]> = SEEDS
        .iter()
        .flat_map(|seed| seed.split_inclusive(|&b| b == b'\n'))
        .collect();
    (0..count)
        .map(|_| {
            let mut case = Vec::new();
            for _ in 0..(next() % 7 + 1) {
                case.extend_from_slice(lines[(next() % lines.len() as u64) as usize]);
                if next() % 4 == 0 {
                    let at = (next() % (case.len() as u64 + 1)) as usize;
                    case.insert(at, MANGLES[(next() % MANGLES.len() as u64) as usize]);
                }
            }
            if next() % 2 == 0 {
                case.extend_from_slice(b"\r\n");
            }
            case
        })
        .collect()
}

#[test]
fn the_server_side_reads_heads_as_a_strict_rfc_9112_reading_does() {
    let mut cases = single_mangles();
    cases.extend(random_splices(20_000));
    let mut requests = 0;
    let mut disagreements = Vec::new();
    for case in &cases {
        let (ours, strict) = (ours(case), strict_reading(case));
        requests += usize::from(matches!(strict, Verdict::Request { .. }));
        if !agree(&ours, &strict) {
            disagreements.push(format!(
                "{:?}\n  ours {ours:?}\n  strict {strict:?}",
                String::from_utf8_lossy(case)
            ));
        }
    }
    assert!(cases.len() > 30_000, "{}", cases.len());
    assert!(
        requests > 5_000,
        "too few accepted cases to mean much: {requests}"
    );
    assert!(
        disagreements.is_empty(),
        "{} of {} cases:\n{}",
        disagreements.len(),
        cases.len(),
        disagreements[..disagreements.len().min(20)].join("\n")
    );
}

#[test]
fn every_split_of_a_head_reads_as_the_whole() {
    for seed in SEEDS {
        let whole = ours(seed);
        let Verdict::Request { head_len, .. } = whole else {
            panic!("{whole:?}");
        };
        for at in 0..seed.len() {
            let want = if at < head_len {
                Verdict::Incomplete
            } else {
                whole.clone()
            };
            assert_eq!(
                ours(&seed[..at]),
                want,
                "{:?} cut at {at}",
                String::from_utf8_lossy(seed)
            );
        }
    }
}
