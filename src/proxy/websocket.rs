//! The WebSocket front door (contract §7): the upstream handshake first, then the 101 to
//! the client, then a frame relay both ways that ends with the credential — `exp`, the
//! service token's expiry or revocation — with close 1008 to the client.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

mod frames;
mod pump;

use frames::Stop;
use pump::{Direction, Event};

use crate::auth::identity::{AuthMethod, Identity};
use crate::body::{self, Body};
use crate::conn::{Lifecycle, Quiet};
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::store::{hash_secret, StoreChange, TokenStore};
use crate::time::Timestamp;

/// The subprotocol a browser offers, beside `bearer.<token>`, to pass its token.
pub const ORCHEO_AUTH: &str = "orcheo-auth";

/// Whether `request` asks for a WebSocket upgrade.
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    let has_token = |name: http::header::HeaderName, token: &str| {
        request.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    request.method() == Method::GET
        && has_token(UPGRADE, "websocket")
        && has_token(CONNECTION, "upgrade")
}

/// The client's offered subprotocols, without the credential entries.
struct Offer {
    forwarded: Vec<String>,
    orcheo_auth: bool,
}

fn subprotocols(request: &Request<Incoming>) -> Offer {
    let mut offer = Offer {
        forwarded: Vec::new(),
        orcheo_auth: false,
    };
    for entry in request
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        if entry == ORCHEO_AUTH {
            offer.orcheo_auth = true;
        } else if !entry.starts_with("bearer.") {
            offer.forwarded.push(entry.to_string());
        }
    }
    offer
}

/// What the relay watches of the connection's credential, to end the connection with it.
pub struct WatchedCredential {
    /// The caller.
    pub identity: Arc<Identity>,
    /// The service token's hash, to re-check it when the store changes.
    pub service_token_hash: Option<String>,
}

impl WatchedCredential {
    /// The credential of an authenticated identity (and its token, if any).
    pub fn new(identity: Arc<Identity>, token: Option<&str>) -> Self {
        let service_token_hash = (identity.method == AuthMethod::ServiceToken)
            .then(|| token.map(hash_secret))
            .flatten();
        WatchedCredential {
            identity,
            service_token_hash,
        }
    }
}

/// Settings and shared parts the relay uses.
#[derive(Clone)]
pub struct RelaySettings {
    /// Largest message, both ways.
    pub max_message: usize,
    /// Longest time without a frame either way.
    pub idle_timeout: Duration,
    /// Metrics.
    pub metrics: Metrics,
    /// The token store, for revocation and expiry changes.
    pub store: Arc<dyn TokenStore>,
    /// Shutdown signal, drain guard and the connection's places under the limits.
    pub lifecycle: Lifecycle,
    /// The relay's place under `limits.max_websockets`, held until it ends.
    pub websocket_slot: Arc<OwnedSemaphorePermit>,
}

/// The most of an upstream's refusal body passed on to the client.
const MAX_REFUSAL_BODY: usize = 64 * 1024;

/// Opens the upstream WebSocket, then answers the client 101 and starts the relay. The
/// upstream's own refusal (any non-101) is passed back to the client as it came.
/// `target` is the upstream's request target (origin form); the request is already
/// rewritten for the upstream, `Host` included.
pub async fn proxy<S>(
    mut request: Request<Incoming>,
    target: Uri,
    stream: S,
    timeout: Duration,
    credential: WatchedCredential,
    settings: RelaySettings,
) -> Result<Response<Body>, GatewayError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client_key = request
        .headers()
        .get(SEC_WEBSOCKET_KEY)
        .cloned()
        .ok_or_else(|| GatewayError::InvalidRequest("Missing Sec-WebSocket-Key".into()))?;
    let offer = subprotocols(&request);
    let on_upgrade = hyper::upgrade::on(&mut request);
    let key = generate_key();
    let handshake = upstream_request(&request, target, &offer, &key)?;
    let opened = tokio::time::timeout(timeout, open_upstream(handshake, stream, &key, &offer));
    let (upstream, answer) = match opened.await {
        Err(_) => return Err(GatewayError::UpstreamTimeout(timeout)),
        Ok(Opened::Refused(refusal)) => return Ok(refusal),
        Ok(Opened::Upgraded(upstream, answer)) => (upstream, answer),
        Ok(Opened::Failed(error)) => {
            return Err(GatewayError::UpstreamUnavailable(format!(
                "WebSocket handshake: {error}"
            )))
        }
    };
    let selected = if offer.orcheo_auth {
        Some(HeaderValue::from_static(ORCHEO_AUTH))
    } else {
        answer
    };
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    let accept = derive_accept_key(client_key.as_bytes());
    headers.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept)
            .map_err(|_| GatewayError::InvalidRequest("Bad Sec-WebSocket-Key".into()))?,
    );
    if let Some(protocol) = selected {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(client) => relay(client, upstream, credential, settings).await,
            Err(error) => tracing::debug!(%error, "the client never completed the upgrade"),
        }
    });
    Ok(response)
}

