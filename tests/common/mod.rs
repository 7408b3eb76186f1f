//! Test harness: fake upstreams on port 0, an in-process gateway, and small clients.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use orcheo_gateway::app::Gateway;
use orcheo_gateway::body::{self, Body};
use orcheo_gateway::config;
use orcheo_gateway::store::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod jwt;

/// A fake upstream server.
pub struct Upstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `handler` on 127.0.0.1:0 (HTTP/1.1 and h2c).
pub async fn upstream<F, Fut>(handler: F) -> Upstream
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Upstream { addr, task }
}

/// A port on 127.0.0.1 that was free a moment ago, for a server a test starts itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// What a test learns from a gated upstream: each held request's arrival, and the
/// switch that lets held requests answer.
pub struct Gate {
    pub arrived: tokio::sync::mpsc::UnboundedReceiver<String>,
    opened: std::sync::Arc<(std::sync::atomic::AtomicBool, tokio::sync::Notify)>,
}

impl Gate {
    /// Waits until a request has reached the upstream (and is held there); its path.
    pub async fn wait_arrival(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.arrived.recv())
            .await
            .expect("a request reached the upstream in time")
            .expect("the upstream is alive")
    }

    /// Lets every held request, and every later one, answer.
    pub fn open(&self) {
        self.opened
            .0
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.opened.1.notify_waiters();
    }
}

/// An upstream that holds every request whose path starts with `held` until the gate is
/// opened, then answers `answer`, and reports each held request's arrival; other paths
/// answer at once. Tests learn that a request is in flight from the upstream itself.
pub async fn gated_upstream(held: &'static str, answer: &'static str) -> (Upstream, Gate) {
    use std::sync::atomic::Ordering::SeqCst;
    let (tx, arrived) = tokio::sync::mpsc::unbounded_channel();
    let opened = std::sync::Arc::new((
        std::sync::atomic::AtomicBool::new(false),
        tokio::sync::Notify::new(),
    ));
    let gate = opened.clone();
    let up = upstream(move |req: Request<Incoming>| {
        let (tx, opened) = (tx.clone(), opened.clone());
        async move {
            let path = req.uri().path().to_string();
            if path.starts_with(held) {
                let released = opened.1.notified();
                tokio::pin!(released);
                // Registered before the flag is read, so an `open` in between is not lost.
                released.as_mut().enable();
                if !opened.0.load(SeqCst) {
                    let _ = tx.send(path);
                    released.await;
                }
            }
            Response::new(body::full(answer))
        }
    })
    .await;
    (
        up,
        Gate {
            arrived,
            opened: gate,
        },
    )
}

/// An upstream that answers with JSON describing the request it received.
pub async fn echo_upstream() -> Upstream {
    upstream(|req: Request<Incoming>| async move {
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let mut headers = serde_json::Map::new();
        for name in parts.headers.keys() {
            let values: Vec<String> = parts
                .headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            headers.insert(name.as_str().to_string(), values.into());
        }
        let echo = serde_json::json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_len": bytes.len(),
        });
        let mut response = Response::new(body::full(echo.to_string()));
        response
            .headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        response
    })
    .await
}

/// A gateway running in this process.
pub struct TestGateway {
    pub gateway: Option<Gateway>,
    pub http: SocketAddr,
    pub admin: SocketAddr,
}

impl TestGateway {
    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().unwrap()
    }

    pub async fn shutdown(&mut self) -> orcheo_gateway::app::ShutdownReport {
        self.gateway.take().unwrap().shutdown().await
    }

    pub async fn metrics(&self) -> String {
        metrics_of(self.admin).await
    }

    /// Waits until the series `series` reads at least `at_least` (the observable event a
    /// test waits for, instead of sleeping); false if `limit` passes first.
    pub async fn wait_for_metric(&self, series: &str, at_least: f64, limit: Duration) -> bool {
        wait_for_metric(self.admin, series, at_least, limit).await
    }
}

/// Listeners on port 0 plus `rest`; `{upstream}` in `rest` is replaced by `upstream_url`.
pub fn yaml(upstream_url: &str, rest: &str) -> String {
    format!(
        "listen: {{http: ['127.0.0.1:0']}}\nadmin: {{listen: '127.0.0.1:0'}}\nupstreams:\n  default: {{url: '{upstream_url}'}}\n{}",
        rest.replace("{upstream}", upstream_url)
    )
}

/// Starts a gateway from YAML text (no environment).
pub async fn gateway(yaml: &str) -> TestGateway {
    let config = config::load(yaml, &config::Env::new()).unwrap_or_else(|e| panic!("{e}"));
    start(config, None).await
}

