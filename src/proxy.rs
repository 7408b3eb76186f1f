//! Forwarding to upstreams: one pooled client per upstream, the upstream URL built from
//! the route's normalised path, and upstream failures classified as 502 or 504.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::body::{Body, StallTimeout};
use crate::config::{self, Config};
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::tls_client::{self, Roots};

pub mod headers;
pub mod pool;
pub mod websocket;

use pool::{Checkout, Pool, Returning};

/// One upstream service and its keep-alive connections (held per worker).
pub struct UpstreamClient {
    name: Arc<str>,
    settings: config::Upstream,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Host and port to connect to, and the name the TLS certificate must carry.
    host: String,
    port: u16,
    /// `Host` for requests that arrive without one (HTTP/1.0).
    host_header: HeaderValue,
    base_path: String,
    pool: Arc<Pool>,
    /// `upstream_duration_seconds{upstream=<name>}`, resolved once.
    duration: prometheus::Histogram,
}

/// A connection to an upstream, plain or TLS.
pub enum UpstreamIo {
    /// `http://` and `ws://`.
    Plain(TcpStream),
    /// `https://` and `wss://`.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(io) => io.is_write_vectored(),
            UpstreamIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_flush(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            UpstreamIo::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

impl UpstreamClient {
    fn new(
        name: &str,
        settings: &config::Upstream,
        roots: &Roots,
        metrics: &Metrics,
        workers: usize,
    ) -> Result<Self, String> {
        let uri = config::check_url(&settings.url, false)?;
        let parts = uri.into_parts();
        let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err(format!("upstream `{name}`: URL needs a scheme and host"));
        };
        let base_path = parts
            .path_and_query
            .map(|p| p.path().trim_end_matches('/').to_string())
            .unwrap_or_default();
        let https = scheme == Scheme::HTTPS;
        let tls = if https {
            let config = tls_client::config(roots, settings.ca_file.as_deref())
                .map_err(|e| format!("upstream `{name}`: {e}"))?;
            Some(Arc::new(config))
        } else {
            None
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host_header = HeaderValue::from_str(authority.as_str())
            .map_err(|_| format!("upstream `{name}`: the host is not a valid header value"))?;
        Ok(UpstreamClient {
            name: name.into(),
            settings: settings.clone(),
            tls,
            host,
            port,
            host_header,
            base_path,
            pool: Pool::new(workers, settings.max_idle_per_host),
            duration: metrics.upstream_duration.with_label_values(&[name]),
        })
    }

    /// The `Host` an upstream request carries when the client's request had none.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    /// Opens a connection (TCP, then TLS for `https://` upstreams) within the connect
    /// timeout.
    pub async fn connect(&self) -> Result<UpstreamIo, GatewayError> {
        let limit = self.settings.connect_timeout.get();
        let unavailable =
            |e: String| GatewayError::UpstreamUnavailable(format!("upstream `{}`: {e}", self.name));
        let tcp = tokio::time::timeout(limit, TcpStream::connect((self.host.as_str(), self.port)))
            .await
            .map_err(|_| unavailable("connect timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(UpstreamIo::Plain(tcp));
        };
        let name = rustls::pki_types::ServerName::try_from(self.host.clone())
            .map_err(|e| unavailable(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(tls.clone());
        let stream = tokio::time::timeout(limit, connector.connect(name, tcp))
            .await
            .map_err(|_| unavailable("TLS handshake timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(UpstreamIo::Tls(Box::new(stream)))
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The upstream's name, shared (for each request's access record).
    pub fn label(&self) -> Arc<str> {
        self.name.clone()
    }

    /// The response timeout, unless a route overrides it.
    pub fn timeout(&self) -> Duration {
        self.settings.timeout.get()
    }

    /// The request target sent upstream (origin form): the upstream's base path, the path
    /// `path` appends (normalised, re-encoded) and the original query, built in one buffer.
    pub fn uri(
        &self,
        path: impl FnOnce(&mut String),
        query: Option<&str>,
    ) -> Result<Uri, GatewayError> {
        let mut target = String::with_capacity(self.base_path.len() + 64);
        target.push_str(&self.base_path);
        path(&mut target);
        if let Some(query) = query {
            target.push('?');
            target.push_str(query);
        }
        PathAndQuery::from_maybe_shared(Bytes::from(target))
            .map(Uri::from)
            .map_err(|_| GatewayError::InvalidRequest("Request target is not valid".into()))
    }

    /// Sends `request` (already rewritten, `Host` included) and returns the upstream's
    /// response with its body streaming. `timeout` bounds the wait for the response head
    /// (connecting included) and every pause in the response body.
    pub async fn send(
        &self,
        mut request: Request<Incoming>,
        uri: Uri,
        timeout: Duration,
    ) -> Result<Response<Body>, GatewayError> {
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        let started = Instant::now();
        let deadline = deadline(started, timeout);
        let result = tokio::time::timeout_at(deadline, self.exchange(request, started)).await;
        self.duration.observe(started.elapsed().as_secs_f64());
        let mut response = match result {
            Err(_) => return Err(GatewayError::UpstreamTimeout(timeout)),
            Ok(result) => result?,
        };
        headers::strip_hop_by_hop(response.headers_mut());
        Ok(response.map(|body| StallTimeout::new(body, timeout).boxed_unsync()))
    }

    /// One request on a kept-alive connection of this worker, or on a new one; a
    /// request that never left a reused connection (closed by the upstream in the
    /// meantime) goes again on a new connection.
    async fn exchange(
        &self,
        request: Request<Incoming>,
        now: Instant,
    ) -> Result<Response<Returning>, GatewayError> {
        let request = match self.pool.checkout(now) {
            Checkout::Reused(mut sender) => match pool::send(&mut sender, request).await {
                Ok(response) => return Ok(self.returning(response, sender)),
                Err((_, Some(request))) => request,
                Err((error, None)) => return Err(self.failed(&error)),
            },
            Checkout::Empty => request,
        };
        // Boxed: connecting (TCP, TLS, the HTTP/1 handshake) is the rare path, and its
        // state would otherwise make every exchange's future kilobytes larger, to be
        // moved on every request.
        Box::pin(self.exchange_new(request)).await
    }

    /// One request on a new connection, kept for reuse when the response has been read.
    async fn exchange_new(
        &self,
        request: Request<Incoming>,
    ) -> Result<Response<Returning>, GatewayError> {
        let io = self.connect().await?;
        let mut sender = pool::handshake(io).await.map_err(|e| self.failed(&e))?;
        match pool::send(&mut sender, request).await {
            Ok(response) => Ok(self.returning(response, sender)),
            Err((error, _)) => Err(self.failed(&error)),
        }
    }

    fn returning(
        &self,
        response: Response<Incoming>,
        sender: hyper::client::conn::http1::SendRequest<Incoming>,
    ) -> Response<Returning> {
        let pool = self.pool.clone();
        response.map(|body| Returning::new(body, sender, pool))
    }

    fn failed(&self, error: &hyper::Error) -> GatewayError {
        GatewayError::UpstreamUnavailable(format!("upstream `{}`: {}", self.name, describe(error)))
    }
}

/// `timeout` after `start`, counted from an instant already read (no second clock read).
/// A timeout too long to represent is thirty years, tokio's own "never".
fn deadline(start: Instant, timeout: Duration) -> tokio::time::Instant {
    const NEVER: Duration = Duration::from_secs(86_400 * 365 * 30);
    let start = tokio::time::Instant::from_std(start);
    start
        .checked_add(timeout)
        .or_else(|| start.checked_add(NEVER))
        .unwrap_or(start)
}

/// The error and its causes, for the log (hyper's top-level message alone is vague).
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The upstreams of one configuration.
#[derive(Default)]
pub struct UpstreamSet {
    clients: HashMap<String, Arc<UpstreamClient>>,
}

impl UpstreamSet {
    /// Builds a client per upstream, reusing the clients (and their warm pools) of
    /// `previous` whose settings did not change.
    pub fn build(
        config: &Config,
        previous: Option<&UpstreamSet>,
        metrics: &Metrics,
    ) -> Result<Self, String> {
        let workers = crate::worker::count(config.limits.workers);
        let needs_roots = config
            .upstreams
            .0
            .values()
            .any(|u| u.url.starts_with("https://"));
        let roots = Roots::load(needs_roots);
        let mut clients = HashMap::new();
        for (name, settings) in &config.upstreams.0 {
            let reused = previous
                .and_then(|p| p.clients.get(name))
                .filter(|c| c.settings == *settings)
                .cloned();
            let client = match reused {
                Some(client) => client,
                None => Arc::new(UpstreamClient::new(
                    name, settings, &roots, metrics, workers,
                )?),
            };
            clients.insert(name.clone(), client);
        }
        Ok(UpstreamSet { clients })
    }

    /// The upstream called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<UpstreamClient>> {
        self.clients.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_counts_from_the_start_and_survives_any_timeout() {
        let start = Instant::now();
        let tokio_start = tokio::time::Instant::from_std(start);
        assert_eq!(
            deadline(start, Duration::from_secs(5)) - tokio_start,
            Duration::from_secs(5)
        );
        let far = deadline(start, Duration::MAX) - tokio_start;
        assert_eq!(far, Duration::from_secs(86_400 * 365 * 30));
    }
}
