//! Per-connection activity: how many requests are in flight (a request stays in flight
//! until its response body has been sent), since when none has been, and whether the
//! next HTTP/1 request head has begun to arrive. Bytes alone (an HTTP/2 PING, an empty
//! frame) never make a connection busy. It also tells when an idle HTTP/1 connection may
//! give its HTTP state back (see `server::http`). Lock-free, because every read touches it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Stored in `head_since_ms` when no request head is arriving.
const NO_HEAD: u64 = u64::MAX;

/// Activity counters of one connection.
pub struct Activity {
    opened: Instant,
    /// Milliseconds since `opened` when the last request finished (0: none yet).
    idle_since_ms: AtomicU64,
    /// Milliseconds since `opened` of the first byte read while no request was in
    /// flight: the start of the next request head ([`NO_HEAD`] when none is arriving).
    head_since_ms: AtomicU64,
    /// The client spoke HTTP/2 (its preface was the first thing read).
    http2: AtomicBool,
    /// Whether anything was read yet.
    read_any: AtomicBool,
    /// Milliseconds since `opened` of the last write that moved bytes.
    last_write_ms: AtomicU64,
    /// Requests not yet answered in full (their response body is still being sent).
    in_flight: AtomicUsize,
    /// Requests whose handler is still deciding on the response.
    handling: AtomicUsize,
    started: AtomicU64,
    /// The last write or flush could not complete: bytes wait in the HTTP buffers.
    write_blocked: AtomicBool,
    /// A request came that may leave the connection between requests in a state only
    /// its HTTP session knows (a body, an ask to close, not HTTP/1.1): the session is
    /// never released.
    pinned: AtomicBool,
    /// The session is being released: shutting the stream down must leave it open.
    releasing: AtomicBool,
    /// The end of the last request in flight is to be told through `went_idle`: an
    /// HTTP/1.1 session that has no release timer armed.
    idle_notice: AtomicBool,
    went_idle: Notify,
    /// Nothing watches the connection any more (its HTTP session ended, or handed the
    /// stream to a WebSocket relay, which keeps its own time): reads and writes are no
    /// longer accounted.
    detached: AtomicBool,
}

impl Activity {
    /// Counters for a connection opened now.
    pub fn new() -> Self {
        Activity {
            opened: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(NO_HEAD),
            http2: AtomicBool::new(false),
            read_any: AtomicBool::new(false),
            last_write_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            handling: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
            pinned: AtomicBool::new(false),
            releasing: AtomicBool::new(false),
            idle_notice: AtomicBool::new(false),
            went_idle: Notify::new(),
            detached: AtomicBool::new(false),
        }
    }

    /// Stops the accounting of reads and writes: nothing watches the connection any more.
    pub fn detach(&self) {
        self.detached.store(true, Ordering::Relaxed);
    }

    fn is_detached(&self) -> bool {
        self.detached.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Time since the connection was opened.
    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// Time since the last request finished (or the connection opened), whatever bytes
    /// moved since.
    pub fn idle_for(&self) -> Duration {
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        self.opened.elapsed().saturating_sub(since)
    }

    /// How long the current HTTP/1 request head has been arriving, if one is.
    pub fn head_arriving_for(&self) -> Option<Duration> {
        if self.http2.load(Ordering::Relaxed) {
            return None;
        }
        let since = self.head_since_ms.load(Ordering::Acquire);
        (since != NO_HEAD).then(|| {
            self.opened
                .elapsed()
                .saturating_sub(Duration::from_millis(since))
        })
    }

    /// Requests not yet answered in full.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Whether a response body is being sent and no byte was written for `limit`: a
    /// client that stopped reading holds its connection only that long.
    pub fn sending_stalled(&self, limit: Duration) -> bool {
        let sending = self.in_flight() > self.handling.load(Ordering::Acquire);
        let last = Duration::from_millis(self.last_write_ms.load(Ordering::Relaxed));
        sending && self.opened.elapsed().saturating_sub(last) >= limit
    }

    /// Whether the HTTP/1 session may end here and the connection go on without it:
    /// it answered requests, all of them without a body, over HTTP/1.1 and without an
    /// ask to close; none is in flight and no next head is arriving; every byte it wrote
    /// has left; and it has been idle for `after`.
    pub fn may_release(&self, after: Duration) -> bool {
        self.requests_started() > 0
            && !self.pinned()
            && self.in_flight() == 0
            && self.head_since_ms.load(Ordering::Acquire) == NO_HEAD
            && !self.write_blocked.load(Ordering::Relaxed)
            && self.idle_for() >= after
    }

    /// Marks the connection as one whose HTTP/1 session is never released (see
    /// [`Activity::may_release`]).
    pub fn pin_session(&self) {
        self.pinned.store(true, Ordering::Relaxed);
    }

    /// Whether the session is never released.
    pub fn pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }

    /// Whether the end of the last request in flight wakes [`Activity::went_idle`].
    /// Off while a release timer is armed, so a busy connection pays for one notice per
    /// timer, not one per request.
    pub fn notice_idle(&self, on: bool) {
        self.idle_notice.store(on, Ordering::Relaxed);
    }

