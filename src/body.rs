//! The response body type shared by every handler, and a wrapper that bounds the time
//! between two chunks of a streamed upstream body.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::{Instant, Sleep};

/// Errors of a response body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every response the gateway sends has this body type.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The upstream stopped sending body data for longer than its timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream body stalled for longer than {0:?}")]
pub struct BodyStalled(pub Duration);

/// Streams `inner`, failing if no frame arrives within `timeout` of the previous one.
/// Failing aborts the response, which the client sees as a cut connection or stream:
/// the status line has already been sent, so no error response is possible.
pub struct StallTimeout<B> {
    inner: B,
    timeout: Duration,
    /// Made on the first pause only: a body that is ready whenever asked (most small
    /// responses) costs no timer at all.
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether `sleep` counts the current pause (set when a pause starts, cleared by
    /// every frame).
    armed: bool,
}

impl<B> StallTimeout<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, timeout: Duration) -> Self {
        StallTimeout {
            inner,
            timeout,
            sleep: None,
            armed: false,
        }
    }
}

impl<B> HttpBody for StallTimeout<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.armed = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let timeout = this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if !this.armed {
            // A pause starts: the timeout counts from here.
            sleep.as_mut().reset(Instant::now() + timeout);
            this.armed = true;
        }
        ready!(sleep.as_mut().poll(cx));
        Poll::Ready(Some(Err(Box::new(BodyStalled(this.timeout)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    /// A body fed by a channel: a frame per message, the end when the sender goes.
    struct Fed(mpsc::Receiver<Bytes>);

    impl HttpBody for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0
                .poll_recv(cx)
                .map(|next| next.map(|bytes| Ok(Frame::data(bytes))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pauses_shorter_than_the_timeout_pass_and_a_longer_one_fails() {
        let (tx, rx) = mpsc::channel(1);
        let mut body = StallTimeout::new(Fed(rx), Duration::from_secs(5));
        let feeder = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                tx.send(Bytes::from_static(b"chunk")).await.unwrap();
            }
            // Then silence, the sender kept open.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        for _ in 0..3 {
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "chunk");
        }
        let started = Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.is::<BodyStalled>(), "{error}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_ends_is_not_cut() {
        let (tx, rx) = mpsc::channel(1);
        let mut body = StallTimeout::new(Fed(rx), Duration::from_secs(5));
        tx.send(Bytes::from_static(b"all")).await.unwrap();
        drop(tx);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "all"
        );
        assert!(body.frame().await.is_none());
    }
}
