//! The chunked decoder on arbitrary bytes, cut into pieces at arbitrary places: it never
//! panics, never claims more bytes than it was given, and reaches the same verdict (data, end,
//! or refusal) however the bytes are split, as a streaming parser must.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::http1::chunked::{Advance, Chunk};

/// The data decoded, and how many bytes were left after the body's end; `None` if refused or
/// not ended. `cuts` are the piece lengths, cycled.
fn decode(wire: &[u8], cuts: &[u8]) -> Option<(Vec<u8>, usize)> {
    let mut chunk = Chunk::default();
    let mut data = Vec::new();
    let mut at = 0;
    let mut cut = cuts.iter().cycle();
    while at < wire.len() {
        let step = usize::from(*cut.next().unwrap_or(&255)).max(1);
        let end = (at + step).min(wire.len());
        let mut piece = &wire[at..end];
        while !piece.is_empty() {
            match chunk.advance(piece) {
                Advance::Framing(n) | Advance::Data(n) if n == 0 || n > piece.len() => {
                    panic!("advance named {n} of {} bytes", piece.len())
                }
                Advance::Framing(n) => piece = &piece[n..],
                Advance::Data(n) => {
                    data.extend_from_slice(&piece[..n]);
                    piece = &piece[n..];
                }
                Advance::Done(n) => {
                    assert!(n <= piece.len());
                    return Some((data, wire.len() - (end - piece.len() + n)));
                }
                Advance::Malformed => return None,
            }
        }
        at = end;
    }
    None
}

fuzz_target!(|input: (Vec<u8>, Vec<u8>)| {
    let (wire, cuts) = input;
    let whole = decode(&wire, &[255]);
    let split = decode(&wire, if cuts.is_empty() { &[1] } else { &cuts });
    let bytewise = decode(&wire, &[1]);
    assert_eq!(whole, split, "the verdict depends on where the bytes were cut");
    assert_eq!(whole, bytewise, "the verdict depends on where the bytes were cut");
    if let Some((data, after)) = whole {
        assert!(data.len() + after <= wire.len());
    }
});
