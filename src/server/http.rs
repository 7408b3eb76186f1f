//! HTTP on one accepted connection: HTTP/2 when the client opens with the HTTP/2
//! preface, HTTP/1.1 otherwise, with the idle, slow-client and request-head cut-offs and
//! a graceful end at shutdown.
//!
//! An HTTP/1.1 connection is served in sessions. A session that has been idle for
//! [`RELEASE_AFTER`] (nothing in flight, nothing arriving, everything written) ends
//! without closing the connection; a timer armed when the last request in flight ends
//! tells when. hyper's read and write buffers and its connection state are freed, and
//! the connection waits for its next request holding only its socket. Its next bytes
//! start a new session on the same connection. A client sees nothing of this. A session that carried a request with a body, an ask to close, or
//! an HTTP/1.0 request is never released: only hyper knows whether such a connection may
//! go on, so it keeps it to the end.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::CONNECTION;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::activity::{Activity, Guarded, Tracked};
use super::{Handler, ServerContext};
use crate::config::Limits;
use crate::conn::{stopped, ConnInfo, Quiet};

/// How long an HTTP/1.1 session stays idle before it is released (see the module
/// documentation). A client whose next request follows within it keeps its session; one
/// that pauses longer pays for a new one (a few microseconds), and in return an idle
/// connection costs little more than its socket, as with nginx, which frees its buffers
/// as soon as a keep-alive connection goes idle.
pub const RELEASE_AFTER: Duration = Duration::from_millis(10);

/// What a client sends first to speak HTTP/2 without negotiating it.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/1.1 and HTTP/2 settings, built once per listener.
pub struct Http {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

impl Http {
    /// The settings for `limits`.
    pub fn new(limits: &Limits) -> Self {
        let max_head = limits.max_header_bytes.0 as usize;
        let mut h1 = http1::Builder::new();
        // hyper's own limit sits well above ours: requests between the two get the
        // gateway's JSON 431; only grossly oversized heads meet hyper's bare 431.
        // No hyper header timeout (hyper's default is 30 s once a timer is set): hyper
        // runs it while a kept-alive connection waits for its next request, which would
        // cut idle connections long before `idle_timeout`. The watchdog bounds request
        // heads instead, from their first byte.
        // Heads and bodies are copied into one buffer and written with one call, rather
        // than queued as a list of buffers for a vectored write: for the small responses
        // most requests get this is less work (callgrind: -1.4 % per proxied request,
        // with the same on the upstream side); a large body is written in chunks anyway.
        h1.timer(TokioTimer::new())
            .writev(false)
            .header_read_timeout(None)
            .max_buf_size((max_head * 2 + 4096).max(8192))
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(max_head * 2).unwrap_or(u32::MAX))
            // Bounds the work one connection can queue; the usual default of peers.
            .max_concurrent_streams(256);
        Http { h1, h2 }
    }
}

/// A client stream the gateway can wait on without reading from it.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready when a read would make progress (bytes, end of stream or an error).
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Transport for TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, tls) = self.get_mut();
        // Decrypted bytes, or records that fail, may already wait inside TLS.
        match tls.process_new_packets() {
            Ok(state) if state.plaintext_bytes_to_read() == 0 && !state.peer_has_closed() => {
                tcp.poll_read_ready(cx)
            }
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// Serves `io` until the client leaves, the connection is cut, or the gateway stops.
pub async fn serve<IO: Transport, H: Handler>(
    io: IO,
    info: ConnInfo,
    http: &Http,
    ctx: ServerContext,
    handler: Arc<H>,
) {
    let activity = Arc::new(Activity::new());
    let mut io = Tracked::new(io, activity.clone());
    let first_head = ctx.limits.header_read_timeout.get();
    let (http2, prefix) = match tokio::time::timeout(first_head, sniff(&mut io)).await {
        Ok(Ok((_, prefix))) if prefix.is_empty() => return,
        Ok(Ok(sniffed)) => sniffed,
        Ok(Err(error)) => {
            tracing::debug!(%error, "connection ended with an error");
            return;
        }
        Err(_) => {
            tracing::debug!("closing connection: no request head within the header timeout");
            return;
        }
    };
    let info = Arc::new(info);
    let tracker = activity.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        if !keeps_connection_plain(&request) {
            tracker.pin_session();
        }
        let (in_flight, handling) = tracker.begin_request();
        let handler = handler.clone();
        let info = info.clone();
        async move {
            // Boxed per request: hyper keeps room for one service future per connection
            // for the connection's whole life, idle or not; the pipeline's is kilobytes.
            let response = Box::pin(handler.handle(&info, request)).await;
            drop(handling);
            Ok::<_, Infallible>(response.map(|body| Guarded::new(body, in_flight)))
        }
    });
    io.unread(prefix);
    if http2 {
        let mut connection = Box::pin(http.h2.serve_connection(TokioIo::new(io), service));
        Box::pin(watch(connection.as_mut(), &activity, &ctx, false)).await;
        return;
    }
    let mut service = service;
    loop {
        let mut session = Box::pin(
            http.h1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
        );
        // The watch is boxed too: an idle connection holds neither it nor the session.
        let watched = Box::pin(watch(session.as_mut(), &activity, &ctx, true)).await;
        if watched != Outcome::Released {
            // An upgraded stream lives on in its relay, which keeps its own time.
            activity.detach();
            return;
        }
        // Only a session that was not upgraded can be released.
        let Some(parts) = Pin::into_inner(session).into_parts() else {
            return;
        };
        activity.set_releasing(false);
        tracing::debug!("idle HTTP/1 session released; the connection waits with its socket only");
        service = parts.service;
        io = parts.io.into_inner();
        // What the session read ahead comes before what it left unread.
        io.unread(parts.read_buf);
        if !io.has_unread() && !wait_for_request(&mut io, &activity, &ctx).await {
            // Idle past `idle_timeout`, or the gateway is stopping: a clean close.
            let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
            return;
        }
    }
}