/// How the upstream answered the WebSocket handshake.
enum Opened {
    /// 101: the upgraded connection and the subprotocol it chose.
    Upgraded(Upgraded, Option<HeaderValue>),
    /// Anything else, as the response for the client.
    Refused(Response<Body>),
    /// No valid answer.
    Failed(String),
}

/// Sends the handshake on `stream` and reads the answer. The HTTP/1 connection is driven
/// here, not in a task of its own, so a timeout drops all of it.
async fn open_upstream<S>(
    handshake: Request<Empty<Bytes>>,
    stream: S,
    key: &str,
    offer: &Offer,
) -> Opened
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = match hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
    {
        Ok(pair) => pair,
        Err(error) => return Opened::Failed(error.to_string()),
    };
    let mut connection = connection.with_upgrades();
    // The connection future ends as soon as the upstream's 101 is read, possibly in the
    // same poll that hands over the response: whether it ended is remembered, so it is
    // not polled again.
    let mut ended = false;
    let send = sender.send_request(handshake);
    tokio::pin!(send);
    let sent = tokio::select! {
        biased;
        response = &mut send => response,
        end = &mut connection => {
            if let Err(error) = end {
                return Opened::Failed(error.to_string());
            }
            ended = true;
            send.await
        }
    };
    let response = match sent {
        Ok(response) => response,
        Err(error) => return Opened::Failed(error.to_string()),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, incoming) = response.into_parts();
        let collect = Limited::new(incoming, MAX_REFUSAL_BODY).collect();
        tokio::pin!(collect);
        let content = if ended {
            collect.await
        } else {
            tokio::select! {
                biased;
                content = &mut collect => content,
                _ = &mut connection => collect.await,
            }
        };
        let content = content.map(|c| c.to_bytes()).unwrap_or_default();
        return Opened::Refused(relay_refusal(parts, content));
    }
    if let Err(error) = check_answer(response.headers(), key, offer) {
        return Opened::Failed(error);
    }
    let answer = response.headers().get(SEC_WEBSOCKET_PROTOCOL).cloned();
    let upgrade = hyper::upgrade::on(response);
    if !ended {
        if let Err(error) = connection.await {
            return Opened::Failed(error.to_string());
        }
    }
    match upgrade.await {
        Ok(upgraded) => Opened::Upgraded(upgraded, answer),
        Err(error) => Opened::Failed(error.to_string()),
    }
}

/// Checks an upstream's 101: the accept key answers the key sent, no extension was taken
/// (none is offered), and a chosen subprotocol is one the client offered.
fn check_answer(headers: &http::HeaderMap, key: &str, offer: &Offer) -> Result<(), String> {
    let upgrade = headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return Err("the 101 does not upgrade to websocket".into());
    }
    let expected = derive_accept_key(key.as_bytes());
    if headers.get(SEC_WEBSOCKET_ACCEPT).map(HeaderValue::as_bytes) != Some(expected.as_bytes()) {
        return Err("wrong Sec-WebSocket-Accept".into());
    }
    if headers.contains_key(SEC_WEBSOCKET_EXTENSIONS) {
        return Err("an extension was chosen that was not offered".into());
    }
    if let Some(chosen) = headers.get(SEC_WEBSOCKET_PROTOCOL) {
        let chosen = chosen.to_str().unwrap_or_default();
        if !offer.forwarded.iter().any(|p| p == chosen) {
            return Err("a subprotocol was chosen that was not offered".into());
        }
    }
    Ok(())
}

