//! The WebSocket front door (contract §7): the upstream handshake first, then the 101 to
//! the client, then a frame relay both ways that ends with the credential — `exp`, the
//! service token's expiry or revocation — with close 1008 to the client.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{
    HeaderValue, CONNECTION, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_EXTENSIONS,
    SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::auth::identity::{AuthMethod, Identity};
use crate::body::{self, Body};
use crate::conn::Lifecycle;
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

/// Buffer sizes of each relayed socket. The library's default of 128 KiB per read
/// buffer would cost an idle connection a quarter of a megabyte (two sockets); buffers
/// start small and grow only for the messages that need it.
const READ_BUFFER: usize = 4 * 1024;

fn ws_config(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        // Every relayed message is flushed as it is sent; nothing waits to batch.
        .write_buffer_size(0)
        // At most one whole message waits to be written: the bound on what a slow reader
        // can make the gateway hold.
        .max_write_buffer_size(max_message.saturating_add(READ_BUFFER))
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Opens the upstream WebSocket, then answers the client 101 and starts the relay. The
/// upstream's own refusal (any non-101) is passed back to the client as it came.
pub async fn proxy<S>(
    mut request: Request<Incoming>,
    upstream_uri: Uri,
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
    let handshake = upstream_request(&request, upstream_uri, &offer)?;
    let config = ws_config(settings.max_message);
    let connect = tokio_tungstenite::client_async_with_config(handshake, stream, Some(config));
    let (upstream, answer) = match tokio::time::timeout(timeout, connect).await {
        Err(_) => return Err(GatewayError::UpstreamTimeout(timeout)),
        Ok(Err(WsError::Http(refusal))) => return Ok(relay_refusal(*refusal)),
        Ok(Err(error)) => {
            return Err(GatewayError::UpstreamUnavailable(format!(
                "WebSocket handshake: {error}"
            )))
        }
        Ok(Ok(pair)) => pair,
    };
    let selected = if offer.orcheo_auth {
        Some(HeaderValue::from_static(ORCHEO_AUTH))
    } else {
        answer.headers().get(SEC_WEBSOCKET_PROTOCOL).cloned()
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
            Ok(upgraded) => {
                let client = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                relay(client, upstream, credential, settings).await;
            }
            Err(error) => tracing::debug!(%error, "the client never completed the upgrade"),
        }
    });
    Ok(response)
}

/// The handshake request for the upstream: the rewritten request's headers, filtered
/// subprotocols, and fresh WebSocket headers.
fn upstream_request(
    request: &Request<Incoming>,
    uri: Uri,
    offer: &Offer,
) -> Result<Request<()>, GatewayError> {
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
    if !headers.contains_key(HOST) {
        if let Some(authority) = uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            headers.insert(HOST, authority);
        }
    }
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
    let key = HeaderValue::from_str(&generate_key())
        .map_err(|_| GatewayError::InvalidRequest("key".into()))?;
    headers.insert(SEC_WEBSOCKET_KEY, key);
    let mut handshake = Request::new(());
    *handshake.uri_mut() = uri;
    *handshake.headers_mut() = headers;
    Ok(handshake)
}

fn relay_refusal(refusal: http::Response<Option<Vec<u8>>>) -> Response<Body> {
    let (parts, content) = refusal.into_parts();
    let mut response = Response::new(body::full(content.unwrap_or_default()));
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
            Ending::Error => "error",
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

/// Relays frames both ways until either side closes, the credential ends, the
/// connection idles out, or the gateway shuts down.
async fn relay<C, U>(
    mut client: WebSocketStream<C>,
    mut upstream: WebSocketStream<U>,
    credential: WatchedCredential,
    settings: RelaySettings,
) where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let metrics = settings.metrics.clone();
    metrics.websocket_connections.inc();
    let started = Instant::now();
    let mut shutdown = settings.lifecycle.shutdown.clone();
    let _drain = settings.lifecycle.drain.clone();
    let mut changes = settings.store.subscribe();
    let mut expiry = deadline(credential.identity.expires_at);
    let mut last_frame = Instant::now();
    let mut counts = [0u64; 2];
    let mut close_code = None;
    let idle_check = settings.idle_timeout.min(Duration::from_secs(1));
    let ending = loop {
        let expires = async {
            match expiry {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            message = client.next() => match forward(message, &mut upstream, &metrics, "client_to_upstream", &mut counts[0], &mut close_code).await {
                Some(ending) => break ending.unwrap_or(Ending::Client),
                None => last_frame = Instant::now(),
            },
            message = upstream.next() => match forward(message, &mut client, &metrics, "upstream_to_client", &mut counts[1], &mut close_code).await {
                Some(ending) => break ending.unwrap_or(Ending::Upstream),
                None => last_frame = Instant::now(),
            },
            _ = expires => break Ending::TokenExpired,
            _ = crate::conn::stopped(&mut shutdown) => break Ending::Shutdown,
            changed = changes.recv(), if credential.service_token_hash.is_some() => {
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
                    Err(ending) => break ending,
                    Ok(Some(at)) => expiry = deadline(Some(at)),
                    Ok(None) => {}
                }
            }
            _ = tokio::time::sleep(idle_check) => {
                if last_frame.elapsed() >= settings.idle_timeout {
                    break Ending::Idle;
                }
            }
        }
    };
    let (to_client, to_upstream) = if let Some(frame) = ending.close_frame() {
        close_code = Some(u16::from(frame.code));
        let to_upstream = if ending == Ending::TokenExpired || ending == Ending::TokenRevoked {
            frame.clone()
        } else {
            CloseFrame {
                code: CloseCode::Away,
                reason: "client connection ended".into(),
            }
        };
        (Some(frame), Some(to_upstream))
    } else {
        (None, None)
    };
    // Both closes are bounded: a peer that stops reading must not hold the task.
    let grace = Duration::from_secs(2);
    let _ = tokio::time::timeout(grace, client.close(to_client)).await;
    let _ = tokio::time::timeout(grace, upstream.close(to_upstream)).await;
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
        messages_from_client = counts[0],
        messages_from_upstream = counts[1],
        close_code = close_code.unwrap_or(0),
        closed_by = ending.as_str(),
        "websocket closed"
    );
}

/// Forwards one message read from one side to the other. `None`: carry on.
/// `Some(None)`: the reading side closed (normally). `Some(Some(ending))`: the gateway
/// ends the connection.
async fn forward<S>(
    message: Option<Result<Message, WsError>>,
    to: &mut WebSocketStream<S>,
    metrics: &Metrics,
    direction: &str,
    count: &mut u64,
    close_code: &mut Option<u16>,
) -> Option<Option<Ending>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match message {
        Some(Ok(Message::Close(frame))) => {
            *close_code = frame.as_ref().map(|f| u16::from(f.code));
            // The other side gets the same code and reason; then both sides wind down.
            let _ = tokio::time::timeout(Duration::from_secs(2), to.close(frame)).await;
            Some(None)
        }
        Some(Ok(Message::Frame(_))) => None,
        Some(Ok(message)) => {
            *count += 1;
            metrics
                .websocket_messages
                .with_label_values(&[direction])
                .inc();
            // Awaiting the send is the backpressure: nothing more is read from this side
            // until the other side has taken this message.
            match to.send(message).await {
                Ok(()) => None,
                Err(_) => Some(Some(Ending::Error)),
            }
        }
        Some(Err(WsError::Capacity(_))) => Some(Some(Ending::TooBig)),
        Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) | None => Some(None),
        Some(Err(_)) => Some(Some(Ending::Error)),
    }
}