/// Whether a request leaves its connection, once answered, where a new HTTP/1.1
/// session can pick it up: HTTP/1.1, no body, no ask to close.
fn keeps_connection_plain(request: &Request<Incoming>) -> bool {
    use hyper::body::Body as _;
    request.version() == Version::HTTP_11
        && request.body().is_end_stream()
        && !asks_to_close(request.headers())
}

fn asks_to_close(headers: &HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|value| {
        value
            .as_bytes()
            .split(|&b| b == b',')
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// Reads until the first bytes tell HTTP/2's preface from anything else. The bytes
/// read are returned, to be served; none means the client left without a word.
async fn sniff<IO: AsyncRead + Unpin>(io: &mut IO) -> io::Result<(bool, Bytes)> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < buf.len() {
        let read = io.read(&mut buf[filled..]).await?;
        if read == 0 {
            break;
        }
        filled += read;
        if buf[..filled] != H2_PREFACE[..filled] {
            break;
        }
    }
    let http2 = filled == buf.len() && buf == *H2_PREFACE;
    Ok((http2, Bytes::copy_from_slice(&buf[..filled])))
}

/// Waits, holding nothing but the stream, until the client sends again. `false` when
/// the connection is to close instead: idle for `idle_timeout`, or the gateway stopping.
async fn wait_for_request<IO: Transport>(
    stream: &mut Tracked<IO>,
    activity: &Activity,
    ctx: &ServerContext,
) -> bool {
    let idle_left = ctx
        .limits
        .idle_timeout
        .get()
        .saturating_sub(activity.idle_for());
    let mut shutdown = ctx.shutdown.clone();
    let readable = std::future::poll_fn(|cx| stream.get_mut().poll_read_ready(cx));
    tokio::select! {
        ready = readable => ready.is_ok(),
        _ = stopped(&mut shutdown) => false,
        _ = tokio::time::sleep(idle_left) => false,
    }
}

/// How a watched connection or session ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Closed, or taken over by an upgrade.
    Ended,
    /// The HTTP/1 session ended on its own terms; the connection goes on.
    Released,
}

