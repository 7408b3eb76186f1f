//! Forwarding to upstreams: one pooled client per upstream, the upstream URL built from
//! the route's normalised path, and upstream failures classified as 502 or 504.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{Body, StallTimeout};
use crate::config::{self, Config};
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::tls_client::{self, Roots};

pub mod headers;
pub mod websocket;

/// Idle upstream connections are kept this long for reuse; shorter than the usual 60 s+
/// keep-alive of upstream servers, so the gateway closes first and never reuses a
/// connection the upstream is closing.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One upstream service and its connection pool.
pub struct UpstreamClient {
    name: Arc<str>,
    settings: config::Upstream,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
    tls: Arc<rustls::ClientConfig>,
    /// `upstream_duration_seconds{upstream=<name>}`, resolved once.
    duration: prometheus::Histogram,
}

/// A raw connection to an upstream, plain or TLS (for the WebSocket relay).
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

impl UpstreamClient {
    fn new(
        name: &str,
        settings: &config::Upstream,
        roots: &Roots,
        metrics: &Metrics,
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
        let tls = tls_client::config(roots, settings.ca_file.as_deref())
            .map_err(|e| format!("upstream `{name}`: {e}"))?;
        let tls = Arc::new(tls);
        let connector = tls_client::connector((*tls).clone(), Some(settings.connect_timeout.get()));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(settings.max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(UpstreamClient {
            name: name.into(),
            settings: settings.clone(),
            scheme,
            authority,
            base_path,
            client,
            tls,
            duration: metrics.upstream_duration.with_label_values(&[name]),
        })
    }

    /// The `ws://` or `wss://` URL of a WebSocket path on this upstream.
    pub fn ws_uri(&self, path: &str, query: Option<&str>) -> Result<Uri, GatewayError> {
        let scheme = if self.scheme == Scheme::HTTPS {
            "wss"
        } else {
            "ws"
        };
        let target = match query {
            Some(q) => format!("{scheme}://{}{}{path}?{q}", self.authority, self.base_path),
            None => format!("{scheme}://{}{}{path}", self.authority, self.base_path),
        };
        target
            .parse()
            .map_err(|_| GatewayError::InvalidRequest("Request target is not valid".into()))
    }

    /// Opens a raw connection (TCP, then TLS for `https://` upstreams) within the
    /// connect timeout.
    pub async fn connect(&self) -> Result<Box<dyn Io>, GatewayError> {
        let host = self
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = self.scheme == Scheme::HTTPS;
        let port = self
            .authority
            .port_u16()
            .unwrap_or(if tls { 443 } else { 80 });
        let limit = self.settings.connect_timeout.get();
        let unavailable =
            |e: String| GatewayError::UpstreamUnavailable(format!("upstream `{}`: {e}", self.name));
        let tcp =
            tokio::time::timeout(limit, tokio::net::TcpStream::connect((host.as_str(), port)))
                .await
                .map_err(|_| unavailable("connect timed out".into()))?
                .map_err(|e| unavailable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        if !tls {
            return Ok(Box::new(tcp));
        }
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|e| unavailable(e.to_string()))?;
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let stream = tokio::time::timeout(limit, connector.connect(name, tcp))
            .await
            .map_err(|_| unavailable("TLS handshake timed out".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(Box::new(stream))
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

    /// The upstream URL for a normalised path and the original query.
    pub fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, GatewayError> {
        let path_and_query = match query {
            Some(q) => format!("{}{path}?{q}", self.base_path),
            None => format!("{}{path}", self.base_path),
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| GatewayError::InvalidRequest("Request target is not valid".into()))
    }

    /// Sends `request` (already rewritten) and returns the upstream's response with its
    /// body streaming. `timeout` bounds the wait for the response head and every pause
    /// in the response body.
    pub async fn send(
        &self,
        mut request: Request<Incoming>,
        uri: Uri,
        timeout: Duration,
    ) -> Result<Response<Body>, GatewayError> {
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_11;
        let started = Instant::now();
        let result = tokio::time::timeout(timeout, self.client.request(request)).await;
        self.duration.observe(started.elapsed().as_secs_f64());
        let mut response = match result {
            Err(_) => return Err(GatewayError::UpstreamTimeout(timeout)),
            Ok(Err(error)) => return Err(GatewayError::UpstreamUnavailable(describe(&error))),
            Ok(Ok(response)) => response,
        };
        headers::strip_hop_by_hop(response.headers_mut());
        Ok(response.map(|body| StallTimeout::new(body, timeout).boxed_unsync()))
    }
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
                None => Arc::new(UpstreamClient::new(name, settings, &roots, metrics)?),
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