    /// Resolves when the last request in flight has ended (see
    /// [`Activity::notice_idle`]).
    pub fn went_idle(&self) -> tokio::sync::futures::Notified<'_> {
        self.went_idle.notified()
    }

    /// When the connection has been idle for `after`, if no request comes before.
    pub fn idle_until(&self, after: Duration) -> Instant {
        self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire)) + after
    }

    /// While `releasing`, shutting the stream down leaves it open: the session ends, the
    /// connection does not.
    pub fn set_releasing(&self, releasing: bool) {
        self.releasing.store(releasing, Ordering::Release);
    }

    /// Requests whose head was received so far.
    pub fn requests_started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    /// Marks a request as started: it is in flight until the first guard drops (with its
    /// response body) and being handled until the second drops (when the handler returns).
    pub fn begin_request(self: &Arc<Self>) -> (RequestGuard, HandlingGuard) {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.handling.fetch_add(1, Ordering::AcqRel);
        self.head_since_ms.store(NO_HEAD, Ordering::Release);
        self.wrote();
        (RequestGuard(self.clone()), HandlingGuard(self.clone()))
    }

    fn wrote(&self) {
        self.last_write_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn write_result(&self, result: &Poll<io::Result<usize>>) {
        if self.is_detached() {
            return;
        }
        self.write_blocked
            .store(result.is_pending(), Ordering::Relaxed);
        if matches!(result, Poll::Ready(Ok(n)) if *n > 0) {
            self.wrote();
        }
    }

    /// Bytes were read: the first ones tell the protocol, and on an idle connection they
    /// start the next request head.
    fn read(&self, bytes: &[u8]) {
        if self.is_detached() {
            return;
        }
        if !self.read_any.swap(true, Ordering::Relaxed) && bytes.starts_with(b"PRI * HTTP/2") {
            self.http2.store(true, Ordering::Relaxed);
        }
        if self.in_flight() == 0 && self.head_since_ms.load(Ordering::Acquire) == NO_HEAD {
            self.head_since_ms.store(self.now_ms(), Ordering::Release);
        }
    }
}

/// Ends a request's handling when dropped.
pub struct HandlingGuard(Arc<Activity>);

impl Drop for HandlingGuard {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::AcqRel);
        self.0.wrote();
    }
}

/// Ends an in-flight request when dropped: when its response body is done, or when the
/// handler or the body is dropped unfinished.
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity
                .idle_since_ms
                .store(activity.now_ms(), Ordering::Release);
            if activity.idle_notice.load(Ordering::Relaxed) && !activity.pinned() {
                activity.went_idle.notify_one();
            }
        }
    }
}

/// An I/O stream that reports what it reads to the connection's activity.
pub struct Tracked<IO> {
    inner: IO,
    activity: Arc<Activity>,
    /// Bytes read from `inner` already (and reported) that are to be read again first:
    /// what was read to tell the protocol, what an ended HTTP/1 session had read ahead.
    unread: Bytes,
}

impl<IO> Tracked<IO> {
    /// Wraps `inner`.
    pub fn new(inner: IO, activity: Arc<Activity>) -> Self {
        Tracked {
            inner,
            activity,
            unread: Bytes::new(),
        }
    }

    /// The stream itself.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.inner
    }

    /// Puts `bytes`, read from this stream before what is still unread, back in front:
    /// they are read again first, and not reported again.
    pub fn unread(&mut self, bytes: Bytes) {
        self.unread = join(bytes, std::mem::take(&mut self.unread));
    }

    /// Whether bytes put back wait to be read.
    pub fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }
}

/// `first` then `second`, copied only when both have bytes. Empty, it holds no
/// allocation: an empty `Bytes` from a session can still own that session's whole read
/// buffer, which an idle connection must not keep.
fn join(first: Bytes, second: Bytes) -> Bytes {
    match (first.is_empty(), second.is_empty()) {
        (true, true) => Bytes::new(),
        (false, true) => first,
        (true, false) => second,
        (false, false) => {
            let mut both = BytesMut::with_capacity(first.len() + second.len());
            both.extend_from_slice(&first);
            both.extend_from_slice(&second);
            both.freeze()
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            self.unread.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read(&buf.filled()[before..]);
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_result(&result);
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_result(&result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.activity
            .write_blocked
            .store(result.is_pending(), Ordering::Relaxed);
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.releasing.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that keeps its request in flight until the body has been sent.
pub struct Guarded<B> {
    inner: B,
    guard: Option<RequestGuard>,
}

impl<B> Guarded<B> {
    /// `inner`, holding `guard` until its last frame.
    pub fn new(inner: B, guard: RequestGuard) -> Self {
        Guarded {
            inner,
            guard: Some(guard),
        }
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[test]
    fn joined_bytes_keep_their_order() {
        let a = Bytes::from_static(b"GET / HT");
        let b = Bytes::from_static(b"TP/1.1\r\n");
        assert_eq!(&join(a.clone(), b.clone())[..], b"GET / HTTP/1.1\r\n");
        assert_eq!(join(a.clone(), Bytes::new()), a);
        assert_eq!(join(Bytes::new(), b.clone()), b);
    }

    #[tokio::test]
    async fn bytes_put_back_are_read_first_and_not_reported_again() {
        let activity = Arc::new(Activity::new());
        let mut stream = Tracked::new(&b"GET /"[..], activity.clone());
        stream.unread(Bytes::from_static(b"SM\r\n\r\n"));
        stream.unread(Bytes::from_static(b"PRI * HTTP/2.0\r\n\r\n"));
        assert!(stream.has_unread());
        let mut all = Vec::new();
        stream.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET /");
        assert!(!stream.has_unread());
        // Only `GET /` was read from the stream itself: reported, the preface put back
        // would have marked the connection HTTP/2, which has no HTTP/1 head arriving.
        assert!(activity.head_arriving_for().is_some());
    }
}
