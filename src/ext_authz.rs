//! Envoy's gRPC `ext_authz` (contract §9): `envoy.service.auth.v3.Authorization/Check` on
//! `forward_auth.grpc_listen`, over h2c or, with `forward_auth.grpc_tls`, TLS with the
//! serving certificate. Each check is decided by the same code as the proxy path, from
//! the request Envoy describes; the answer is always a `CheckResponse`, never an RPC
//! error, since Envoy's `failure_mode_allow` would let an error through.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
    HeaderAppendAction, HeaderValue as PbHeaderValue, HeaderValueOption, HttpResponse, HttpStatus,
    OkHttpResponse,
};
use envoy_types::ext_authz::v3::CheckResponseExt;
use envoy_types::pb::envoy::config::core::v3::address::Address;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tonic::Code;

use crate::access_log::{AccessRecord, RouteLabel};
use crate::client_ip::{self, ClientText};
use crate::conn::{stopped, ConnInfo, Lifecycle};
use crate::decision::RequestContext;
use crate::error::GatewayError;
use crate::forward_auth::{self, admit_caller, decide_asked};
use crate::state::Shared;

/// The `protocol` label of these decisions.
const PROTOCOL: &str = "grpc";

/// Connections the listener takes at once; Envoy keeps a few long-lived HTTP/2
/// connections, so this bounds a misbehaving client, not normal traffic.
const MAX_CONNECTIONS: usize = 1024;

/// The longest a check may take before it is answered `UNAVAILABLE` by the server.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// The Authorization service.
struct Checks {
    shared: Arc<Shared>,
    tls: bool,
    lifecycle: Lifecycle,
}

/// The peer a check came from (Envoy), as the transport saw it.
#[derive(Debug, Clone, Copy)]
struct Peer(SocketAddr);

#[tonic::async_trait]
impl Authorization for Checks {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let peer = request.extensions().get::<Peer>().map(|p| p.0);
        let Some(peer) = peer else {
            return Err(tonic::Status::internal("no peer address"));
        };
        Ok(tonic::Response::new(
            self.answer(peer, request.get_ref()).await,
        ))
    }
}

/// The original request as Envoy describes it.
struct Described {
    method: Method,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    /// The downstream client, as Envoy saw it.
    source: Option<std::net::IpAddr>,
}

impl Checks {
    async fn answer(&self, peer: SocketAddr, check: &CheckRequest) -> CheckResponse {
        let started = Instant::now();
        let snapshot = self.shared.snapshot();
        let conn = ConnInfo {
            peer,
            peer_text: ClientText::of(peer.ip()),
            tls: self.tls,
            lifecycle: self.lifecycle.clone(),
        };
        let described = describe(check);
        let empty = HeaderMap::new();
        let headers = described.as_ref().map_or(&empty, |d| &d.headers);
        let mut ctx = RequestContext::new(&self.shared, &snapshot, &conn, headers);
        let trusted = client_ip::is_trusted(&snapshot.config.trusted_proxies, peer.ip());
        if let (Some(source), true) = (described.as_ref().ok().and_then(|d| d.source), trusted) {
            ctx.set_client(source);
        }
        let mut record = match &described {
            Ok(d) => AccessRecord::of(
                &d.method,
                &d.path,
                d.query.as_deref(),
                ctx.client_ip,
                &ctx.request_id,
            ),
            Err(_) => AccessRecord::of(&Method::POST, "/", None, ctx.client_ip, &ctx.request_id),
        };
        record.route = RouteLabel::Fixed("ext-authz");
        let result = match described {
            Ok(described) => decide_check(&ctx, &described, &mut record).await,
            Err(error) => Err(error),
        };
        forward_auth::count(&ctx, PROTOCOL, &result);
        let status = result
            .as_ref()
            .map_or_else(GatewayError::status, |_| StatusCode::OK);
        if let Err(error) = &result {
            record.error = Some(error.to_string());
        }
        record.finish(&self.shared.metrics, status, started);
        match result {
            Ok(headers) => allowed(&headers, &ctx),
            Err(error) => denied(&error),
        }
    }
}

/// The request of a check, or why it cannot be read (400).
fn describe(check: &CheckRequest) -> Result<Described, GatewayError> {
    let invalid = |message: &str| GatewayError::InvalidRequest(message.into());
    let attributes = check
        .attributes
        .as_ref()
        .ok_or_else(|| invalid("Check request has no attributes"))?;
    let http = attributes
        .request
        .as_ref()
        .and_then(|r| r.http.as_ref())
        .ok_or_else(|| invalid("Check request describes no HTTP request"))?;
    let method = Method::from_bytes(http.method.as_bytes())
        .map_err(|_| invalid("The original method is not a method"))?;
    if !http.path.starts_with('/') {
        return Err(invalid("The original path must start with /"));
    }
    let (path, query) = match http.path.split_once('?') {
        Some((path, query)) => (path.to_string(), Some(query.to_string())),
        None => (http.path.clone(), None),
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &http.headers {
        // Pseudo-headers (`:path`, `:method`) are described by their own fields.
        if name.starts_with(':') {
            continue;
        }
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid("A header name of the original request is not valid"))?;
        let value = HeaderValue::from_str(value)
            .map_err(|_| invalid("A header value of the original request is not valid"))?;
        headers.append(name, value);
    }
    let source = attributes
        .source
        .as_ref()
        .and_then(|peer| peer.address.as_ref())
        .and_then(|address| match &address.address {
            Some(Address::SocketAddress(socket)) => socket.address.parse().ok(),
            _ => None,
        });
    Ok(Described {
        method,
        path,
        query,
        headers,
        source,
    })
}