/// The handshake request for the upstream: the rewritten request's headers, filtered
/// subprotocols, and fresh WebSocket headers.
fn upstream_request(
    request: &Request<Incoming>,
    target: Uri,
    offer: &Offer,
    key: &str,
) -> Result<Request<Empty<Bytes>>, GatewayError> {
    let mut headers = request.headers().clone();
    for name in [
        SEC_WEBSOCKET_KEY,
        SEC_WEBSOCKET_EXTENSIONS,
        SEC_WEBSOCKET_VERSION,
        SEC_WEBSOCKET_PROTOCOL,
    ] {
        headers.remove(name);
    }
    if !offer.forwarded.is_empty() {
        let list = HeaderValue::from_str(&offer.forwarded.join(", "))
            .map_err(|_| GatewayError::InvalidRequest("Bad Sec-WebSocket-Protocol".into()))?;
        headers.insert(SEC_WEBSOCKET_PROTOCOL, list);
    }
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    let key = HeaderValue::from_str(key).map_err(|_| GatewayError::InvalidRequest("key".into()))?;
    headers.insert(SEC_WEBSOCKET_KEY, key);
    let mut handshake = Request::new(Empty::new());
    *handshake.uri_mut() = target;
    *handshake.headers_mut() = headers;
    Ok(handshake)
}

fn relay_refusal(parts: http::response::Parts, content: Bytes) -> Response<Body> {
    let mut response = Response::new(body::full(content));
    *response.status_mut() = parts.status;
    if let Some(kind) = parts.headers.get(http::header::CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, kind.clone());
    }
    response
}

/// Why a relayed connection ended (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Client,
    Upstream,
    TokenExpired,
    TokenRevoked,
    Idle,
    Shutdown,
    TooBig,
    /// The client broke the protocol.
    Invalid,
    Error,
}

impl Ending {
    fn as_str(self) -> &'static str {
        match self {
            Ending::Client => "client",
            Ending::Upstream => "upstream",
            Ending::TokenExpired => "token_expired",
            Ending::TokenRevoked => "token_revoked",
            Ending::Idle => "idle",
            Ending::Shutdown => "shutdown",
            Ending::TooBig => "message_too_big",
            Ending::Invalid | Ending::Error => "error",
        }
    }

    /// The close frame the gateway itself sends when it ends the connection.
    fn close_frame(self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            Ending::TokenExpired => (CloseCode::Policy, "token expired"),
            Ending::TokenRevoked => (CloseCode::Policy, "token revoked"),
            Ending::Idle => (CloseCode::Away, "idle timeout"),
            Ending::Shutdown => (CloseCode::Away, "gateway shutting down"),
            Ending::TooBig => (CloseCode::Size, "message too big"),
            Ending::Invalid => (CloseCode::Protocol, "protocol error"),
            Ending::Error => (CloseCode::Error, "relay error"),
            Ending::Client | Ending::Upstream => return None,
        };
        Some(CloseFrame {
            code,
            reason: reason.into(),
        })
    }
}

/// When the credential stops being valid, as a deadline on the runtime clock.
fn deadline(expires_at: Option<i64>) -> Option<Instant> {
    let expires_at = expires_at?;
    let left = expires_at - Timestamp::now().0;
    Some(Instant::now() + Duration::from_secs(left.max(0) as u64))
}

/// Re-checks a service token after a store change: `Some(ending)` if it no longer holds,
/// else its (possibly new) expiry.
async fn recheck(store: &dyn TokenStore, hash: &str) -> Result<Option<i64>, Ending> {
    match store.lookup(hash).await {
        Ok(Some(record)) => still_valid(record.revoked_at, record.expires_at),
        // Deleted from the store: as good as revoked.
        Ok(None) => Err(Ending::TokenRevoked),
        // The store is down: the connection keeps its last known state.
        Err(_) => Ok(None),
    }
}

