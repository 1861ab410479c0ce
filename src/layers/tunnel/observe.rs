//! An IO wrapper that shows an observer what passes: the bytes read, and how many were written.
//! Tunnels ([`crate::layers::tunnel`]) note activity through it for their idle timeout.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What an [`Observed`] stream reports to.
pub trait Observer {
    /// `bytes` were just read (never called with none).
    fn read(&mut self, bytes: &[u8]);
    /// `n` bytes were just written (never called with 0).
    fn wrote(&mut self, n: usize) {
        let _ = n;
    }
    /// A write or flush just returned: `pending` if it waits on the peer (bytes still queued).
    fn writing(&mut self, pending: bool) {
        let _ = pending;
    }
}

pin_project! {
    /// `io`, with every read and write shown to an [`Observer`]. Vectored writes pass through.
    pub struct Observed<IO, O> {
        #[pin]
        io: IO,
        observer: O,
    }
}

impl<IO, O> Observed<IO, O> {
    /// Shows `observer` what passes through `io`.
    pub fn new(io: IO, observer: O) -> Self {
        Self { io, observer }
    }

    /// The stream itself.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The stream and its observer, apart.
    pub fn into_parts(self) -> (IO, O) {
        (self.io, self.observer)
    }
}

impl<IO: AsyncRead, O: Observer> AsyncRead for Observed<IO, O> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.observer.read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<IO: AsyncWrite, O: Observer> AsyncWrite for Observed<IO, O> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        wrote(this.observer, this.io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        wrote(this.observer, this.io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_flush(cx);
        this.observer.writing(polled.is_pending());
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

fn wrote<O: Observer>(
    observer: &mut O,
    polled: Poll<io::Result<usize>>,
) -> Poll<io::Result<usize>> {
    if let Poll::Ready(Ok(n @ 1..)) = polled {
        observer.wrote(n);
    }
    observer.writing(polled.is_pending());
    polled
}
