//! Listeners and connections: accept under a connection limit, PROXY protocol and TLS
//! handshakes under the header timeout, HTTP/1.1 and HTTP/2 serving with idle and
//! slow-client cut-offs, and graceful drain on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::Body;
use crate::client_ip::{is_trusted, ClientText};
use crate::config::Limits;
use crate::conn::{stopped, ConnInfo, Lifecycle};
use crate::state::Shared;

mod activity;
mod per_ip;
pub mod proxy_protocol;
pub mod tls;

use activity::{Activity, Guarded, Tracked};
use per_ip::PerIp;

/// Admin connections have their own small limit, so a flood on the main listeners
/// never locks operators out of `/metrics` and `/readyz`.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// After a failed `accept` (typically: out of file descriptors) wait this long before
/// trying again, instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Client traffic: routes, proxying.
    Proxy,
    /// `/metrics`, `/healthz`, `/readyz`.
    Admin,
}

impl Role {
    /// The role's name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Proxy => "proxy",
            Role::Admin => "admin",
        }
    }
}

/// What answers the requests of a listener: the proxy pipeline or the admin endpoints.
/// `app` chooses one per listener, so the server knows nothing of what is served.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request. Never fails: every error becomes its response.
    fn handle(
        &self,
        conn: &ConnInfo,
        request: Request<Incoming>,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// A bound listening socket, not yet tied to a runtime: it is bound on the main runtime
/// and served on whichever runtime runs [`run`] (a proxy worker's, or the main one).
pub struct Listener {
    tcp: std::net::TcpListener,
    role: Role,
    tls: Option<TlsAcceptor>,
    proxy_protocol: bool,
}

/// Pending connections the kernel queues per listening socket.
const BACKLOG: u32 = 1024;

impl Listener {
    /// Binds `addr` once.
    pub fn bind(
        addr: SocketAddr,
        role: Role,
        tls: Option<TlsAcceptor>,
        proxy_protocol: bool,
    ) -> std::io::Result<Self> {
        Ok(Listener {
            tcp: listen(addr, false)?,
            role,
            tls,
            proxy_protocol,
        })
    }

    /// Binds `copies` sockets to `addr` with `SO_REUSEPORT`, one per worker: the kernel
    /// spreads incoming connections over them. With port 0 the first socket fixes the
    /// port the others share. A single copy is bound without `SO_REUSEPORT`.
    pub fn bind_group(
        addr: SocketAddr,
        copies: usize,
        role: Role,
        tls: Option<TlsAcceptor>,
        proxy_protocol: bool,
    ) -> std::io::Result<Vec<Self>> {
        let shared = copies > 1;
        if shared && addr.port() != 0 {
            // `SO_REUSEPORT` would let these sockets join another process's listener on
            // the same port (another gateway started by mistake) and split its traffic.
            // A plain bind fails if anything listens there, so the port is proven free
            // first.
            probe(addr)?;
        }
        let first = listen(addr, shared)?;
        let addr = first.local_addr()?;
        let mut sockets = vec![first];
        for _ in 1..copies {
            sockets.push(listen(addr, shared)?);
        }
        Ok(sockets
            .into_iter()
            .map(|tcp| Listener {
                tcp,
                role,
                tls: tls.clone(),
                proxy_protocol,
            })
            .collect())
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// Binds `addr` without `SO_REUSEPORT` and lets go at once: fails with "address in use"
/// when any socket listens there.
fn probe(addr: SocketAddr) -> std::io::Result<()> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)
}

/// A listening socket on `addr`, non-blocking, `SO_REUSEADDR` (restarts do not wait for
/// old connections in TIME_WAIT) and, when `shared`, `SO_REUSEPORT`.
fn listen(addr: SocketAddr, shared: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    // `listen` registers the socket with the calling runtime; it is taken back out so
    // the runtime that serves it can adopt it.
    socket.listen(BACKLOG)?.into_std()
}

/// What a connection needs of the listener that accepted it.
struct Accepted {
    role: Role,
    tls: Option<TlsAcceptor>,
    proxy_protocol: bool,
    /// HTTP/1.1 and HTTP/2 settings, built once per listener.
    http: auto::Builder<TokioExecutor>,
}

/// What every connection task needs.
#[derive(Clone)]
pub struct ServerContext {
    /// Gateway state.
    pub shared: Arc<Shared>,
    /// Limits fixed at start-up.
    pub limits: Limits,
    /// Becomes `true` when the gateway shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Held by every connection task; the drain waits until all are dropped.
    pub drain: mpsc::Sender<()>,
    /// Places for client connections over all proxy listeners (`max_connections`).
    proxy_slots: Arc<Semaphore>,
    /// Connections per client address (`max_connections_per_ip`).
    per_ip: Arc<PerIp>,
}

impl ServerContext {
    /// What the listeners of one gateway share; `limits` are fixed at start-up.
    pub fn new(
        shared: Arc<Shared>,
        limits: Limits,
        shutdown: watch::Receiver<bool>,
        drain: mpsc::Sender<()>,
    ) -> Self {
        ServerContext {
            proxy_slots: Arc::new(Semaphore::new(limits.max_connections)),
            per_ip: PerIp::new(limits.max_connections_per_ip),
            shared,
            limits,
            shutdown,
            drain,
        }
    }
}

/// Accepts connections on `listener` until shutdown; `handler` answers their requests.
pub async fn run<H: Handler>(listener: Listener, ctx: ServerContext, handler: Arc<H>) {
    let Listener {
        tcp,
        role,
        tls,
        proxy_protocol,
    } = listener;
    // Adopting fails only when the runtime cannot watch the socket (out of memory or
    // epoll watches); the socket is then closed, so the kernel hands its share of new
    // connections to the other workers' sockets instead of queueing them unserved.
    let tcp = match TcpListener::from_std(tcp) {
        Ok(tcp) => tcp,
        Err(error) => {
            tracing::error!(%error, role = role.as_str(), "cannot serve a listening socket");
            return;
        }
    };
    let semaphore = match role {
        Role::Proxy => ctx.proxy_slots.clone(),
        Role::Admin => Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS)),
    };
    // Connections hold only what they need of the listener, not its socket: when this
    // loop ends the socket closes at once, so a draining gateway refuses new clients
    // instead of leaving them in the backlog.
    let accepted_on = Arc::new(Accepted {
        role,
        tls,
        proxy_protocol,
        http: builder(&ctx.limits),
    });
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let (stream, socket_peer) = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            accepted = tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // At the limit, the accepted connection waits here for a place and this loop
        // accepts nothing more: the next ones wait in the kernel's backlog. The place is
        // taken after accepting, not before: with a socket per worker, a place held by
        // a loop whose socket has no client would starve a socket that has one.
        let permit = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            permit = semaphore.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted_on = accepted_on.clone();
        let ctx = ctx.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            connection(stream, socket_peer, permit, &accepted_on, ctx, handler).await;
        });
    }
}