/// A served connection that can be asked to finish what it is doing and end.
trait Graceful: Future<Output = hyper::Result<()>> {
    fn end_gracefully(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn end_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Graceful for http2::Connection<I, S, TokioExecutor>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn end_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Interval of the per-connection watchdog: the resolution of the idle and first-request
/// cut-offs.
fn watchdog_period(limits: &Limits) -> Duration {
    let shortest = limits
        .header_read_timeout
        .get()
        .min(limits.idle_timeout.get());
    (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Drives `connection` to its end under the cut-offs; with `releasable`, an HTTP/1
/// session idle for [`RELEASE_AFTER`] is released.
///
/// The connection's task wakes for every request; its other futures (shutdown, the
/// idle notice, the release timer, the watchdog) are polled only after one of them
/// asked to be ([`Quiet`]), not on every wake.
async fn watch<C: Graceful>(
    mut connection: Pin<&mut C>,
    activity: &Activity,
    ctx: &ServerContext,
    releasable: bool,
) -> Outcome {
    let mut shutdown = ctx.shutdown.clone();
    let stop = stopped(&mut shutdown);
    tokio::pin!(stop);
    let mut watchdog = tokio::time::interval(watchdog_period(&ctx.limits));
    let header_timeout = ctx.limits.header_read_timeout.get();
    let idle_timeout = ctx.limits.idle_timeout.get();
    let mut closing = false;
    let mut releasing = false;
    // Armed when the session goes idle; when it fires, the session is released if it is
    // still idle (and clean), else it waits for the next idle time.
    let release = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(release);
    let mut armed = false;
    let went_idle = activity.went_idle();
    tokio::pin!(went_idle);
    activity.notice_idle(releasable);
    let quiet = Quiet::new();
    loop {
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(result));
            }
            let Some(mut cx) = quiet.woken(cx) else {
                return Poll::Pending;
            };
            let event = if !closing && stop.as_mut().poll(&mut cx).is_ready() {
                Event::Stop
            } else if releasable
                && !armed
                && !closing
                && went_idle.as_mut().poll(&mut cx).is_ready()
            {
                Event::WentIdle
            } else if armed && !closing && release.as_mut().poll(&mut cx).is_ready() {
                Event::Release
            } else if watchdog.poll_tick(&mut cx).is_ready() {
                Event::Watchdog
            } else {
                return Poll::Pending;
            };
            // Another of them may be ready too: look at them all again next time.
            quiet.wake_again();
            Poll::Ready(event)
        })
        .await;
        match event {
            Event::Ended(result) => {
                return match result {
                    Ok(()) if releasing => Outcome::Released,
                    Ok(()) => Outcome::Ended,
                    Err(error) => {
                        tracing::debug!(%error, "connection ended with an error");
                        Outcome::Ended
                    }
                };
            }
            Event::Stop => {
                connection.as_mut().end_gracefully();
                closing = true;
            }
            Event::WentIdle => {
                went_idle.set(activity.went_idle());
                release.as_mut().reset(activity.idle_until(RELEASE_AFTER));
                armed = true;
                activity.notice_idle(false);
            }
            Event::Release => {
                if activity.may_release(RELEASE_AFTER) {
                    activity.set_releasing(true);
                    connection.as_mut().end_gracefully();
                    closing = true;
                    releasing = true;
                } else if activity.pinned() {
                    armed = false;
                } else if activity.in_flight() == 0 {
                    // Idle, but a request came and went since, or the next head is
                    // arriving, or bytes wait to be written: look again later.
                    let now = tokio::time::Instant::now();
                    let due = activity.idle_until(RELEASE_AFTER);
                    release
                        .as_mut()
                        .reset(if due > now { due } else { now + RELEASE_AFTER });
                } else {
                    armed = false;
                    activity.notice_idle(true);
                }
            }
            Event::Watchdog => {
                // A client that has not completed a first request head in time is cut
                // off outright, whatever the protocol: it holds a slot and gives nothing.
                if activity.requests_started() == 0 && activity.age() >= header_timeout {
                    tracing::debug!(
                        "closing connection: no request head within the header timeout"
                    );
                    return Outcome::Ended;
                }
                if activity
                    .head_arriving_for()
                    .is_some_and(|t| t >= header_timeout)
                {
                    tracing::debug!(
                        "closing connection: request head not complete within the header timeout"
                    );
                    return Outcome::Ended;
                }
                if activity.sending_stalled(idle_timeout) {
                    tracing::debug!("closing connection: the client stopped reading its response");
                    return Outcome::Ended;
                }
                if !closing && activity.in_flight() == 0 && activity.idle_for() >= idle_timeout {
                    connection.as_mut().end_gracefully();
                    closing = true;
                }
            }
        }
    }
}

/// What the watch of a connection woke up for.
enum Event {
    Ended(hyper::Result<()>),
    Stop,
    WentIdle,
    Release,
    Watchdog,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_is_a_token_of_connection() {
        let mut headers = HeaderMap::new();
        assert!(!asks_to_close(&headers));
        headers.insert(CONNECTION, "keep-alive".parse().unwrap());
        assert!(!asks_to_close(&headers));
        headers.append(CONNECTION, "Upgrade, CLOSE ".parse().unwrap());
        assert!(asks_to_close(&headers));
        headers.insert(CONNECTION, "closed".parse().unwrap());
        assert!(!asks_to_close(&headers));
    }

    #[tokio::test]
    async fn sniffing_tells_http2_and_keeps_the_bytes() {
        let mut h2 = &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nrest"[..];
        let (http2, read) = sniff(&mut h2).await.unwrap();
        assert!(http2);
        assert_eq!(&read[..], &H2_PREFACE[..]);
        let mut h1 = &b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"[..];
        let (http2, read) = sniff(&mut h1).await.unwrap();
        assert!(!http2);
        let mut replayed = Tracked::new(h1, Arc::new(Activity::new()));
        replayed.unread(read);
        let mut all = Vec::new();
        replayed.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        let mut short = &b"PRI * HT"[..];
        assert_eq!(
            sniff(&mut short).await.unwrap(),
            (false, Bytes::from_static(b"PRI * HT"))
        );
    }
}
