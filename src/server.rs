//! Listeners and connections: accept under a connection limit, PROXY protocol and TLS
//! handshakes under the header timeout, then HTTP on each connection (`http`: HTTP/1.1
//! and HTTP/2, idle and slow-client cut-offs, graceful drain on shutdown).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::Body;
use crate::client_ip::{is_trusted, ClientText};
use crate::config::Limits;
use crate::conn::{stopped, ConnInfo, Lifecycle};
use crate::state::Shared;

mod activity;
mod http;
mod per_ip;
pub mod proxy_protocol;
pub mod tls;

use http::Http;
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
    http: Http,
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
        http: Http::new(&ctx.limits),
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
        // The connection's future is spawned as it is: a wrapping block would hold a
        // second copy of every argument for the connection's whole life.
        tokio::spawn(connection(
            stream,
            socket_peer,
            permit,
            accepted_on.clone(),
            ctx.clone(),
            handler.clone(),
        ));
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
    listener: Arc<Accepted>,
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
        // Boxed, like the TLS handshake below: a task is as large as its largest state, and
        // an idle connection should not carry the space of steps it has finished.
        let header = Box::pin(proxy_protocol::read_header(&mut stream));
        match tokio::time::timeout(deadline, header).await {
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
    let http = &listener.http;
    match &listener.tls {
        None => Box::pin(http::serve(stream, info, http, ctx, handler)).await,
        Some(acceptor) => Box::pin(serve_tls(acceptor, stream, info, http, ctx, handler)).await,
    }
}

/// The TLS handshake under the header timeout, then HTTP over it. One future for both:
/// the connection task holds a pointer to it, not the TLS state of its handshake.
async fn serve_tls<H: Handler>(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    info: ConnInfo,
    http: &Http,
    ctx: ServerContext,
    handler: Arc<H>,
) {
    let deadline = ctx.limits.header_read_timeout.get();
    let peer = info.peer;
    match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => http::serve(tls_stream, info, http, ctx, handler).await,
        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}