/// Decrements the open-connection gauge when the connection task ends.
struct OpenGuard(prometheus::IntGauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

async fn connection<H: Handler>(
    mut stream: TcpStream,
    socket_peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    listener: &Accepted,
    ctx: ServerContext,
    handler: Arc<H>,
) {
    let gauge = ctx.shared.metrics.open_connections.clone();
    gauge.inc();
    let _open = OpenGuard(gauge);
    let _ = stream.set_nodelay(true);
    let deadline = ctx.limits.header_read_timeout.get();
    let mut peer = socket_peer;
    if listener.proxy_protocol {
        match tokio::time::timeout(deadline, proxy_protocol::read_header(&mut stream)).await {
            Ok(Ok(source)) => {
                let snapshot = ctx.shared.snapshot();
                let trusted = is_trusted(&snapshot.config.trusted_proxies, socket_peer.ip());
                if let (Some(source), true) = (source, trusted) {
                    peer = source;
                }
            }
            Ok(Err(error)) => {
                tracing::debug!(%socket_peer, %error, "closing connection: bad PROXY header");
                return;
            }
            Err(_) => {
                tracing::debug!(%socket_peer, "closing connection: no PROXY header in time");
                return;
            }
        }
    }
    // The admin listener is not capped per address: a busy scraper must not lock itself out.
    let capped = listener.role == Role::Proxy;
    let acquired = if capped {
        ctx.per_ip.acquire(peer.ip())
    } else {
        Some(None)
    };
    let Some(ip_slot) = acquired else {
        ctx.shared
            .metrics
            .connections_refused
            .with_label_values(&["per_ip"])
            .inc();
        tracing::debug!(%peer, "closing connection: too many connections from this address");
        return;
    };
    let info = ConnInfo {
        peer,
        peer_text: ClientText::of(peer.ip()),
        tls: listener.tls.is_some(),
        lifecycle: Lifecycle {
            shutdown: ctx.shutdown.clone(),
            drain: ctx.drain.clone(),
            slot: Arc::new((permit, ip_slot)),
        },
    };
    // Boxed: the connection task stays small, and a plain connection does not carry
    // the space of a TLS one (tasks are as large as their largest state).
    let Some(acceptor) = &listener.tls else {
        return Box::pin(serve(stream, info, &listener.http, ctx, handler)).await;
    };
    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => Box::pin(serve(tls_stream, info, &listener.http, ctx, handler)).await,
        Ok(Err(error)) => tracing::debug!(%socket_peer, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(%socket_peer, "TLS handshake timed out"),
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

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let max_head = limits.max_header_bytes.0 as usize;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own limit sits well above ours: requests between the two get the
    // gateway's JSON 431; only grossly oversized heads meet hyper's bare 431.
    // No hyper header timeout (hyper's default is 30 s once a timer is set): hyper runs
    // it while a kept-alive connection waits for its next request, which would cut idle
    // connections long before `idle_timeout`. The watchdog bounds request heads instead,
    // from their first byte.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size((max_head * 2 + 4096).max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_head * 2).unwrap_or(u32::MAX))
        // Bounds the work one connection can queue; the usual default of peers.
        .max_concurrent_streams(256);
    builder
}

async fn serve<IO, H>(
    io: IO,
    info: ConnInfo,
    builder: &auto::Builder<TokioExecutor>,
    ctx: ServerContext,
    handler: Arc<H>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked::new(io, activity.clone()));
    let info = Arc::new(info);
    let tracker = activity.clone();
    let service = service_fn(move |request: Request<Incoming>| {
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
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let mut shutdown = ctx.shutdown.clone();
    let mut watchdog = tokio::time::interval(watchdog_period(&ctx.limits));
    let header_timeout = ctx.limits.header_read_timeout.get();
    let idle_timeout = ctx.limits.idle_timeout.get();
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                break;
            }
            _ = stopped(&mut shutdown), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = watchdog.tick() => {
                // A client that has not completed a first request head in time is cut
                // off outright, whatever the protocol: it holds a slot and gives nothing.
                if activity.requests_started() == 0 && activity.age() >= header_timeout {
                    tracing::debug!("closing connection: no request head within the header timeout");
                    break;
                }
                if activity.head_arriving_for().is_some_and(|t| t >= header_timeout) {
                    tracing::debug!("closing connection: request head not complete within the header timeout");
                    break;
                }
                if activity.sending_stalled(idle_timeout) {
                    tracing::debug!("closing connection: the client stopped reading its response");
                    break;
                }
                if !closing && activity.in_flight() == 0 && activity.idle_for() >= idle_timeout {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
    drop(ctx.drain);
}