/// Whether a service token with this revocation and expiry still holds: `Ok` with its
/// expiry, or the ending it calls for.
fn still_valid(
    revoked_at: Option<Timestamp>,
    expires_at: Option<Timestamp>,
) -> Result<Option<i64>, Ending> {
    if revoked_at.is_some() {
        return Err(Ending::TokenRevoked);
    }
    if expires_at.is_some_and(|at| at <= Timestamp::now()) {
        return Err(Ending::TokenExpired);
    }
    Ok(expires_at.map(|t| t.0))
}

/// Which side a relay event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

/// What woke the relay's loop.
enum Step {
    /// A direction stopped.
    Pumped((Side, Event)),
    /// The credential's expiry came.
    Expired,
    /// The gateway shuts down.
    Shutdown,
    /// The idle timer fired (the connection may have been active since it was set).
    IdleCheck,
    /// The token store changed.
    Changed(Result<StoreChange, broadcast::error::RecvError>),
}

/// The two sockets of a relayed connection and the two directions between them.
struct Sockets {
    client: TokioIo<Upgraded>,
    upstream: TokioIo<Upgraded>,
    /// Client to upstream: the client's frames, masked.
    up: Direction,
    /// Upstream to client: the upstream's frames, unmasked.
    down: Direction,
    /// When either side last sent anything.
    activity: Instant,
}

impl Sockets {
    /// Pumps both directions until one of them stops.
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<(Side, Event)> {
        for side in [Side::Client, Side::Upstream] {
            if let Poll::Ready(event) = self.poll_from(cx, side) {
                return Poll::Ready((side, event));
            }
        }
        Poll::Pending
    }

    /// Pumps what `side` sends to the other side, until it stops.
    fn poll_from(&mut self, cx: &mut Context<'_>, side: Side) -> Poll<Event> {
        let Sockets {
            client,
            upstream,
            up,
            down,
            activity,
        } = self;
        match side {
            Side::Client => up.poll_pump(cx, client, upstream, activity),
            Side::Upstream => down.poll_pump(cx, upstream, client, activity),
        }
    }

    /// Ends a connection the gateway itself closes: what is already on its way to each
    /// side is written, then each side that is still there gets its close frame (unless
    /// a frame is half written towards it) and the end of the connection.
    async fn close(&mut self, to_client: Option<&[u8]>, to_upstream: Option<&[u8]>) {
        let grace = Duration::from_secs(2);
        let Sockets {
            client,
            upstream,
            up,
            down,
            ..
        } = self;
        let _ = tokio::time::timeout(grace, finish(client, down, to_client)).await;
        let _ = tokio::time::timeout(grace, finish(upstream, up, to_upstream)).await;
    }
}

/// Writes out what `direction` still holds for `to`, then `close` if the stream towards
/// `to` is between frames, then shuts `to`'s sending side.
async fn finish(to: &mut TokioIo<Upgraded>, direction: &mut Direction, close: Option<&[u8]>) {
    if std::future::poll_fn(|cx| direction.poll_drain(cx, to))
        .await
        .is_err()
    {
        return;
    }
    if let Some(close) = close.filter(|_| direction.frames.between_frames()) {
        if to.write_all(close).await.is_err() || to.flush().await.is_err() {
            return;
        }
    }
    let _ = to.shutdown().await;
}

/// A close frame as the gateway sends it: masked towards the upstream (the gateway is its
/// client), plain towards the client.
fn close_bytes(frame: Option<CloseFrame>, towards_upstream: bool) -> Vec<u8> {
    let mut frame = Frame::close(frame);
    if towards_upstream {
        let mut mask = [0u8; 4];
        // A mask only needs to be unpredictable to the peer's peers; a failed draw still
        // gives a valid (if predictable) frame.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut mask);
        frame.header_mut().mask = Some(mask);
    }
    let mut out = Vec::with_capacity(frame.len());
    // Writing into a Vec cannot fail.
    let _ = frame.format(&mut out);
    out
}

