//! The chunked transfer coding (RFC 9112 §7.1), followed byte by byte with bounded lines: the
//! server side ([`super::server`]) decodes client request bodies with it, and the upstream
//! client ([`super::client`]) response bodies with it. It is as strict as hyper's decoder:
//! a chunk size is hex digits only, lines end with CRLF, and nothing else is guessed at.

/// The most bytes of chunk extensions followed in one body, as hyper allows.
pub const MAX_CHUNK_EXTENSIONS: usize = 16 * 1024;

/// The most bytes of trailer section followed after the last chunk, as hyper allows.
pub const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// Where a chunked body is: hyper's decoder's states, byte for byte, so that the two agree on
/// what they accept and on where a body ends.
///
/// It stays as small as the body state it sits in is moved often: the rare trailer section is
/// boxed, and the counters are as wide as their limits.
#[derive(Debug, Default)]
pub struct Chunk {
    state: State,
    /// Trailer lines read (at most [`super::MAX_HEADERS`]).
    trailer_lines: u8,
    /// Extension bytes read in this body (below [`MAX_CHUNK_EXTENSIONS`]).
    extensions: u16,
    /// The chunk size read so far, or the data left of the current chunk.
    size: u64,
    /// The trailer section read so far (no allocation without trailers). Boxed: one pointer
    /// in the state, not a vector's three.
    #[allow(clippy::box_collection)]
    trailers: Option<Box<Vec<u8>>>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first hex digit of a chunk size.
    #[default]
    Start,
    /// More hex digits, or what ends them.
    Size,
    /// Spaces or tabs after the size.
    SizeLws,
    /// An extension, up to CR.
    Extension,
    /// The LF of a chunk-size line.
    SizeLf,
    /// Chunk data; `size` bytes left.
    Data,
    /// The CR after a chunk's data.
    DataCr,
    /// The LF after a chunk's data.
    DataLf,
    /// After the last chunk's line: CR (the end) or a trailer field.
    EndCr,
    /// The final LF.
    EndLf,
    /// Inside a trailer field line.
    Trailer,
    /// The LF of a trailer field line.
    TrailerLf,
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

impl Chunk {
    /// Reads the start of `data`: a run of framing bytes up to the next chunk data (or the end
    /// of `data`), or a run of chunk data. Call it again with the bytes after the ones it names.
    pub fn advance(&mut self, data: &[u8]) -> Advance {
        if self.state == State::Data {
            let n = data
                .len()
                .min(usize::try_from(self.size).unwrap_or(usize::MAX));
            self.size -= n as u64;
            if self.size == 0 {
                self.state = State::DataCr;
            }
            return Advance::Data(n);
        }
        for (i, &b) in data.iter().enumerate() {
            match self.step(b) {
                Ok(State::Data) => {
                    self.state = State::Data;
                    return Advance::Framing(i + 1);
                }
                Ok(next) => self.state = next,
                Err(Done) => return Advance::Done(i + 1),
                Err(Refused) => return Advance::Malformed,
            }
        }
        Advance::Framing(data.len())
    }