pub async fn start(config: config::Config, path: Option<std::path::PathBuf>) -> TestGateway {
    start_with(config, path, std::sync::Arc::new(MemoryStore::new())).await
}

/// Starts a gateway with a given token store.
pub async fn start_with(
    config: config::Config,
    path: Option<std::path::PathBuf>,
    store: std::sync::Arc<MemoryStore>,
) -> TestGateway {
    let gateway = Gateway::start_with_store(config, path, config::Env::new(), store)
        .await
        .unwrap();
    let http = gateway
        .addresses
        .http
        .first()
        .copied()
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
    let admin = gateway.addresses.admin.unwrap();
    TestGateway {
        gateway: Some(gateway),
        http,
        admin,
    }
}

/// A gateway forwarding everything (`/**`) to an echo upstream.
pub async fn echo_gateway(extra: &str) -> (TestGateway, Upstream) {
    let up = echo_upstream().await;
    let gw = gateway(&yaml(
        &up.url(),
        &format!("routes:\n  - {{name: all, path: '/**'}}\n{extra}"),
    ))
    .await;
    (gw, up)
}

/// Opens an HTTP/1.1 client connection to `addr`, kept alive for as many requests as the
/// caller sends on it.
pub async fn connection<B>(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<B>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Sends one request over a fresh HTTP/1.1 connection.
pub async fn send<B>(addr: SocketAddr, request: Request<B>) -> Response<Incoming>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    connection(addr).await.send_request(request).await.unwrap()
}

/// GET `path`; returns status, headers and the whole body.
pub async fn get(addr: SocketAddr, path: &str) -> (StatusCode, HeaderMap, Bytes) {
    let request = Request::get(path)
        .header("host", format!("{addr}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    collect(send(addr, request).await).await
}

/// GET `path` with `headers`; returns status, headers and the body as JSON (`null` when
/// it is not JSON).
pub async fn call(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, serde_json::Value) {
    let mut builder = Request::get(path).header("host", "gw");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let (status, headers, body) =
        collect(send(addr, builder.body(Full::new(Bytes::new())).unwrap()).await).await;
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// Reads a whole response.
pub async fn collect(response: Response<Incoming>) -> (StatusCode, HeaderMap, Bytes) {
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, bytes)
}

/// Parses a JSON body.
pub fn json(bytes: &Bytes) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// Asserts the gateway's JSON error shape: flat and under `detail`.
pub fn assert_error(
    status: StatusCode,
    headers: &HeaderMap,
    body: &Bytes,
    want: StatusCode,
    code: &str,
    message: &str,
) {
    assert_eq!(status, want, "{}", String::from_utf8_lossy(body));
    assert_eq!(headers["content-type"], "application/json");
    let value = json(body);
    assert_eq!(value["code"], code);
    assert_eq!(value["message"], message);
    assert_eq!(value["detail"]["code"], code);
    assert_eq!(value["detail"]["message"], message);
}

/// Writes raw bytes and reads until the server closes or `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A body of `chunks` chunks of `chunk` bytes, generated as it is read.
pub struct Generated {
    chunk: Bytes,
    left: usize,
}

impl Generated {
    pub fn new(chunk_size: usize, chunks: usize) -> Self {
        Generated {
            chunk: Bytes::from(vec![b'x'; chunk_size]),
            left: chunks,
        }
    }
}

impl HttpBody for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }
}

/// Peak resident memory of this process (VmHWM), in bytes.
pub fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap()
}

/// A fresh directory under the system temp dir.
pub fn temp_dir(name: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "orcheo-gw-{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `check` every 50 ms until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The Prometheus text of the admin listener at `admin`.
pub async fn metrics_of(admin: SocketAddr) -> String {
    let (_, _, body) = get(admin, "/metrics").await;
    String::from_utf8(body.to_vec()).unwrap()
}

/// Waits until the series `series` on the admin listener at `admin` reads at least
/// `at_least`; false if `limit` passes first.
pub async fn wait_for_metric(
    admin: SocketAddr,
    series: &str,
    at_least: f64,
    limit: Duration,
) -> bool {
    eventually(limit, || async {
        metric_value(&metrics_of(admin).await, series).is_some_and(|v| v >= at_least)
    })
    .await
}

/// The value of one series in Prometheus text, e.g. `name{label="x"}`.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Log output written to memory, for tests that read what the gateway logged.
#[derive(Clone, Default)]
pub struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}
