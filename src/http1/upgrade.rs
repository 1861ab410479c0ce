//! The hand-over of a client connection after a CONNECT is answered 2xx: the server side stops
//! reading it and gives it, with the bytes it read past the head, to whoever holds the request's
//! [`OnUpgrade`] (the tunnel). The connection never comes back.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// A client connection's IO, whatever its type.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The request extension a CONNECT carries: its connection, once the answer is out.
#[derive(Clone, Debug)]
pub struct OnUpgrade(Arc<Mutex<Option<oneshot::Receiver<Rewound>>>>);

impl OnUpgrade {
    pub(super) fn new(receiver: oneshot::Receiver<Rewound>) -> Self {
        Self(Arc::new(Mutex::new(Some(receiver))))
    }

    /// The connection, once the 2xx answer to the CONNECT is written; `Err` if the connection
    /// ended first, or the request was answered otherwise, or it was taken already.
    pub async fn upgraded(&self) -> io::Result<Rewound> {
        let receiver = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        match receiver {
            Some(receiver) => receiver
                .await
                .map_err(|_| io::ErrorKind::NotConnected.into()),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

/// A client connection with the bytes read from it ahead put back in front: a CONNECT tunnel's
/// client, or an HTTP/2 client whose preface was read to tell it apart.
pub struct Rewound {
    io: Box<dyn Io>,
    read: BytesMut,
}

impl std::fmt::Debug for Rewound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewound")
            .field("read", &self.read.len())
            .finish_non_exhaustive()
    }
}

impl Rewound {
    /// `io`, whose next bytes are `read`.
    pub fn new(io: Box<dyn Io>, read: BytesMut) -> Self {
        Self { io, read }
    }
}

impl AsyncRead for Rewound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