    /// One framing byte: the next state, or the end of the body, or a refusal.
    fn step(&mut self, b: u8) -> Result<State, Stop> {
        use State::*;
        Ok(match (self.state, b) {
            (Start | Size, _) if b.is_ascii_hexdigit() => {
                let digit = u64::from(char::from(b).to_digit(16).unwrap_or_default());
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(digit))
                    .ok_or(Refused)?;
                Size
            }
            (Size | SizeLws, b' ' | b'\t') => SizeLws,
            (Size | SizeLws, b';') => Extension,
            (Size | SizeLws, b'\r') => SizeLf,
            (Extension, b'\r') => SizeLf,
            (Extension, b'\n') => return Err(Refused),
            (Extension, _) => {
                self.extensions += 1;
                if usize::from(self.extensions) >= MAX_CHUNK_EXTENSIONS {
                    return Err(Refused);
                }
                Extension
            }
            (SizeLf, b'\n') if self.size == 0 => EndCr,
            (SizeLf, b'\n') => Data,
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => {
                self.size = 0;
                Start
            }
            (EndCr, b'\r') => {
                self.keep_trailer(b)?;
                EndLf
            }
            (EndCr, _) => {
                self.keep_trailer(b)?;
                Trailer
            }
            (Trailer, _) => {
                self.keep_trailer(b)?;
                if b == b'\r' { TrailerLf } else { Trailer }
            }
            (TrailerLf, b'\n') => {
                if usize::from(self.trailer_lines) >= super::MAX_HEADERS {
                    return Err(Refused);
                }
                self.trailer_lines += 1;
                self.keep_trailer(b)?;
                EndCr
            }
            (EndLf, b'\n') => {
                self.keep_trailer(b)?;
                return Err(if self.trailers_parse() { Done } else { Refused });
            }
            _ => return Err(Refused),
        })
    }

    /// Keeps a byte of the trailer section (none are kept when it is just the final CRLF).
    fn keep_trailer(&mut self, b: u8) -> Result<(), Stop> {
        let none_yet = self.trailers.is_none();
        if none_yet && (self.state == State::EndLf || (self.state == State::EndCr && b == b'\r')) {
            return Ok(());
        }
        let trailers = self.trailers.get_or_insert_default();
        trailers.push(b);
        if trailers.len() >= MAX_TRAILER_BYTES {
            return Err(Refused);
        }
        Ok(())
    }

    /// Whether the trailer section is field lines as hyper reads them (httparse, then valid
    /// names and values).
    fn trailers_parse(&self) -> bool {
        let Some(trailers) = &self.trailers else {
            return true;
        };
        let mut fields = vec![httparse::EMPTY_HEADER; usize::from(self.trailer_lines)];
        match httparse::parse_headers(trailers, &mut fields) {
            Ok(httparse::Status::Complete((_, fields))) => fields.iter().all(|f| {
                http::HeaderName::from_bytes(f.name.as_bytes()).is_ok()
                    && http::HeaderValue::from_bytes(f.value).is_ok()
            }),
            _ => false,
        }
    }
}