/// Relays both ways until either side closes, the credential ends, the connection idles
/// out, or the gateway shuts down.
async fn relay(
    client: Upgraded,
    upstream: Upgraded,
    credential: WatchedCredential,
    settings: RelaySettings,
) {
    let metrics = settings.metrics.clone();
    metrics.websocket_connections.inc();
    let started = Instant::now();
    let max_message = u64::try_from(settings.max_message).unwrap_or(u64::MAX);
    let messages = |direction: &str| metrics.websocket_messages.with_label_values(&[direction]);
    let mut sockets = Sockets {
        client: TokioIo::new(client),
        upstream: TokioIo::new(upstream),
        up: Direction::new(true, max_message, messages("client_to_upstream")),
        down: Direction::new(false, max_message, messages("upstream_to_client")),
        activity: Instant::now(),
    };
    let mut shutdown = settings.lifecycle.shutdown.clone();
    let _drain = settings.lifecycle.drain.clone();
    let mut changes = settings.store.subscribe();
    let mut expiry = deadline(credential.identity.expires_at);
    let idle_timeout = settings.idle_timeout;
    let idle = tokio::time::sleep_until(sockets.activity + idle_timeout);
    tokio::pin!(idle);
    let mut close_code = None;
    // The timers and notifications are polled only when one of them woke the relay, not
    // at every wake for the sockets (a message each way is several).
    let quiet = Quiet::new();
    let watching = credential.service_token_hash.is_some();
    let (ending, passed) = loop {
        let step = {
            let expires = async {
                match expiry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let stop = crate::conn::stopped(&mut shutdown);
            let changed = async {
                match watching {
                    true => changes.recv().await,
                    false => std::future::pending().await,
                }
            };
            tokio::pin!(expires, stop, changed);
            // New futures: polled once, so that they register.
            quiet.wake_again();
            std::future::poll_fn(|cx| {
                if let Poll::Ready(pumped) = sockets.poll_pump(cx) {
                    return Poll::Ready(Step::Pumped(pumped));
                }
                let Some(mut cx) = quiet.woken(cx) else {
                    return Poll::Pending;
                };
                let step = if expires.as_mut().poll(&mut cx).is_ready() {
                    Step::Expired
                } else if stop.as_mut().poll(&mut cx).is_ready() {
                    Step::Shutdown
                } else if idle.as_mut().poll(&mut cx).is_ready() {
                    Step::IdleCheck
                } else if let Poll::Ready(change) = changed.as_mut().poll(&mut cx) {
                    Step::Changed(change)
                } else {
                    return Poll::Pending;
                };
                // Another of them may be ready too: look at them all again next time.
                quiet.wake_again();
                Poll::Ready(step)
            })
            .await
        };
        match step {
            Step::Pumped((from, event)) => {
                break match (from, event) {
                    (from, Event::Frames(Stop::Close(code))) => {
                        close_code = code;
                        let ending = match from {
                            Side::Client => Ending::Client,
                            Side::Upstream => Ending::Upstream,
                        };
                        (ending, Some(from))
                    }
                    (Side::Client, Event::Ended) => (Ending::Client, None),
                    (Side::Upstream, Event::Ended) => (Ending::Upstream, None),
                    (_, Event::Frames(Stop::TooBig)) => (Ending::TooBig, None),
                    (Side::Client, Event::Frames(Stop::Invalid)) => (Ending::Invalid, None),
                    (Side::Upstream, Event::Frames(Stop::Invalid)) | (_, Event::Failed) => {
                        (Ending::Error, None)
                    }
                };
            }
            Step::Expired => break (Ending::TokenExpired, None),
            Step::Shutdown => break (Ending::Shutdown, None),
            Step::IdleCheck => {
                let quiet_until = sockets.activity + idle_timeout;
                if quiet_until <= Instant::now() {
                    break (Ending::Idle, None);
                }
                idle.as_mut().reset(quiet_until);
            }
            Step::Changed(changed) => {
                let hash = credential.service_token_hash.as_deref().unwrap_or_default();
                let verdict = match changed {
                    // This token changed: its new state is in the notification.
                    Ok(StoreChange::Token(change)) if change.secret_hash == hash => {
                        still_valid(change.revoked_at, change.expires_at)
                    }
                    Ok(StoreChange::Token(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => {
                        changes = settings.store.subscribe();
                        recheck(settings.store.as_ref(), hash).await
                    }
                    // Unknown or missed changes: ask the store.
                    Ok(StoreChange::Unknown) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        recheck(settings.store.as_ref(), hash).await
                    }
                };
                match verdict {
                    Err(ending) => break (ending, None),
                    Ok(Some(at)) => expiry = deadline(Some(at)),
                    Ok(None) => {}
                }
            }
        }
    };
    match passed {
        // A side's close frame went to the other side: the other side's answer goes back
        // (or its end, or the grace runs out), then both connections end.
        Some(from) => {
            let answer = std::future::poll_fn(|cx| sockets.poll_from(cx, from.other()));
            let _ = tokio::time::timeout(Duration::from_secs(2), answer).await;
            sockets.close(None, None).await;
        }
        None => {
            let frame = ending.close_frame();
            close_code = frame.as_ref().map(|f| u16::from(f.code));
            // The upstream hears why only when the credential ended.
            let for_upstream = frame.as_ref().map(|frame| {
                if matches!(ending, Ending::TokenExpired | Ending::TokenRevoked) {
                    frame.clone()
                } else {
                    CloseFrame {
                        code: CloseCode::Away,
                        reason: "client connection ended".into(),
                    }
                }
            });
            // A side that ended without a close frame gets none; the other gets a bare one.
            let to_client = (ending != Ending::Client).then(|| close_bytes(frame, false));
            let to_upstream = (ending != Ending::Upstream).then(|| close_bytes(for_upstream, true));
            sockets
                .close(to_client.as_deref(), to_upstream.as_deref())
                .await;
        }
    }
    metrics.websocket_connections.dec();
    metrics
        .websocket_closed
        .with_label_values(&[ending.as_str()])
        .inc();
    tracing::info!(
        target: "access",
        subject = %credential.identity.subject,
        token_id = %credential.identity.token_id,
        duration_ms = started.elapsed().as_millis() as u64,
        messages_from_client = sockets.up.messages,
        messages_from_upstream = sockets.down.messages,
        close_code = close_code.unwrap_or(0),
        closed_by = ending.as_str(),
        "websocket closed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::headers;

    #[test]
    fn an_upstream_101_is_checked_against_the_handshake_sent() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let accept = derive_accept_key(key.as_bytes());
        let offer = Offer {
            forwarded: vec!["chat".into()],
            orcheo_auth: false,
        };
        let good = [
            ("upgrade", "WebSocket"),
            ("sec-websocket-accept", accept.as_str()),
        ];
        assert_eq!(check_answer(&headers(&good), key, &offer), Ok(()));
        let chosen = [
            ("upgrade", "websocket"),
            ("sec-websocket-accept", accept.as_str()),
            ("sec-websocket-protocol", "chat"),
        ];
        assert_eq!(check_answer(&headers(&chosen), key, &offer), Ok(()));
        let bad: [(&str, Vec<(&str, &str)>); 4] = [
            (
                "no upgrade",
                vec![("sec-websocket-accept", accept.as_str())],
            ),
            (
                "wrong accept",
                vec![
                    ("upgrade", "websocket"),
                    ("sec-websocket-accept", "d3Jvbmc="),
                ],
            ),
            (
                "an extension",
                vec![
                    ("upgrade", "websocket"),
                    ("sec-websocket-accept", accept.as_str()),
                    ("sec-websocket-extensions", "permessage-deflate"),
                ],
            ),
            (
                "a subprotocol not offered",
                vec![
                    ("upgrade", "websocket"),
                    ("sec-websocket-accept", accept.as_str()),
                    ("sec-websocket-protocol", "other"),
                ],
            ),
        ];
        for (what, answer) in bad {
            assert!(
                check_answer(&headers(&answer), key, &offer).is_err(),
                "{what}"
            );
        }
    }
}
