//! The floor of this stack: the least a hyper 1 reverse proxy can do per request, run the
//! way the gateway runs (one single-threaded tokio runtime per worker, each with its own
//! `SO_REUSEPORT` listener; upstream connections owned by the worker that uses them).
//! No authentication, no header rules, no logging, no metrics, no timeouts: each client
//! connection gets one upstream HTTP/1.1 connection (`hyper::client::conn`), and every
//! request goes to it as it came, its response back as it came.
//!
//! `benches/proxy_load.sh` runs it beside nginx and the gateway, so the same-run ratio
//! shows how much of the gap to nginx is hyper's and how much the gateway's own:
//!
//!   cargo bench --bench hyper_floor -- LISTEN_ADDR UPSTREAM_ADDR [WORKERS]
//!
//! It serves until killed. Only for measuring: it is not a proxy anyone should deploy.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};

type Upstream = Arc<Mutex<Option<SendRequest<Incoming>>>>;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (Some(listen), Some(upstream)) = (args.first(), args.get(1)) else {
        eprintln!("usage: hyper_floor LISTEN_ADDR UPSTREAM_ADDR [WORKERS]");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR: host:port");
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM_ADDR: host:port");
    let workers = args
        .get(2)
        .map(|w| w.parse().expect("WORKERS: a number"))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let threads: Vec<_> = (0..workers)
        .map(|_| std::thread::spawn(move || worker(listen, upstream)))
        .collect();
    for thread in threads {
        let _ = thread.join();
    }
}

fn worker(listen: SocketAddr, upstream: SocketAddr) {
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
            tokio::spawn(serve(stream, upstream));
        }
    });
}

async fn serve(stream: TcpStream, upstream: SocketAddr) {
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