/// Why [`Chunk::step`] stopped.
enum Stop {
    /// The body ended.
    Done,
    /// The framing is refused.
    Refused,
}
use Stop::{Done, Refused};

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
            b"11111111111111111\r\n", // over 64 bits
            b"3\r\nabcXY",            // no CRLF after the data
        ] {
            assert_eq!(decode(bad, bad.len()), None, "{bad:?}");
        }
        let long_extension = [b"1;".as_slice(), &[b'x'; MAX_CHUNK_EXTENSIONS]].concat();
        assert_eq!(decode(&long_extension, 100), None);
        let long_trailer = [b"0\r\n".as_slice(), &[b'x'; MAX_TRAILER_BYTES + 1]].concat();
        assert_eq!(decode(&long_trailer, 1000), None);
    }

    #[test]
    fn refuses_what_is_not_exactly_the_grammar() {
        for bad in [
            &b"0x5\r\nhello\r\n0\r\n\r\n"[..], // not pure hex: not size 0
            b"5 garbage\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",         // bare LF after the size
            b"5;a\nhello\r\n0\r\n\r\n",       // LF inside an extension
            b" 5\r\nhello\r\n0\r\n\r\n",      // space before the size
            b"5\r\nhello\n0\r\n\r\n",         // bare LF after the data
            b"5\r\nhello\r\r\n0\r\n\r\n",     // CR CR LF after the data
            b"5\r\nhello\r\n0\r\n\n",         // bare LF ends the trailers
            b"5\r\nhello\r\n0\r\nx: 1\n\r\n", // bare LF ends a trailer line
            b"5\r\nhello\r\n0\r\n\r\r\n",     // CR CR LF ends the trailers
            b"5\r\nhello\r\n0\r\n\rx",        // CR then not LF
        ] {
            assert_eq!(
                decode(bad, bad.len()),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        for good in [
            &b"5 \t ;a=b\r\nhello\r\n0\r\n\r\n"[..],
            b"5;a=\"q;x\"\r\nhello\r\n0;end\r\nx-a: 1\r\nx-b:2\r\n\r\n",
            b"00005\r\nhello\r\n000\r\n\r\n",
        ] {
            let (data, after) = decode(good, 1).expect("well-formed");
            assert_eq!((data.as_slice(), after), (&b"hello"[..], 0), "{good:?}");
        }
    }

    /// The same bodies, mangled one byte at a time, through this decoder and through hyper's
    /// server, each followed by a second request: both accept the same ones, with the same
    /// data, and end them at the same byte (hyper then reads the second request).
    #[tokio::test]
    async fn agrees_with_hyper_on_mangled_bodies() {
        const NEXT: &[u8] = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n";
        let bases: [&[u8]; 4] = [
            b"5\r\nhello\r\n0\r\n\r\n",
            b"3;ext=v\r\nabc\r\n0\r\nx-t: 1\r\n\r\n",
            b"a \r\n0123456789\r\n00\r\n\r\n",
            b"1\r\nz\r\n0;e\r\na:b\r\nc: d\r\n\r\n",
        ];
        let bytes: [u8; 11] = [
            b'x', b' ', b'\t', b';', b'\r', b'\n', b'0', b'f', b':', b'"', 0,
        ];
        let mut cases = 0;
        let mut disagreements = Vec::new();
        for base in bases {
            // Inside the body only: a byte after it belongs to the next request.
            for at in 0..base.len() {
                for &b in &bytes {
                    for replace in [true, false] {
                        let mut body = base.to_vec();
                        if replace {
                            body[at] = b;
                        } else {
                            body.insert(at, b);
                        }
                        cases += 1;
                        let wire = [body.as_slice(), NEXT].concat();
                        // Ours: the data, and whether the body ends where NEXT starts (or
                        // at line breaks before it, which a server skips before a request).
                        let ours = decode(&wire, 1).map(|(data, after)| {
                            let gap = &wire[wire.len() - after..wire.len() - NEXT.len().min(after)];
                            let next =
                                after >= NEXT.len() && gap.iter().all(|b| b"\r\n".contains(b));
                            (data, next)
                        });
                        let theirs = hyper_decode(&wire).await;
                        if ours != theirs {
                            disagreements.push(format!(
                                "{:?}: ours {ours:?}, hyper's {theirs:?}",
                                String::from_utf8_lossy(&body)
                            ));
                        }
                    }
                }
            }
        }
        assert!(cases > 1000, "{cases}");
        assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
    }

    /// What hyper's HTTP/1 server reads from `wire` as a chunked request body: the data, and
    /// whether the next request it reads is the one after the body; `None` if it refuses the
    /// body or does not find its end.
    async fn hyper_decode(wire: &[u8]) -> Option<(Vec<u8>, bool)> {
        use http_body_util::BodyExt;
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let tx = tx.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .ok()
                        .map(|b| b.to_bytes().to_vec());
                    let _ = tx.send((path, body));
                    Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
                }
            });
        let serve = tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), service),
        );
        let head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
        client.write_all(&[&head[..], wire].concat()).await.ok()?;
        // Not shut down: hyper answers a closed connection's request as incomplete. What hyper
        // has not read after this long, it has not found the end of.
        let wait = std::time::Duration::from_millis(50);
        let first = tokio::time::timeout(wait, rx.recv()).await.ok().flatten();
        let second = tokio::time::timeout(wait, rx.recv()).await.ok().flatten();
        serve.abort();
        let (_, body) = first?;
        Some((body?, second.is_some_and(|(path, _)| path == "/next")))
    }

    #[test]
    fn stays_small() {
        assert!(
            std::mem::size_of::<Chunk>() <= 24,
            "{}",
            std::mem::size_of::<Chunk>()
        );
    }
}