/// The decision on a described request: the identity headers to add, or the refusal.
async fn decide_check(
    ctx: &RequestContext<'_>,
    described: &Described,
    record: &mut AccessRecord,
) -> Result<HeaderMap, GatewayError> {
    admit_caller(ctx).await?;
    let (method, query) = (&described.method, described.query.as_deref());
    decide_asked(
        ctx,
        method,
        &described.path,
        query,
        &described.headers,
        record,
    )
    .await
}

/// `OK`, with the identity headers set upstream (replacing any the client sent) and the
/// identity headers this answer does not set removed, so no client value survives
/// whichever order Envoy applies the two lists in.
fn allowed(headers: &HeaderMap, ctx: &RequestContext<'_>) -> CheckResponse {
    let to_set = header_options(headers);
    let to_remove = ctx
        .snapshot
        .identity_headers
        .all()
        .into_iter()
        .filter(|name| !headers.contains_key(*name))
        .map(|name| name.as_str().to_string())
        .collect();
    #[allow(deprecated)]
    let ok = OkHttpResponse {
        headers: to_set,
        headers_to_remove: to_remove,
        ..OkHttpResponse::default()
    };
    let mut response = CheckResponse::with_status(tonic::Status::new(Code::Ok, ""));
    response.http_response = Some(HttpResponse::OkResponse(ok));
    response
}

/// The refusal: the HTTP status, JSON body and headers the proxy path would answer with,
/// and the gRPC code that goes with the status.
fn denied(error: &GatewayError) -> CheckResponse {
    let rendered = error.to_response();
    let headers = header_options(rendered.headers());
    let body = String::from_utf8(crate::error::json_body(error.code(), &error.message()))
        .unwrap_or_default();
    let denied = DeniedHttpResponse {
        status: Some(HttpStatus {
            code: i32::from(error.status().as_u16()),
        }),
        headers,
        body,
    };
    let status = tonic::Status::new(grpc_code(error.status()), error.code());
    let mut response = CheckResponse::with_status(status);
    response.http_response = Some(HttpResponse::DeniedResponse(denied));
    response
}

/// The gRPC code Envoy expects with each HTTP status (contract §9).
fn grpc_code(status: StatusCode) -> Code {
    match status {
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::NOT_FOUND => Code::NotFound,
        StatusCode::TOO_MANY_REQUESTS => Code::ResourceExhausted,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => Code::Unavailable,
        StatusCode::GATEWAY_TIMEOUT => Code::DeadlineExceeded,
        status if status.is_client_error() => Code::InvalidArgument,
        _ => Code::Internal,
    }
}

/// `headers` as Envoy header options that replace any value already there.
fn header_options(headers: &HeaderMap) -> Vec<HeaderValueOption> {
    #[allow(deprecated)]
    let option = |(name, value): (&HeaderName, &HeaderValue)| HeaderValueOption {
        header: Some(PbHeaderValue {
            key: name.as_str().to_string(),
            value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            raw_value: Vec::new(),
        }),
        append: None,
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        keep_empty_value: false,
    };
    headers.iter().map(option).collect()
}

/// A bound gRPC listener.
pub struct GrpcListener {
    tcp: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl GrpcListener {
    /// Binds `addr`; `tls` makes it serve TLS (ALPN `h2`).
    pub async fn bind(addr: SocketAddr, tls: Option<TlsAcceptor>) -> std::io::Result<Self> {
        Ok(GrpcListener {
            tcp: TcpListener::bind(addr).await?,
            tls,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Serves checks until shutdown; `lifecycle` holds the drain guard while it runs.
pub async fn serve(
    listener: GrpcListener,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    drain: mpsc::Sender<()>,
    handshake_timeout: Duration,
) {
    let tls = listener.tls.is_some();
    let lifecycle = Lifecycle {
        shutdown: shutdown.clone(),
        drain: drain.clone(),
        slot: Arc::new(()),
    };
    let service = AuthorizationServer::new(Checks {
        shared,
        tls,
        lifecycle,
    });
    let (accepted, incoming) = mpsc::channel::<Accepted>(64);
    tokio::spawn(accept(
        listener,
        accepted,
        shutdown.clone(),
        handshake_timeout,
    ));
    let mut incoming = incoming;
    let incoming = futures_util::stream::poll_fn(move |cx| {
        incoming
            .poll_recv(cx)
            .map(|next| next.map(Ok::<_, std::io::Error>))
    });
    let mut stop = shutdown;
    let result = tonic::transport::Server::builder()
        .timeout(CHECK_TIMEOUT)
        .concurrency_limit_per_connection(256)
        .serve_with_incoming_shutdown(service, incoming, async move { stopped(&mut stop).await })
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "the ext_authz listener failed");
    }
    drop(drain);
}

/// Accepts connections (at most [`MAX_CONNECTIONS`] at once), completes TLS handshakes
/// concurrently within `handshake_timeout`, and hands the connections to the server.
async fn accept(
    listener: GrpcListener,
    accepted: mpsc::Sender<Accepted>,
    mut shutdown: watch::Receiver<bool>,
    handshake_timeout: Duration,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = stopped(&mut shutdown) => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = stopped(&mut shutdown) => return,
            result = listener.tcp.accept() => match result {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "ext_authz accept failed; backing off");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let tls = listener.tls.clone();
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let io: Box<dyn Io> = match tls {
                None => Box::new(stream),
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => Box::new(stream),
                        _ => return,
                    }
                }
            };
            let _ = accepted
                .send(Accepted {
                    io,
                    peer,
                    _slot: permit,
                })
                .await;
        });
    }
}

/// A raw connection, plain or TLS.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An accepted connection with its peer, holding its place under the connection cap.
struct Accepted {
    io: Box<dyn Io>,
    peer: SocketAddr,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Accepted {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        Peer(self.peer)
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
