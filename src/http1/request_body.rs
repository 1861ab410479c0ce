//! A request body as the server side hands it to the stack: read whole with its head, or read
//! from the client's connection as it is polled ([`Streaming`]), which holds the connection's
//! read half and gives it back to the connection when the body ends (or is dropped).

use std::any::Any;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncRead;
use tokio::sync::oneshot;

use super::READ_SIZE;
use super::chunked::{Advance, Chunk};

/// Why reading a client's body failed; the connection is closed after the answer.
#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    /// The connection failed.
    #[error("client connection failed")]
    Io(#[from] io::Error),
    /// The client closed before the body ended.
    #[error("client closed before its body ended")]
    Closed,
    /// The chunked coding is broken or over its bounds.
    #[error("malformed chunked body")]
    Malformed,
}

/// A request body from an HTTP/1 client.
#[derive(Debug)]
pub enum RequestBody {
    /// Read whole with the head (`None`: no body).
    Whole(Option<Bytes>),
    /// Still arriving. Boxed, so that a request moved through every layer stays small.
    Streaming(Box<Streaming>),
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        match self.get_mut() {
            Self::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Streaming(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Whole(bytes) => bytes.is_none(),
            Self::Streaming(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Self::Streaming(body) => body.size_hint(),
        }
    }
}

/// The read half of a client connection, whatever its IO; the connection takes its own type
/// back out of it ([`ReadHalf::into_any`]).
pub(super) trait ReadHalf: AsyncRead + Send + Sync + Unpin {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send>;
}

impl<T: AsyncRead + Send + Sync + Unpin + 'static> ReadHalf for T {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// What a streaming body reads from: the connection's read half and its buffered bytes.
pub(super) struct Source {
    pub read: Box<dyn ReadHalf>,
    pub buf: BytesMut,
}

/// A [`Source`] given back to its connection.
pub(super) struct Returned {
    pub source: Source,
    /// The body was read to its end, and the next request starts in `source.buf`.
    pub finished: bool,
}

/// How much of a streaming body is left.
#[derive(Debug)]
enum Left {
    Length(u64),
    Chunked(Chunk),
    Done,
}

/// A body still arriving on the client's connection, read as it is polled.
pub struct Streaming {
    source: Option<Source>,
    left: Left,
    back: Option<oneshot::Sender<Returned>>,
    /// Told at the first poll, for a client that waits for `100 Continue`.
    wanted: Option<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Streaming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streaming")
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

impl Streaming {
    /// A body of `length` bytes (`None`: chunked) from `source`, given back through `back`;
    /// `wanted` is told when it is first read.
    pub(super) fn new(
        source: Source,
        length: Option<u64>,
        back: oneshot::Sender<Returned>,
        wanted: Option<oneshot::Sender<()>>,
    ) -> Self {
        let left = match length {
            Some(n) => Left::Length(n),
            None => Left::Chunked(Chunk::default()),
        };
        Self {
            source: Some(source),
            left,
            back: Some(back),
            wanted,
        }
    }

    /// Gives the source back, and says whether the body was read to its end.
    fn give_back(&mut self, finished: bool) {
        if let (Some(source), Some(back)) = (self.source.take(), self.back.take()) {
            let _ = back.send(Returned { source, finished });
        }
    }

    fn fail(&mut self, error: BodyReadError) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        self.left = Left::Done;
        self.give_back(false);
        Poll::Ready(Some(Err(error)))
    }
}

impl http_body::Body for Streaming {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        let this = &mut *self;
        if let Some(wanted) = this.wanted.take() {
            let _ = wanted.send(());
        }
        loop {
            let Some(source) = this.source.as_mut() else {
                return Poll::Ready(None);
            };
            if !source.buf.is_empty() {
                let data = match &mut this.left {
                    Left::Length(left) => {
                        let n = source
                            .buf
                            .len()
                            .min(usize::try_from(*left).unwrap_or(usize::MAX));
                        *left -= n as u64;
                        let data = source.buf.split_to(n).freeze();
                        if *left == 0 {
                            this.left = Left::Done;
                            this.give_back(true);
                        }
                        data
                    }
                    Left::Chunked(chunk) => match chunk.advance(&source.buf) {
                        Advance::Framing(n) => {
                            source.buf.advance(n);
                            continue;
                        }
                        Advance::Data(n) => source.buf.split_to(n).freeze(),
                        Advance::Done(n) => {
                            source.buf.advance(n);
                            this.left = Left::Done;
                            this.give_back(true);
                            return Poll::Ready(None);
                        }
                        Advance::Malformed => return this.fail(BodyReadError::Malformed),
                    },
                    Left::Done => return Poll::Ready(None),
                };
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if source.buf.capacity() - source.buf.len() < READ_SIZE / 2 {
                source.buf.reserve(READ_SIZE);
            }
            let read =
                tokio_util::io::poll_read_buf(Pin::new(&mut source.read), cx, &mut source.buf);
            match ready!(read) {
                Ok(0) => return this.fail(BodyReadError::Closed),
                Ok(_) => {}
                Err(error) => return this.fail(error.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.left, Left::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Left::Length(left) => SizeHint::with_exact(left),
            Left::Done => SizeHint::with_exact(0),
            Left::Chunked(_) => SizeHint::default(),
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.give_back(false);
    }
}
