//! Error rescue: the single place a [`ProxyError`] becomes the client's JSON response.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Request;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::ErrorChain;
use crate::body::ProxyResponse;
use crate::error::ProxyError;

/// Turns every error of the inner stack into its JSON response.
#[derive(Debug, Clone, Copy, Default)]
pub struct RescueLayer;

impl<S> Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Rescue {
            inner,
            not_ready: None,
        }
    }
}

/// See [`RescueLayer`].
#[derive(Debug)]
pub struct Rescue<S> {
    inner: S,
    /// An error from the inner `poll_ready`, answered on the next call.
    not_ready: Option<ProxyError>,
}

impl<S: Clone> Clone for Rescue<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            not_ready: None,
        }
    }
}

impl<S, B> Service<Request<B>> for Rescue<S>
where
    S: Service<Request<B>, Response = ProxyResponse>,
    S::Error: Into<ProxyError>,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Rescue never fails: an inner readiness error is answered as the next call's response.
        if let Err(error) = ready!(self.inner.poll_ready(cx)) {
            self.not_ready = Some(error.into());
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.not_ready.take() {
            Some(error) => ResponseFuture::Failed { error: Some(error) },
            None => ResponseFuture::Inner {
                inner: self.inner.call(req),
            },
        }
    }
}

pin_project! {
    /// The future of [`Rescue`].
    #[project = Proj]
    pub enum ResponseFuture<F> {
        /// The inner service's response.
        Inner { #[pin] inner: F },
        /// The inner service was not ready.
        Failed { error: Option<ProxyError> },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<ProxyResponse, E>>,
    E: Into<ProxyError>,
{
    type Output = Result<ProxyResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let error = match self.project() {
            Proj::Inner { inner } => match ready!(inner.poll(cx)) {
                Ok(response) => return Poll::Ready(Ok(response)),
                Err(error) => error.into(),
            },
            Proj::Failed { error } => match error.take() {
                Some(error) => error,
                None => ProxyError::Internal("response future polled after completion"),
            },
        };
        let status = error.status();
        if status.is_server_error() {
            tracing::warn!(kind = error.kind(), status = status.as_u16(), error = %ErrorChain(&error), "request failed");
        } else {
            tracing::debug!(kind = error.kind(), status = status.as_u16(), error = %ErrorChain(&error), "request refused");
        }
        Poll::Ready(Ok(error.into_response()))
    }
}
