//! The floor of this stack: the least a hyper 1 reverse proxy can do per request, run the
//! way the gateway runs (one single-threaded tokio runtime per worker, each with its own
//! `SO_REUSEPORT` listener; upstream connections owned by the worker that uses them).
//! No authentication, no header rules, no logging, no metrics, no timeouts: each client
//! connection gets one upstream HTTP/1.1 connection (`hyper::client::conn`), and every
//! request goes to it as it came, its response back as it came.
//!
//! With `-` for the upstream it answers every request itself (`{"ok":true}`): the floor
//! of what a kept-alive client connection costs a hyper server, with nothing behind it.
//! With a certificate and key it terminates TLS first (rustls, the gateway's provider and
//! versions), as the floor of the gateway's TLS listener.
//!
//! `benches/proxy_load.sh` runs it beside nginx and the gateway, so the same-run ratio
//! shows how much of the gap to nginx is hyper's and how much the gateway's own:
//!
//!   cargo bench --bench hyper_floor -- LISTEN_ADDR UPSTREAM_ADDR [WORKERS [CERT KEY]]
//!
//! It serves until killed. Only for measuring: it is not a proxy anyone should deploy.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;

type Upstream = Arc<Mutex<Option<SendRequest<Incoming>>>>;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: hyper_floor LISTEN_ADDR UPSTREAM_ADDR [WORKERS [CERT KEY]]");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR: host:port");
    let upstream: Option<SocketAddr> =
        (upstream != "-").then(|| upstream.parse().expect("UPSTREAM_ADDR: host:port or -"));
    let workers = args
        .get(2)
        .map(|w| w.parse().expect("WORKERS: a number"))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let tls = match (args.get(3), args.get(4)) {
        (Some(cert), Some(key)) => Some(acceptor(cert, key)),
        _ => None,
    };
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let tls = tls.clone();
            std::thread::spawn(move || worker(listen, upstream, tls))
        })
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
}

/// TLS 1.3 and 1.2 with the ring provider, as the gateway's listener.
fn acceptor(cert: &str, key: &str) -> TlsAcceptor {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("CERT: a PEM file")
        .collect::<Result<_, _>>()
        .expect("CERT: PEM certificates");
    let key = PrivateKeyDer::from_pem_file(key).expect("KEY: a PEM private key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate and key");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsAcceptor::from(Arc::new(config))
}

fn worker(listen: SocketAddr, upstream: Option<SocketAddr>, tls: Option<TlsAcceptor>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseport(true).expect("SO_REUSEPORT");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(listen).expect("bind");
        let listener = socket.listen(4096).expect("listen");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            match &tls {
                None => drop(tokio::spawn(serve(stream, upstream))),
                Some(tls) => {
                    let accept = tls.accept(stream);
                    tokio::spawn(async move {
                        if let Ok(stream) = accept.await {
                            serve(stream, upstream).await;
                        }
                    });
                }
            }
        }
    });
}

async fn serve<IO>(stream: IO, upstream: Option<SocketAddr>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(upstream) = upstream else {
        let answer = service_fn(|_request| async {
            Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from_static(
                br#"{"ok":true}"#,
            ))))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), answer)
            .await;
        return;
    };
    let sender: Upstream = Arc::new(Mutex::new(None));
    let service = service_fn(move |request| forward(sender.clone(), upstream, request));
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn forward(
    slot: Upstream,
    upstream: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    let taken = slot.lock().unwrap().take();
    let mut sender = match taken {
        Some(sender) if !sender.is_closed() => sender,
        _ => connect(upstream).await?,
    };
    sender.ready().await?;
    let response = sender.send_request(request).await;
    *slot.lock().unwrap() = Some(sender);
    Ok(response?)
}

async fn connect(
    upstream: SocketAddr,
) -> Result<SendRequest<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(upstream).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}
