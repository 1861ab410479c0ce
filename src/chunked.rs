//! The chunked transfer coding (RFC 9112 §7.1), followed byte by byte with bounded lines: the
//! framing watch ([`crate::framing`]) follows client request bodies with it, and the upstream
//! client ([`crate::h1`]) decodes response bodies with it.

use crate::server::MAX_HEADER_BYTES;

/// The longest chunk-size line (size and extensions) followed, in bytes.
pub const MAX_CHUNK_LINE: usize = 4096;

/// The most bytes of trailer section followed after the last chunk.
pub const MAX_TRAILER_BYTES: usize = MAX_HEADER_BYTES;

/// Where a chunked body is.
#[derive(Debug)]
pub enum Chunk {
    /// A chunk-size line: the size so far, its hex digits, whether they have ended (an
    /// extension or CR follows) and the line's length.
    Size {
        /// The chunk size read so far.
        size: u64,
        /// Hex digits read.
        digits: u8,
        /// The digits have ended (an extension or CR follows).
        ended: bool,
        /// The line's length so far.
        len: usize,
    },
    /// Inside a chunk's data: the bytes left.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The trailer section after the last chunk: the current line's length, and the total.
    Trailer {
        /// The current line's length.
        line: usize,
        /// The section's length so far.
        total: usize,
    },
}

/// What the next bytes of a chunked body are; see [`Chunk::advance`].
#[derive(Debug, PartialEq, Eq)]
pub enum Advance {
    /// This many bytes were framing (sizes, extensions, CRLFs, trailers); the body goes on.
    Framing(usize),
    /// This many bytes are chunk data.
    Data(usize),
    /// The body ended after this many framing bytes.
    Done(usize),
    /// The framing is broken or over its bounds.
    Malformed,
}

impl Default for Chunk {
    fn default() -> Self {
        Self::Size {
            size: 0,
            digits: 0,
            ended: false,
            len: 0,
        }
    }
}

impl Chunk {
    /// Reads the start of `data`: a run of framing bytes up to the next chunk data (or the end
    /// of `data`), or a run of chunk data. Call it again with the bytes after the ones it names.
    pub fn advance(&mut self, data: &[u8]) -> Advance {
        if let Self::Data(left) = self {
            let n = data.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            *left -= n as u64;
            if *left == 0 {
                *self = Self::DataEnd;
            }
            return Advance::Data(n);
        }
        for (i, &b) in data.iter().enumerate() {
            match self {
                Self::Size {
                    size,
                    digits,
                    ended,
                    len,
                } => {
                    *len += 1;
                    if *len > MAX_CHUNK_LINE {
                        return Advance::Malformed;
                    }
                    if b == b'\n' {
                        if *digits == 0 {
                            return Advance::Malformed;
                        }
                        *self = match *size {
                            0 => Self::Trailer { line: 0, total: 0 },
                            n => Self::Data(n),
                        };
                        if matches!(self, Self::Data(_)) {
                            return Advance::Framing(i + 1);
                        }
                    } else if let (false, Some(d)) = (*ended, char::from(b).to_digit(16)) {
                        if *digits == 16 {
                            return Advance::Malformed;
                        }
                        *size = *size << 4 | u64::from(d);
                        *digits += 1;
                    } else {
                        *ended = true;
                    }
                }
                Self::DataEnd => match b {
                    b'\r' => {}
                    b'\n' => *self = Self::default(),
                    _ => return Advance::Malformed,
                },
                Self::Trailer { line, total } => {
                    *total += 1;
                    if *total > MAX_TRAILER_BYTES {
                        return Advance::Malformed;
                    }
                    match b {
                        b'\n' if *line == 0 => return Advance::Done(i + 1),
                        b'\n' => *line = 0,
                        b'\r' => {}
                        _ => *line += 1,
                    }
                }
                Self::Data(_) => unreachable!("data is returned before the loop"),
            }
        }
        Advance::Framing(data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `wire` fed in pieces of `step` bytes: the data, and the bytes after the body.
    fn decode(wire: &[u8], step: usize) -> Option<(Vec<u8>, usize)> {
        let mut chunk = Chunk::default();
        let mut data = Vec::new();
        let mut at = 0;
        while at < wire.len() {
            let end = (at + step).min(wire.len());
            let mut piece = &wire[at..end];
            while !piece.is_empty() {
                match chunk.advance(piece) {
                    Advance::Framing(n) => piece = &piece[n..],
                    Advance::Data(n) => {
                        data.extend_from_slice(&piece[..n]);
                        piece = &piece[n..];
                    }
                    Advance::Done(n) => return Some((data, wire.len() - (end - piece.len() + n))),
                    Advance::Malformed => return None,
                }
            }
            at = end;
        }
        None
    }

    #[test]
    fn decodes_data_extensions_and_trailers_however_the_bytes_are_split() {
        let wire =
            b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        for step in 1..=wire.len() {
            let (data, after) = decode(wire, step).expect("well-formed");
            assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            assert_eq!(
                after, 4,
                "step {step}: the bytes after the body are not consumed"
            );
        }
    }

    #[test]
    fn refuses_broken_or_unbounded_framing() {
        for bad in [
            &b"\r\n"[..],             // no size
            b"zz\r\n",                // not hex
            b"11111111111111111\r\n", // 17 digits
            b"3\r\nabcXY",            // no CRLF after the data
        ] {
            assert_eq!(decode(bad, bad.len()), None, "{bad:?}");
        }
        let long_line = [b"1;".as_slice(), &[b'x'; MAX_CHUNK_LINE]].concat();
        assert_eq!(decode(&long_line, 100), None);
        let long_trailer = [b"0\r\n".as_slice(), &[b'x'; MAX_TRAILER_BYTES + 1]].concat();
        assert_eq!(decode(&long_trailer, 1000), None);
    }
}
